"""Exporters: one module per target (ONNX, Core ML, OpenVINO) behind one Exporter contract."""

__all__: list[str] = []
