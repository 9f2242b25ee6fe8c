"""Export-time parity, shared by every target: fixed inputs, a bundle session against a reference.

Every export and quantization runs its just-written bundle on the same fixed inputs as its
reference (PyTorch for an export, the source bundle for a quantization), logs each component's
numbers and the end-to-end image's, and records them in the manifest's `details["parity"]`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from instaflow_edge.metrics import image_psnr, ssim, tensor_metrics
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.runtimes.base import Session, images_to_uint8

logger = logging.getLogger(__name__)

# the fixed inputs of every parity check: prompts and noise seeds (batch 1 unless asked)
CHECK_PROMPTS = ["a red circle above a blue square", "two small green triangles"]
# DESIGN.md section 5
GATES_DB = {"fp32": 60.0, "fp16": 35.0, "quantized_image": 25.0}
QUANTIZED_UNET_COSINE = 0.95

IO = dict[str, dict[str, np.ndarray]]


def pytorch_io(pipeline: OneStepPipeline, batch: int = 1) -> IO:
    """Every component's (and the fused generator's) inputs and outputs from PyTorch."""
    input_ids = pipeline.tokenize(CHECK_PROMPTS[:batch])
    return with_generator(pipeline.component_io(input_ids, pipeline.make_noise(range(batch))))


def session_io(session: Session, batch: int = 1) -> IO:
    """The same kind of fixed inputs run through a bundle (the reference of a quantization)."""
    noise = np.random.default_rng(0).standard_normal(
        (batch, *session.recipe.latent_shape), dtype=np.float32
    )
    return with_generator(session.component_io(session.tokenize(CHECK_PROMPTS[:batch]), noise))


def with_generator(io: IO) -> IO:
    """Add the fused generator's inputs (token ids, noise) and output (the uint8 image)."""
    image = images_to_uint8(io["vae_decoder"]["sample"])
    generator = {"input_ids": io["text_encoder"]["input_ids"], "noise": io["unet"]["sample"]}
    return {**io, "generator": {**generator, "image": image}}


def image_metrics(expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    diff = np.abs(expected.astype(np.int16) - got.astype(np.int16))
    return {
        "max_abs": float(diff.max()),
        "image_psnr_db": image_psnr(expected, got),
        "ssim": ssim(expected, got),
    }


def compare(
    target: str, name: str, expected: np.ndarray, got: np.ndarray, against: str
) -> dict[str, Any]:
    """Image metrics for uint8 outputs, tensor metrics otherwise; logged with the target's name."""
    if got.dtype == np.uint8:
        metrics = image_metrics(expected, got)
        line = f"image PSNR {metrics['image_psnr_db']:.1f} dB"
    else:
        metrics = tensor_metrics(expected, got)
        line = f"tensor PSNR {metrics['psnr_db']:.1f} dB"
    logger.info("%s %s vs %s: max-abs %.3g, %s", target, name, against, metrics["max_abs"], line)
    return metrics


def session_parity(
    target: str, session: Session, reference: IO, against: str, executed_on: str | None = None
) -> dict[str, Any]:
    """Every component of a loaded bundle on the reference's inputs, then end to end."""
    parity: dict[str, Any] = {"against": against, "executed_on": executed_on or session.executed_on}
    for name, spec in session.specs.items():
        feeds = {t.name: reference[name][t.name] for t in spec.inputs}
        output = spec.outputs[0].name
        got = session.run(name, feeds)[output]
        parity[name] = compare(target, name, reference[name][output], got, against)
    return end_to_end_parity(target, session, reference, parity)


def end_to_end_parity(
    target: str, session: Session, reference: IO, parity: dict[str, Any]
) -> dict[str, Any]:
    """Add the three graphs end to end against the reference image (and the fused graph vs them)."""
    ids, noise = reference["generator"]["input_ids"], reference["generator"]["noise"]
    images = session.generate(ids, noise)
    parity["end_to_end"] = image_metrics(reference["generator"]["image"], images)
    logger.info(
        "%s end to end vs %s: image PSNR %.1f dB, SSIM %.4f",
        target,
        parity["against"],
        parity["end_to_end"]["image_psnr_db"],
        parity["end_to_end"]["ssim"],
    )
    if "generator" in session.specs:
        fused = session.run("generator", {"input_ids": ids, "noise": noise})["image"]
        psnr = image_psnr(images, fused)
        parity["generator"]["vs_three_graphs_image_psnr_db"] = psnr
        logger.info("%s generator vs the three graphs: image PSNR %.1f dB", target, psnr)
    return parity


def warn_below_gates(parity: dict[str, Any], gate_db: float | None) -> None:
    """Log (not raise) where the numbers miss DESIGN.md's gates; gate_db None: quantized gates."""
    for name, metrics in parity.items():
        if not isinstance(metrics, dict):
            continue
        if "psnr_db" in metrics and not metrics["finite"]:
            logger.warning("%s: output holds NaN or Inf", name)
        elif gate_db is not None and metrics.get("psnr_db", np.inf) < gate_db:
            logger.warning(
                "%s: tensor PSNR %.1f dB is below %.0f dB", name, metrics["psnr_db"], gate_db
            )
    if gate_db is None:
        image = parity["end_to_end"]["image_psnr_db"]
        if image < GATES_DB["quantized_image"]:
            logger.warning("end-to-end image PSNR %.1f dB is below 25 dB", image)
        cosine = parity["unet"]["cosine"]
        if cosine < QUANTIZED_UNET_COSINE:
            logger.warning("unet cosine %.3f is below %.2f", cosine, QUANTIZED_UNET_COSINE)


def json_safe(value: Any) -> Any:
    """Infinite PSNR (identical outputs) as null, so that the manifest stays strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
