"""OpenVINO target: convert each component from PyTorch to IR (optimum-intel's layout), quantize with NNCF.

Calibrated methods (hybrid, int8-full) read our calibration sets, recorded at t=1000, the one
operating point a one-step model has. optimum-intel instead calibrates diffusion models by running
the pipeline's own multi-step scheduler, which feeds the UNet latents at t < 1000 that a one-step
model never sees and so sets activation ranges for the wrong inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from tqdm import tqdm

from instaflow_edge.calibration import CalibrationSet, load_calibration
from instaflow_edge.components import (
    ComponentSpec,
    TensorSpec,
    component_specs,
    generator_spec,
)
from instaflow_edge.errors import UserError
from instaflow_edge.export.base import (
    PRECISIONS,
    Exporter,
    copy_assets,
    copy_tokenizer,
    staged_bundle,
    write_bundle_manifest,
)
from instaflow_edge.export.parity import (
    compare,
    end_to_end_parity,
    json_safe,
    pytorch_io,
    session_io,
    session_parity,
)
from instaflow_edge.fused import component_modules
from instaflow_edge.manifest import ComponentEntry, Manifest, verify_bundle, write_manifest
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.runtimes.base import Session
from instaflow_edge.runtimes.openvino import OpenVinoRuntime

logger = logging.getLogger(__name__)

TARGET = "openvino"
MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
METHODS = ("int8-weights", "int4-weights", "hybrid", "int8-full")
CALIBRATED_METHODS = ("hybrid", "int8-full")
# The CPU here executes in bf16 unless told otherwise (47 dB instead of 130): parity needs f32.
PARITY_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoExporter(Exporter):
    """PyTorch modules -> `ov.convert_model` -> IR per component, each checked against PyTorch."""

    target = TARGET
    quantization_methods = METHODS

    def export(
        self,
        pipeline: OneStepPipeline,
        out_dir: Path,
        precision: str = "fp32",
        options: dict[str, Any] | None = None,
    ) -> Path:
        """options: dynamic_batch (False: static batch 1), fused (add the one-graph generator), overwrite."""
        options = options or {}
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r} for openvino: use {PRECISIONS}")
        dynamic = bool(options.get("dynamic_batch", False))
        fused = bool(options.get("fused", False))
        batch = 2 if dynamic else 1  # a dynamic-batch export is checked at batch 2
        reference = pytorch_io(pipeline, batch)
        specs = component_specs(pipeline.shapes)
        specs["generator"] = generator_spec(pipeline.shapes)
        modules = component_modules(pipeline, fused=fused)
        parity: dict[str, Any] = {"against": "PyTorch fp32", "executed_on": "CPU (f32)"}
        with staged_bundle(Path(out_dir), overwrite=bool(options.get("overwrite"))) as staging:
            components = {}
            for name, module in tqdm(modules.items(), desc="export openvino", unit="component"):
                spec = _batched(specs[name], None if dynamic else 1)
                feeds = {tensor.name: reference[name][tensor.name] for tensor in spec.inputs}
                model = _convert(module, spec, feeds)
                file = f"{name}/{MODEL_FILE}"
                ov.save_model(model, staging / file, compress_to_fp16=precision == "fp16")
                parity[name] = check_component(staging / file, name, feeds, reference[name])
                components[name] = (spec, file, [f"{name}/{WEIGHTS_FILE}"])
            assets = copy_tokenizer(pipeline, staging)
            manifest = write_bundle_manifest(
                staging, pipeline, TARGET, precision, components, assets
            )
            session = OpenVinoRuntime().load(staging, "CPU", fused=False)
            end_to_end_parity(TARGET, session, reference, parity)
            manifest.details = {"dynamic_batch": dynamic, "parity": json_safe(parity)}
            write_manifest(staging, manifest)
        return Path(out_dir)

    def quantize(
        self,
        bundle: Path,
        out_dir: Path,
        method: str,
        calibration: Path | None = None,
        options: dict[str, Any] | None = None,
    ) -> Path:
        """int8-weights / int4-weights: NNCF weight compression of every component. hybrid: the UNet's
        weights and activations from calibration, the others' weights only. int8-full: all W8A8."""
        options = options or {}
        bundle = Path(bundle)
        if method not in METHODS:
            raise UserError(f"unknown openvino quantization {method!r}; use one of {METHODS}")
        source = verify_bundle(bundle)
        if source.target != TARGET:
            raise UserError(f"bundle {bundle} is for target {source.target!r}, not {TARGET!r}")
        if source.quantization:
            raise UserError(f"bundle {bundle} is already quantized ({source.quantization})")
        samples = _calibration(calibration, source) if method in CALIBRATED_METHODS else None
        # the source bundle's own outputs are what the quantized one is checked against
        reference = session_io(OpenVinoRuntime().load(bundle, "CPU"))
        core = ov.Core()
        with staged_bundle(Path(out_dir), overwrite=bool(options.get("overwrite"))) as staging:
            copy_assets(bundle, staging, source)
            components = {}
            for name, entry in tqdm(source.components.items(), desc=f"quantize {method}"):
                if name == "generator" and samples is not None:
                    logger.warning(
                        "%s: the fused generator is left out (calibrated per component)", method
                    )
                    continue
                model = core.read_model(bundle / entry.file)
                model = quantize_component(model, name, entry.spec, method, samples)
                ov.save_model(
                    model, staging / entry.file, compress_to_fp16=source.precision == "fp16"
                )
                weights = entry.file.replace(MODEL_FILE, WEIGHTS_FILE)
                components[name] = ComponentEntry.from_files(
                    staging, entry.spec, entry.file, [weights]
                )
            details: dict[str, Any] = {"source_bundle": str(bundle)}
            if samples is not None:
                details["calibration"] = {"set": str(calibration), "samples": len(samples)}
            manifest = dataclasses.replace(
                source, components=components, quantization=method, details=details
            )
            write_manifest(staging, manifest)
            session = OpenVinoRuntime().load(staging, "CPU", fused=False)
            parity = session_parity(TARGET, session, reference, "fp32 bundle", _executed(session))
            details["parity"] = json_safe(parity)
            write_manifest(staging, manifest)
        logger.info("quantized %s with %s into %s", bundle, method, out_dir)
        return Path(out_dir)


def quantize_component(
    model: ov.Model,
    name: str,
    spec: ComponentSpec,
    method: str,
    calibration: CalibrationSet | None,
) -> ov.Model:
    """One component's IR quantized by `method` (optimum-intel's definitions for diffusion)."""
    import nncf

    if method == "int8-weights" or (method == "hybrid" and name != "unet"):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if method == "int4-weights":
        # group size 128 where the channels allow it, else the largest divisor down to 32
        return nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT4_ASYM,
            advanced_parameters=nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST
            ),
        )
    dataset = nncf.Dataset(list(calibration.inputs(name, [t.name for t in spec.inputs])))
    if method == "hybrid":
        # optimum-intel's hybrid mode: MatMul/embedding weights int8 (weights only); the
        # convolutions and every activation quantized from calibration data, SmoothQuant off.
        weighted = _ops_with_weights(model)
        model = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT8_ASYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
        )
        return nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )
    model_type = None if name == "vae_decoder" else nncf.ModelType.TRANSFORMER
    return nncf.quantize(model, dataset, model_type=model_type, subset_size=len(calibration))


def check_component(
    path: Path, name: str, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> dict[str, float]:
    """Run a just-saved IR on the CPU at f32 and compare its output with PyTorch; log the numbers."""
    compiled = ov.Core().compile_model(path, "CPU", PARITY_CONFIG)
    output = compiled.outputs[0].get_any_name()
    return compare(TARGET, name, expected[output], compiled(feeds)[0], "PyTorch fp32")


def _executed(session: Session) -> str:
    return f"{session.executed_on} ({session.inference_precision})"


def _batched(spec: ComponentSpec, batch: int | None) -> ComponentSpec:
    """The spec with its batch axis fixed to `batch` (static export), or left dynamic (None)."""

    def fix(tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return tuple(
            dataclasses.replace(t, shape=tuple(batch if d == "batch" else d for d in t.shape))
            for t in tensors
        )

    return (
        spec
        if batch is None
        else dataclasses.replace(spec, inputs=fix(spec.inputs), outputs=fix(spec.outputs))
    )


def _convert(
    module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]
) -> ov.Model:
    """`ov.convert_model` from the PyTorch module, with the spec's tensor names and shapes."""
    example = {name: torch.from_numpy(value) for name, value in feeds.items()}
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    for port, tensor in zip(model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({tensor.name})
    model.reshape(
        {
            tensor.name: ov.PartialShape([-1 if d == "batch" else d for d in tensor.shape])
            for tensor in spec.inputs
        }
    )
    return model


def _calibration(path: Path | None, source: Manifest) -> CalibrationSet:
    if path is None:
        raise UserError(
            "hybrid and int8-full quantization need --calibration SET (make one with calibrate)"
        )
    calibration = load_calibration(path)
    if calibration.source_model != source.source_model.get("id"):
        raise UserError(
            f"calibration set {path} was made from {calibration.source_model!r}, "
            f"but the bundle from {source.source_model.get('id')!r}"
        )
    return calibration


def _ops_with_weights(model: ov.Model) -> list[str]:
    """MatMuls with a constant operand and embedding Gathers: what hybrid mode compresses weights-only."""

    def constant(node: ov.Node) -> bool:
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        inputs = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        if (kind == "MatMul" and any(constant(n) for n in inputs)) or (
            kind == "Gather"
            and constant(inputs[0])
            and op.input_value(0).get_element_type().is_real()
        ):
            names.append(op.get_friendly_name())
    return names
