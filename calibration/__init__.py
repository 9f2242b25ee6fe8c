"""Calibration: prompt sets and the tensors every component sees at the operating point (t=1000).

`load_calibration` needs only numpy and safetensors; `build_calibration` runs the PyTorch
reference (import it from `instaflow_edge.calibration.builder`).
"""

from instaflow_edge.calibration.dataset import CalibrationSet, load_calibration

__all__ = ["CalibrationSet", "load_calibration"]
