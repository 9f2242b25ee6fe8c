"""The one JSON encoding of results: manifests, reports and benchmarks write floats the same way.

Strict JSON has no NaN or infinity; an infinite PSNR (identical outputs) and a NaN metric are
written as the strings "inf", "-inf" and "nan", and numpy scalars become Python numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN and infinities to "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def dumps(value: Any) -> str:
    """Indented strict JSON with a final newline."""
    return json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n"
