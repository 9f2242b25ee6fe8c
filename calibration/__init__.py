"""Calibration: prompt sets and the builder of calibration tensors at the one-step operating point (t=1000)."""

__all__: list[str] = []
