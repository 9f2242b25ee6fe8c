"""Validate a bundle against the PyTorch reference: per-component and end-to-end parity, latency, gates."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from instaflow_edge import __version__
from instaflow_edge.components import ComponentSpec, ModelShapes
from instaflow_edge.errors import UserError
from instaflow_edge.gates import Gates, check, failure_line, failures_of, number
from instaflow_edge.latency import compare_latency, environment
from instaflow_edge.manifest import BundleError, Manifest, read_manifest
from instaflow_edge.metrics import image_psnr, ssim, tensor_metrics
from instaflow_edge.recipe import ONE_STEP_TIMESTEP, to_uint8, with_generator
from instaflow_edge.runtimes import RuntimeOptions, Session, load_session
from instaflow_edge.runtimes.torch_ref import TorchRuntime, TorchSession, load_reference

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1


def bundle_gates(manifest: Manifest, overrides: dict[str, float | None] | None = None) -> Gates:
    """The gates for this bundle's kind, with overrides applied."""
    return Gates.for_bundle(
        manifest.precision, manifest.quantization, overrides, manifest.runtime_options
    )


@dataclass
class Validation:
    """The outcome: the report (JSON-ready) and the images both sides made (uint8 NHWC)."""

    report: dict[str, Any]
    reference_images: np.ndarray
    bundle_images: np.ndarray

    @property
    def passed(self) -> bool:
        return self.report["status"] == "passed"


def validate_bundle(
    bundle_dir: Path,
    prompts: list[str],
    reference_model: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    reference_device: str = "cpu",
    runtime_options: RuntimeOptions | dict | None = None,
    runs: int = 10,
    warmup: int = 2,
    gate_overrides: dict[str, float | None] | None = None,
) -> Validation:
    """Compare the bundle with the PyTorch reference on the same token ids and noise (seed+i).

    The bundle's files are checked against their sha256 before anything runs; it runs on
    `device` with its runtime's `runtime_options`, PyTorch on `reference_device`.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if manifest.runtime == TorchRuntime.name:
        raise BundleError(
            f"{bundle_dir} names the PyTorch reference as its runtime: it holds no exported graphs "
            "to validate against the reference"
        )
    gates = bundle_gates(manifest, gate_overrides)
    bundle = load_session(bundle_dir, device, runtime_options)  # verifies sha256 first
    reference_id = reference_model or manifest.source_model.get("id")
    reference = load_reference(reference_id, reference_device)
    reference_info = _check_reference(reference, reference_id, manifest)

    seeds = list(range(seed, seed + len(prompts)))
    input_ids = reference.tokenize(prompts)
    bundle_ids = bundle.tokenize(prompts)  # end to end starts from the text, on both sides
    tokenizer = compare_tokenizers(prompts, input_ids, bundle_ids)
    noise = reference.pipeline.make_noise(seeds).numpy()  # one tensor, fed to both sides
    components, feeds, reference_images = compare_components(
        bundle, reference, manifest, input_ids, noise, gates
    )
    end_to_end, bundle_images = compare_images(
        bundle, reference_images, prompts, seeds, bundle_ids, noise, gates
    )
    latency = compare_latency(bundle, reference, feeds, bundle_ids[:1], noise[:1], runs, warmup)

    failures = failures_of({"tokenizer": tokenizer, **components, "end_to_end": end_to_end})
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": "instaflow-edge validate",
        "toolkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "failed" if failures else "passed",
        "summary": summary_line(failures, components, end_to_end),
        "reason": None,
        "failures": failures,
        "bundle": bundle_info(bundle_dir, manifest),
        "reference": reference_info,
        "inputs": {"prompts": prompts, "seeds": seeds, "timestep": ONE_STEP_TIMESTEP},
        "gates": gates.to_dict(),
        "tokenizer": tokenizer,
        "components": components,
        "end_to_end": end_to_end,
        "latency": latency,
        "environment": environment(bundle, reference, device),
    }
    return Validation(report, reference_images, bundle_images)


def skipped_report(bundle_dir: Path, device: str, reason: str) -> dict[str, Any]:
    """A report for a bundle that cannot run here (runtime absent, no GPU): skipped, never passed."""
    manifest = read_manifest(bundle_dir)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": "instaflow-edge validate",
        "toolkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "skipped",
        "summary": f"skipped: {reason}",
        "reason": reason,
        "failures": [],
        "bundle": bundle_info(Path(bundle_dir), manifest),
        "reference": None,
        "inputs": None,
        "gates": bundle_gates(manifest).to_dict(),
        "tokenizer": None,
        "components": {},
        "end_to_end": None,
        "latency": None,
        "environment": {"device": device},
    }


def bundle_info(bundle_dir: Path, manifest: Manifest) -> dict[str, Any]:
    return {
        "path": str(bundle_dir.resolve()),
        "target": manifest.target,
        "runtime": manifest.runtime,
        "precision": manifest.precision,
        "quantization": manifest.quantization,
        "runtime_options": manifest.runtime_options,
        "source_model": manifest.source_model,
        "components": list(manifest.components),
        "library_versions": manifest.library_versions,
    }


def check_comparable(reference: TorchSession, reference_id: str, manifest: Manifest) -> None:
    """Refuse a reference whose tensors cannot feed the bundle's graphs (another model's sizes):
    one line, before anything runs. A reference of the same sizes but other weights is only
    warned about (`_check_reference`)."""
    ours, theirs = reference.pipeline.shapes, manifest.shapes()
    if ours != theirs:
        raise UserError(
            f"the reference {reference_id} cannot be compared with this bundle: it has "
            f"{_sizes(ours)}; the bundle has {_sizes(theirs)}"
        )


def _sizes(shapes: ModelShapes) -> str:
    latents = "x".join(map(str, (shapes.latent_channels, shapes.latent_size, shapes.latent_size)))
    return (
        f"text states {shapes.text_length}x{shapes.text_hidden}, latents {latents} and "
        f"{shapes.image_size}x{shapes.image_size} images"
    )


def _check_reference(reference: TorchSession, reference_id: str, manifest: Manifest) -> dict:
    check_comparable(reference, reference_id, manifest)
    weights = reference.pipeline.fingerprint()
    expected = manifest.source_model.get("sha256")
    if weights != expected:
        logger.warning(
            "the reference %s is not the model this bundle was exported from "
            "(weights sha256 %s, bundle source %s): parity compares two different models",
            reference_id,
            weights[:12],
            (expected or "unrecorded")[:12],
        )
    return {
        "model": reference_id,
        "source": reference.pipeline.source,
        "weights_sha256": weights,
        "matches_bundle_source": weights == expected,
    }


def reference_io(
    reference: TorchSession, input_ids: np.ndarray, noise: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Every reference component's inputs and outputs for one generation (`component_io`), and
    those of a fused "generator" (token ids and noise in, the uint8 NHWC image out)."""
    ids, latents = torch.from_numpy(input_ids), torch.from_numpy(noise)
    return with_generator(reference.pipeline.component_io(ids, latents))


def component_feeds(
    specs: dict[str, ComponentSpec], recorded: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """The reference's inputs for each bundle component it has a counterpart for, in its dtypes."""
    return {
        name: {s.name: recorded[name][s.name].astype(s.dtype) for s in spec.inputs}
        for name, spec in specs.items()
        if _not_comparable(spec, recorded.get(name)) is None
    }


def compare_components(
    bundle: Session,
    reference: TorchSession,
    manifest: Manifest,
    input_ids: np.ndarray,
    noise: np.ndarray,
    gates: Gates,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Feed every bundle component the reference's inputs for it, one prompt at a time.

    Returns the per-component results, each compared component's first feeds (for latency) and
    the reference's images (uint8 NHWC).
    A component the reference has no counterpart for (a fused generator) is checked end to end.
    """
    specs = {name: entry.spec for name, entry in manifest.components.items()}
    collected: dict[str, dict[str, tuple[list, list]]] = {}
    first_feeds: dict[str, dict[str, np.ndarray]] = {}
    reference_images = []
    for index in tqdm(range(len(input_ids)), desc="parity", unit="prompt"):
        one = slice(index, index + 1)
        recorded = reference_io(reference, input_ids[one], noise[one])
        reference_images.append(recorded["generator"]["image"])
        for name, feeds in component_feeds(specs, recorded).items():
            first_feeds.setdefault(name, feeds)
            outputs = bundle.run(name, feeds)
            for output in specs[name].outputs:
                pair = collected.setdefault(name, {}).setdefault(output.name, ([], []))
                pair[0].append(recorded[name][output.name])
                pair[1].append(np.asarray(outputs[output.name]))
    results: dict[str, Any] = {}
    for name, spec in specs.items():
        if name not in collected:
            reason = _not_comparable(spec, recorded.get(name))
            results[name] = {"compared": False, "reason": reason, "checks": []}
            continue
        metrics = {
            output: tensor_metrics(np.concatenate(refs), np.concatenate(outs))
            for output, (refs, outs) in collected[name].items()
        }
        results[name] = {
            "compared": True,
            "outputs": metrics,
            "checks": gates.tensor_checks(name, metrics),
        }
    return results, first_feeds, np.concatenate(reference_images)


def _not_comparable(spec: ComponentSpec, recorded: dict[str, np.ndarray] | None) -> str | None:
    if recorded is None:
        return "no PyTorch counterpart: checked end to end"
    missing = [s.name for s in (*spec.inputs, *spec.outputs) if s.name not in recorded]
    if missing:
        return f"tensors {', '.join(missing)} have no PyTorch counterpart: checked end to end"
    return None


def compare_tokenizers(
    prompts: list[str], reference_ids: np.ndarray, bundle_ids: np.ndarray
) -> dict[str, Any]:
    """The bundle's own tokenizer against the reference's on every prompt: identical ids or fail."""
    same = [bool(np.array_equal(r, b)) for r, b in zip(reference_ids, bundle_ids, strict=True)]
    return {
        "identical_prompts": sum(same),
        "prompts": len(prompts),
        "differing_prompts": [p for p, ok in zip(prompts, same, strict=True) if not ok],
        "checks": [check("token ids identical to the reference's", all(same), True)],
    }


def compare_images(
    bundle: Session,
    reference_images: np.ndarray,
    prompts: list[str],
    seeds: list[int],
    bundle_ids: np.ndarray,
    noise: np.ndarray,
    gates: Gates,
) -> tuple[dict[str, Any], np.ndarray]:
    """The bundle generates end to end through its three graphs from its own token ids and the
    reference's noise; every tensor on the way must be finite; image PSNR and SSIM against the
    reference's images from the same text."""
    bundle_images, finite = [], True
    for index in tqdm(range(len(prompts)), desc="end to end", unit="image"):
        one = slice(index, index + 1)
        io = bundle.component_io(bundle_ids[one], noise[one])
        floats = [v for t in io.values() for v in t.values() if v.dtype.kind == "f"]
        finite = finite and all(np.isfinite(v).all() for v in floats)
        with np.errstate(invalid="ignore"):  # NaN pixels: the finite check says so
            bundle_images.append(to_uint8(np.nan_to_num(io["vae_decoder"]["sample"])))
    reference_array = reference_images
    bundle_array = np.concatenate(bundle_images)
    result: dict[str, Any] = {
        "image_psnr_db": image_psnr(reference_array, bundle_array),
        "ssim": ssim(reference_array, bundle_array),
        "per_image": [
            {
                "prompt": prompt,
                "seed": seed,
                "image_psnr_db": image_psnr(reference_array[i : i + 1], bundle_array[i : i + 1]),
                "ssim": ssim(reference_array[i : i + 1], bundle_array[i : i + 1]),
            }
            for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True))
        ],
        "checks": [],
    }
    result["finite"] = finite
    result["checks"] = [check("finite (no NaN/Inf)", finite, True), *gates.image_checks(result)]
    return result, bundle_array


def summary_line(failures: list[dict], components: dict, end_to_end: dict) -> str:
    """One line: what failed (component and gate) or, when all passed, the headline numbers."""
    if failures:
        return "FAILED " + failure_line(failures)
    psnrs = [
        f"{name} {number(min(m['psnr_db'] for m in result['outputs'].values()))} dB"
        for name, result in components.items()
        if result["compared"]
    ]
    return (
        f"passed: tensor PSNR {', '.join(psnrs) or 'not compared'}; "
        f"image PSNR {number(end_to_end['image_psnr_db'])} dB, SSIM {end_to_end['ssim']:.4f}"
    )
