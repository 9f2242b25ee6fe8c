"""The ONNX target: export to optimum's layout, fuse a one-step generator, optimise, quantize.

Every graph written is checked right away against its reference on fixed inputs (PyTorch for an
export, the fp32 bundle for a quantization) and the numbers go to the log and the manifest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from instaflow_edge.components import ComponentSpec, component_specs, generator_spec
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
    GATES_DB,
    json_safe,
    pytorch_io,
    session_io,
    session_parity,
    warn_below_gates,
)
from instaflow_edge.flow import ONE_STEP_TIMESTEP
from instaflow_edge.manifest import ComponentEntry, Manifest, hash_files, write_manifest
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.runtimes.base import RuntimeUnavailable
from instaflow_edge.runtimes.onnxruntime import OnnxRuntime

logger = logging.getLogger(__name__)

OPSET = 17
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"  # optimum's name for the weights of a graph over 2 GB
PROTOBUF_LIMIT = 2**31 - 1
FP16_MAX = 65504.0
# ONNX Runtime transformer-optimizer model type per component
OPTIMIZER_MODEL_TYPES = {
    "text_encoder": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "generator": "unet",
}
QUANTIZATION_METHODS = ("fp16", "int8-dynamic", "int8-dynamic-all", "int8-static")
CALIBRATION_METHODS = ("minmax", "percentile")
STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]


class OnnxExporter(Exporter):
    """ONNX graphs in optimum's layout: text_encoder/, unet/, vae_decoder/ (+ generator/ fused)."""

    target = "onnx"
    quantization_methods = QUANTIZATION_METHODS

    def export(
        self,
        pipeline: OneStepPipeline,
        out_dir: Path,
        precision: str = "fp32",
        options: dict[str, Any] | None = None,
    ) -> Path:
        """options: fused (bool), device (None | "cpu" | "cuda": graph optimisation), overwrite."""
        options = options or {}
        if precision not in PRECISIONS:
            raise UserError(
                f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        device = options.get("device")
        if device not in (None, "cpu", "cuda"):
            raise UserError(f"unknown device {device!r}: use cpu or cuda")
        from instaflow_edge.fused import component_modules

        modules = component_modules(pipeline, fused=bool(options.get("fused")))
        specs = {**component_specs(pipeline.shapes), "generator": generator_spec(pipeline.shapes)}
        reference = pytorch_io(pipeline)
        details: dict[str, Any] = {
            "exporter": f"torch.onnx (TorchScript-based, dynamo=False), opset {OPSET}",
            "graph_optimization": device,
            "fp32_nodes": {},
        }
        with staged_bundle(Path(out_dir), overwrite=bool(options.get("overwrite"))) as staging:
            entries = {}
            for name, module in tqdm(modules.items(), desc="export onnx", unit="graph"):
                path = staging / name / MODEL_FILE
                export_graph(module, specs[name], path, example_inputs(specs[name], pipeline))
                if device is not None:
                    optimize_graph(path, name, device)
                if precision == "fp16":
                    kept = convert_to_fp16(path, path, reference[name], specs[name])
                    if kept:
                        details["fp32_nodes"][name] = kept
                entries[name] = (specs[name], f"{name}/{MODEL_FILE}", extra_files(staging, name))
            assets = copy_tokenizer(pipeline, staging) + [write_model_index(staging, modules)]
            manifest = write_bundle_manifest(
                staging, pipeline, self.target, precision, entries, assets, details=details
            )
            gate = GATES_DB[precision]
            details["parity"] = check_bundle(staging, reference, "PyTorch", device, gate)
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
        """options: calibration_method ("minmax" | "percentile", for int8-static), overwrite."""
        options = options or {}
        if method not in QUANTIZATION_METHODS:
            raise UserError(
                f"unknown method {method!r} for target onnx; choose one of "
                f"{', '.join(QUANTIZATION_METHODS)}"
            )
        calibration_method = options.get("calibration_method") or "minmax"
        if calibration_method not in CALIBRATION_METHODS:
            raise UserError(
                f"unknown calibration method {calibration_method!r}; choose one of "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        bundle = Path(bundle)
        source = OnnxRuntime().load(bundle, "cpu", fused=False)
        manifest = source.manifest
        if manifest.quantization is not None or manifest.precision != "fp32":
            raise UserError(
                f"bundle {bundle} is already {manifest.quantization or manifest.precision}: "
                "quantize an fp32 export"
            )
        if manifest.details.get("graph_optimization") == "cuda":
            raise UserError(f"bundle {bundle} holds CUDA-only ops: quantize a --device cpu export")
        calibration_set = None
        if method == "int8-static":
            if calibration is None:
                raise UserError("int8-static needs --calibration SET (make one with calibrate)")
            from instaflow_edge.calibration import load_calibration

            calibration_set = load_calibration(calibration)
            if calibration_set.source_model != manifest.source_model.get("id"):
                logger.warning(
                    "calibration set %s was made from %s, the bundle from %s",
                    calibration,
                    calibration_set.source_model,
                    manifest.source_model.get("id"),
                )
        reference = session_io(source)
        details: dict[str, Any] = {"source_bundle": str(bundle), "fp32_nodes": {}}
        if calibration_set is not None:
            details["calibration"] = {
                "set": str(calibration),
                "samples": len(calibration_set),
                "method": calibration_method,
            }
        with staged_bundle(Path(out_dir), overwrite=bool(options.get("overwrite"))) as staging:
            components = {}
            for name, entry in tqdm(manifest.components.items(), desc=method, unit="graph"):
                source_path, path = bundle / entry.file, staging / entry.file
                path.parent.mkdir(parents=True)
                if method == "fp16":
                    kept = convert_to_fp16(source_path, path, reference[name], entry.spec)
                    if kept:
                        details["fp32_nodes"][name] = kept
                elif method == "int8-static":
                    feeds = calibration_feeds(calibration_set, entry.spec)
                    quantize_static_qdq(source_path, path, feeds, calibration_method)
                else:
                    quantize_dynamic_int8(source_path, path, all_ops=method == "int8-dynamic-all")
                components[name] = ComponentEntry.from_files(
                    staging, entry.spec, entry.file, extra_files(staging, name)
                )
            copy_assets(bundle, staging, manifest)
            quantized = Manifest(
                target=self.target,
                precision="fp16" if method == "fp16" else manifest.precision,
                quantization=method,
                source_model=manifest.source_model,
                sampling=manifest.sampling,
                components=components,
                assets=hash_files(staging, list(manifest.assets)),
                details=details,
            )
            write_manifest(staging, quantized)
            gate = GATES_DB["fp16"] if method == "fp16" else None
            details["parity"] = check_bundle(staging, reference, "fp32 bundle", None, gate)
            write_manifest(staging, quantized)
        return Path(out_dir)


# -- fixed inputs and their reference outputs ---------------------------------------------------
def example_inputs(spec: ComponentSpec, pipeline: OneStepPipeline, batch: int = 2) -> tuple:
    """Inputs to trace with: batch 2 (a batch-1 example fixes the VAE decoder's batch axis)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = []
    for tensor in spec.inputs:
        shape = [batch if isinstance(size, str) else size for size in tensor.shape]
        if tensor.dtype == "int64":
            value = torch.randint(0, len(pipeline.tokenizer), shape, generator=generator)
        elif tensor.name == "timestep":
            value = torch.full(shape, ONE_STEP_TIMESTEP)
        else:
            value = torch.randn(shape, generator=generator)
        tensors.append(value.to(pipeline.device))
    return tuple(tensors)


# -- writing graphs -----------------------------------------------------------------------------
def export_graph(module, spec: ComponentSpec, path: Path, inputs: tuple) -> Path:
    """torch.onnx.export with the spec's names and dynamic axes; weights over 2 GB go to one
    external data file (the exporter itself scatters them over one file per tensor)."""
    import onnx
    import torch

    scratch = path.parent.with_name(f".{path.parent.name}.scratch")
    scratch.mkdir(parents=True)
    tensors = (*spec.inputs, *spec.outputs)
    dynamic_axes = {
        t.name: {i: size for i, size in enumerate(t.shape) if isinstance(size, str)}
        for t in tensors
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", torch.jit.TracerWarning
        )  # shape asserts, traced as constants
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            module,
            inputs,
            str(scratch / MODEL_FILE),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if [p.name for p in scratch.iterdir()] == [MODEL_FILE]:
        (scratch / MODEL_FILE).replace(path)
    else:
        save_onnx(onnx.load(str(scratch / MODEL_FILE)), path)
    shutil.rmtree(scratch)
    return path


def save_onnx(model, path: Path) -> Path:
    """Save a graph; weights over 2 GB in total go to `model.onnx_data` beside it."""
    import onnx

    weights = sum(tensor.ByteSize() for tensor in model.graph.initializer)
    (path.parent / EXTERNAL_DATA_FILE).unlink(missing_ok=True)
    if weights < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
        )
        (path.parent / EXTERNAL_DATA_FILE).chmod(0o644)  # onnx creates it private (0600)
    return path


def extra_files(bundle: Path, component: str) -> list[str]:
    """The files a component's graph needs beside model.onnx (its external data)."""
    folder = bundle / component
    return sorted(f"{component}/{p.name}" for p in folder.iterdir() if p.name != MODEL_FILE)


def write_model_index(staging: Path, modules: dict) -> str:
    """optimum's model_index.json: which folders hold which pipeline parts."""
    import diffusers

    index = {
        "_class_name": "ORTStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["optimum", "ORTModelTextEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["optimum", "ORTModelUnet"],
        "vae_decoder": ["optimum", "ORTModelVaeDecoder"],
    }
    if "generator" in modules:
        index["generator"] = ["instaflow_edge", "OneStepGenerator"]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return "model_index.json"


# -- graph optimisation ---------------------------------------------------------------------------
def optimize_graph(path: Path, component: str, device: str) -> Path:
    """ONNX Runtime's transformer optimizer. CPU: without the fusions that have no CPU kernel
    (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, packed QKV/KV); CUDA: all of them."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = OPTIMIZER_MODEL_TYPES[component]
    options = FusionOptions(model_type)
    if device == "cpu":
        options.enable_nhwc_conv = False
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
        options.enable_bias_splitgelu = False
        options.enable_packed_qkv = False  # "Packed QKV ... not implemented for CPU"
        options.enable_packed_kv = False
    optimized = optimize_model(
        str(path),
        model_type=model_type,
        optimization_options=options,
        opt_level=0,
        use_gpu=device == "cuda",
    )
    return save_onnx(optimized.model, path)


# -- fp16 -----------------------------------------------------------------------------------------
def convert_to_fp16(
    source: Path, dest: Path, reference: dict[str, np.ndarray], spec: ComponentSpec
) -> list[str]:
    """fp32 graph to fp16 with fp32 inputs and outputs. Every op that sees a value beyond fp16's
    range on the reference inputs (an fp32 run) stays fp32: an fp16 kernel would give Inf there,
    whether or not this machine's provider has one. If the result still gives NaN or Inf, the
    whole graph stays fp32. Returns the op names kept in fp32 (["*"]: all)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    feeds = {t.name: reference[t.name] for t in spec.inputs}
    fp32 = onnx.load(str(source))
    blocked = overflowing_nodes(fp32, feeds)
    fp16 = convert_float_to_float16(_copy(fp32), keep_io_types=True, node_block_list=blocked)
    save_onnx(_skip_fp16_round_trips(fp16, blocked), dest)
    if not _finite(dest, feeds):
        logger.warning("%s: fp16 gives NaN or Inf: the whole graph stays fp32", spec.name)
        save_onnx(fp32, dest)
        return ["*"]
    if blocked:
        logger.warning(
            "%s: fp16 would overflow (Inf) in %d ops: kept them in fp32 (%s)",
            spec.name,
            len(blocked),
            ", ".join(blocked[:3]) + (", ..." if len(blocked) > 3 else ""),
        )
    return blocked


def overflowing_nodes(model, feeds: dict[str, np.ndarray]) -> list[str]:
    """Names of the ops whose float inputs or outputs leave fp16's range on `feeds` (fp32 run)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        # through files, for graphs over 2 GB (saving those moves `model`'s weights: save a copy)
        path = save_onnx(_copy(model), Path(scratch) / MODEL_FILE)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        probe = onnx.load(str(path))
        floats = [
            info
            for info in probe.graph.value_info
            if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        ]
        probe.graph.output.extend(floats)  # every intermediate float value becomes an output
        session = ort.InferenceSession(
            str(save_onnx(probe, path)), providers=["CPUExecutionProvider"]
        )
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True)) | feeds
    too_big = {
        name
        for name, value in values.items()
        if np.issubdtype(np.asarray(value).dtype, np.floating)
        and not (np.abs(value) <= FP16_MAX).all()
    }
    return [
        node.name
        for node in model.graph.node
        if node.name and too_big.intersection([*node.input, *node.output])
    ]


def _skip_fp16_round_trips(model, blocked: list[str]):
    """The converter casts a kept-fp32 op's output to fp16 and back even when the next op is kept
    in fp32 too, which overflows all the same: feed the fp32 value straight through instead."""
    import onnx

    def cast_to(node) -> int | None:
        return (
            next((a.i for a in node.attribute if a.name == "to"), None)
            if node.op_type == "Cast"
            else None
        )

    kept_outputs = {out for node in model.graph.node if node.name in blocked for out in node.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if (
            cast_to(node) == onnx.TensorProto.FLOAT
            and source is not None
            and cast_to(source) == onnx.TensorProto.FLOAT16
            and source.input[0] in kept_outputs
        ):
            node.input[0] = source.input[0]  # Cast fp32 -> fp32: an identity
    return model


def _copy(model):
    import onnx

    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _finite(path: Path, feeds: dict[str, np.ndarray]) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return all(np.isfinite(out).all() for out in session.run(None, feeds) if out.dtype.kind == "f")


# -- int8 -----------------------------------------------------------------------------------------
def quantize_dynamic_int8(source: Path, dest: Path, all_ops: bool) -> Path:
    """Dynamic int8: weights int8, activations quantized at run time; MatMul only unless all_ops."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        dest,
        op_types_to_quantize=None if all_ops else ["MatMul"],
        weight_type=QuantType.QInt8,
        use_external_data_format=_has_external_data(source),
    )
    return dest


def quantize_static_qdq(
    source: Path, dest: Path, feeds: Iterator[dict[str, np.ndarray]], calibration_method: str
) -> Path:
    """Static int8 QDQ of Conv/MatMul/Gemm: per-channel int8 weights, uint8 activations whose
    ranges come from the calibration feeds."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    external = _has_external_data(source)
    prepared = dest.with_name(f".{dest.stem}.pre.onnx")
    quant_pre_process(
        source,
        prepared,
        auto_merge=True,  # "Incomplete symbolic shape inference" without it
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        external_data_location=f"{prepared.name}.data",
    )
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator print()s
        quantize_static(
            prepared,
            dest,
            Reader(),
            quant_format=QuantFormat.QDQ,
            # the compute-heavy ops only: quantizing Add as well would calibrate the text encoder's
            # causal mask (-inf), which MinMax turns into a meaningless range and Percentile refuses
            op_types_to_quantize=STATIC_OP_TYPES,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method[calibration_method],
            use_external_data_format=external,
        )
    for leftover in dest.parent.glob(f".{dest.stem}.pre.onnx*"):
        leftover.unlink()
    return dest


def calibration_feeds(calibration, spec: ComponentSpec) -> Iterator[dict[str, np.ndarray]]:
    """The recorded inputs of a component; the generator's are the text encoder's ids and the
    UNet's noise."""
    if spec.name != "generator":
        return calibration.inputs(spec.name, [t.name for t in spec.inputs])
    ids = calibration.inputs("text_encoder", ["input_ids"])
    noise = calibration.inputs("unet", ["sample"])
    return ({**a, "noise": b["sample"]} for a, b in zip(ids, noise, strict=True))


def _has_external_data(path: Path) -> bool:
    return (path.parent / EXTERNAL_DATA_FILE).exists() or any(path.parent.glob("*.data"))


# -- parity -------------------------------------------------------------------------------------
def check_bundle(
    bundle: Path,
    reference: dict[str, dict[str, np.ndarray]],
    against: str,
    device: str | None,
    gate_db: float | None,
) -> dict[str, Any]:
    """Run each graph of a just-written bundle on the reference inputs, log and return the numbers.

    gate_db: tensor PSNR floor per component (None for int8: the gate is end-to-end image PSNR).
    """
    try:
        session = OnnxRuntime().load(bundle, device or "cpu", fused=False)
    except RuntimeUnavailable as error:
        logger.warning("parity not checked here: %s", error)
        return {"skipped": str(error)}
    parity = session_parity("onnx", session, reference, against)
    warn_below_gates(parity, gate_db)
    return json_safe(parity)
