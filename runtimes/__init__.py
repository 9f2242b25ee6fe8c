"""Runtimes: one module per runtime (PyTorch reference, ONNX Runtime, OpenVINO, Core ML) behind one contract."""

__all__: list[str] = []
