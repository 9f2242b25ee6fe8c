"""The gate policy, one object for export, quantize and validate (DESIGN.md section 5).

Default gates by the bundle's kind: fp32 tensor PSNR >= 60 dB on every component and image PSNR
>= 40 dB end to end, fp16 >= 35 dB and >= 30 dB, quantized image PSNR >= 25 dB and UNet cosine
>= 0.95; NaN or Inf in any output, images included, always fails, and so do token ids that differ
from the reference's.
Any gate can be overridden (a number, or None to turn it off) and the override is recorded.
Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from instaflow_edge.errors import UserError

DEFAULT_GATES: dict[str, dict[str, float]] = {
    # the end-to-end image gates of fp32 and fp16 catch what per-component checks cannot see:
    # a wrong scaling factor or tokenizer (measured: fp32 bundles 86 dB, fp16 60 dB here)
    "fp32": {"min_tensor_psnr_db": 60.0, "min_image_psnr_db": 40.0},
    "fp16": {"min_tensor_psnr_db": 35.0, "min_image_psnr_db": 30.0},
    "quantized": {"min_image_psnr_db": 25.0, "min_unet_cosine": 0.95},
}
GATE_NAMES = ("min_tensor_psnr_db", "min_image_psnr_db", "min_unet_cosine")
# command-line flag -> gate (`--min-tensor-psnr 40`, `--min-image-psnr off`)
GATE_FLAGS = {
    "min_tensor_psnr": "min_tensor_psnr_db",
    "min_image_psnr": "min_image_psnr_db",
    "min_unet_cosine": "min_unet_cosine",
}


class GateFailed(UserError):
    """Parity missed a gate: the message names the component, the number and the threshold."""


# a bundle whose manifest tells its runtime to compute in 16-bit floats (OpenVINO's
# inference_precision; "default" is bf16 on CPUs that have it) is held to fp16's gates
SIXTEEN_BIT_RUNTIME = {"inference_precision": ("f16", "bf16", "default")}


def gate_basis(
    precision: str, quantization: str | None, runtime_options: Mapping[str, Any] | None = None
) -> str:
    """The bundle's kind for the default gates: quantized (a method other than fp16), fp16 (or
    recorded runtime options that compute in 16 bits), fp32."""
    if quantization not in (None, "fp16") or precision not in ("fp32", "fp16"):
        return "quantized"
    sixteen = any(
        (runtime_options or {}).get(key) in values for key, values in SIXTEEN_BIT_RUNTIME.items()
    )
    return "fp16" if sixteen or "fp16" in (precision, quantization) else "fp32"


@dataclass
class Gates:
    """The thresholds a bundle must meet, the kind they default from, and what was overridden."""

    basis: str
    min_tensor_psnr_db: float | None = None
    min_image_psnr_db: float | None = None
    min_unet_cosine: float | None = None
    overridden: list[str] = field(default_factory=list)

    @classmethod
    def for_bundle(
        cls,
        precision: str,
        quantization: str | None,
        overrides: dict[str, float | None] | None,
        runtime_options: Mapping[str, Any] | None = None,
    ) -> Gates:
        """The default gates for the bundle's kind (`runtime_options`: its manifest's), with
        `overrides` (None: gate off) on top."""
        basis = gate_basis(precision, quantization, runtime_options)
        gates = cls(basis=basis, **DEFAULT_GATES[basis])
        for name, value in (overrides or {}).items():
            if name not in GATE_NAMES:
                raise UserError(f"unknown gate {name!r}; known: {', '.join(GATE_NAMES)}")
            setattr(gates, name, value)
            gates.overridden.append(name)
        return gates

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nan_or_inf_fails": True}

    # -- the checks -----------------------------------------------------------------------------
    def tensor_checks(self, component: str, outputs: dict[str, dict[str, Any]]) -> list[dict]:
        """Checks of one component's tensor outputs (each with `tensor_metrics`' numbers)."""
        checks = []
        for output, values in outputs.items():
            checks.append(check(f"{output} finite (no NaN/Inf)", values["finite"], True))
            if not values["finite"]:
                continue  # the other numbers are NaN: one failure says it all
            if self.min_tensor_psnr_db is not None:
                checks.append(
                    check(f"{output} tensor PSNR", values["psnr_db"], self.min_tensor_psnr_db, "dB")
                )
            if component == "unet" and self.min_unet_cosine is not None:
                checks.append(check(f"{output} cosine", values["cosine"], self.min_unet_cosine))
        return checks

    def image_checks(self, metrics: dict[str, Any]) -> list[dict]:
        """Checks of uint8 images (with `image_psnr_db`)."""
        if self.min_image_psnr_db is None:
            return []
        return [check("image PSNR", metrics["image_psnr_db"], self.min_image_psnr_db, "dB")]


def check(gate: str, value: float | bool, threshold: float | bool, unit: str = "") -> dict:
    """One gate's verdict: a number at or above its threshold, or a condition that must hold."""
    if isinstance(threshold, bool):
        passed = bool(value) is threshold
    else:
        passed = not math.isnan(value) and value >= threshold
    return {"gate": gate, "value": value, "threshold": threshold, "unit": unit, "passed": passed}


def failures_of(checked: dict[str, dict[str, Any]]) -> list[dict]:
    """The failed checks of every part (`{"where": part, **check}`), in order."""
    return [
        {"where": where, **check}
        for where, result in checked.items()
        for check in result.get("checks", [])
        if not check["passed"]
    ]


def failure_line(failures: list[dict]) -> str:
    """What failed, as one line: component, gate, value and threshold."""
    parts = [
        f"{f['where']}: {f['gate']} failed"
        if isinstance(f["threshold"], bool)
        else f"{f['where']}: {f['gate']} {number(f['value'])} < {number(f['threshold'])}"
        f"{' ' + f['unit'] if f['unit'] else ''}"
        for f in failures
    ]
    return "; ".join(parts)


def number(value: float | str) -> str:
    """A metric for people: two decimals, or inf/nan as they are (JSON gives them as strings)."""
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if math.isfinite(value) else str(value)
