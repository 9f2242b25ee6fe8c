"""The ONNX target: graphs in optimum's layout, optional ONNX Runtime optimisation, fp16, int8.

Only what is ONNX's own lives here (conversion, saving, quantizers, options); the flow, parity
and manifest are `export.base`'s.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instaflow_edge.components import COMPONENTS, ComponentSpec
from instaflow_edge.diffusers_format import write_client_files
from instaflow_edge.export.base import (
    Conversion,
    Exporter,
    ExportOptions,
    Int8QuantizeOptions,
    Preset,
    Quantization,
    tracing,
)
from instaflow_edge.memory import return_freed_memory
from instaflow_edge.options import option
from instaflow_edge.runtimes.base import RuntimeUnavailable
from instaflow_edge.runtimes.onnxruntime import cuda_available

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
STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]


@dataclass(frozen=True)
class OnnxExportOptions(ExportOptions):
    """ONNX export options."""

    device: str | None = option(
        None,
        "optimise the graphs with ONNX Runtime's transformer optimizer for this device (cpu: "
        "CPU-safe fusions; cuda: all fusions, runs on CUDA only); default: unoptimised, portable",
        ("cpu", "cuda"),
    )


@dataclass(frozen=True)
class OnnxQuantizeOptions(Int8QuantizeOptions):
    """ONNX quantization options."""

    calibration_method: str = option(
        "minmax", "how int8-static sets activation ranges", ("minmax", "percentile")
    )


class OnnxExporter(Exporter):
    """ONNX graphs in optimum's layout: text_encoder/, unet/, vae_decoder/ (+ generator/ fused).

    Methods: fp16 (I/O kept fp32; ops that overflow fp16 kept fp32), int8-dynamic (MatMul
    only), int8-dynamic-all (every op), int8-static (QDQ, per-channel, from a calibration set).
    """

    target = "onnx"
    runtime = "onnxruntime"
    layout = {name: f"{name}/{MODEL_FILE}" for name in COMPONENTS}  # optimum's folders
    converter = f"torch.onnx (TorchScript-based, dynamo=False), opset {OPSET}"
    export_options = OnnxExportOptions
    quantize_options = OnnxQuantizeOptions
    methods = ("fp16", "int8-dynamic", "int8-dynamic-all", "int8-static")
    calibrated_methods = ("int8-static",)
    quantizes_from = ("fp32",)
    method_precisions = {"fp16": "fp16"}
    presets = {
        "fastest-cpu": Preset(
            why="int8-dynamic (MatMul) from the fp32 export, the fastest method that needs no "
            "calibration set: end to end 2.0x PyTorch fp32 on the embedded default (fp32 bundle "
            "1.8x) at 44.6 dB image PSNR (bench/results/bench_tiny)",
            method="int8-dynamic",
        ),
        "fastest-cpu-int8": Preset(
            why="int8-static (QDQ: int8 weights and activations in every Conv, MatMul and Gemm, "
            "calibrated at t=1000 on 16 prompts of the model's own set): on sd15 end to end 2.36x "
            "PyTorch fp32 at 34.0 dB, VAE decoder 2.91x at 36.9 dB, UNet 1.87x at 37.1 dB on an "
            "AVX-512 VNNI CPU, where fastest-cpu is 1.28x (bench/results/"
            "bench_sd15_onnx_int8_vnni); on the embedded default end to end 2.02x at 34.1 dB, "
            "fastest-cpu 2.10x (bench/results/bench_tiny)",
            method="int8-static",
            calibration_prompts=16,
        ),
    }

    def convert(self, job: Conversion) -> Any:
        import onnx

        with tempfile.TemporaryDirectory(prefix="instaflow-edge-onnx-") as scratch:
            path = export_graph(job.module, job.spec, Path(scratch) / MODEL_FILE, job.example)
            if job.options.device is not None:
                optimize_graph(path, job.spec.name, job.options.device)
            if job.precision == "fp16":
                kept = convert_to_fp16(path, path, job.example, job.spec)
                if kept:
                    job.notes["fp32_nodes"] = kept
            return onnx.load(str(path))

    def save(self, model: Any, path: Path, job: Conversion) -> None:
        save_onnx(model, path)

    def parity_device(self, options: OnnxExportOptions) -> str:
        if options.device == "cuda" and not cuda_available():
            raise RuntimeUnavailable(
                "--device cuda fuses the graphs into ops only ONNX Runtime's CUDA provider runs, "
                "and it is not available here, so the bundle cannot be checked: export with "
                "--device cpu, or on a machine with onnxruntime-gpu and a GPU"
            )
        return options.device or "cpu"

    def write_assets(
        self, staging: Path, pipeline: Any, specs: dict[str, ComponentSpec], options: ExportOptions
    ) -> list[str]:
        """optimum's layout: what `ORTDiffusionPipeline.from_pretrained(bundle)` reads."""
        return write_client_files(staging, pipeline, self.layout)

    def quantize_component(self, job: Quantization) -> bool:
        with _root_logger_held():
            self._quantize_component(job)
        return True

    def _quantize_component(self, job: Quantization) -> None:
        if job.method == "fp16":
            kept = convert_to_fp16(job.source, job.dest, job.reference, job.spec)
            if kept:
                job.notes["fp32_nodes"] = kept
        elif job.method == "int8-static":
            feeds = calibration_feeds(job.calibration, job.spec)
            float_inputs = COMPONENTS[job.spec.name].float_inputs
            quantize_static_qdq(job.source, job.dest, feeds, job.options, float_inputs)
        else:
            all_ops = job.method == "int8-dynamic-all"
            kept_float = nodes_reading(job.source, COMPONENTS[job.spec.name].float_inputs)
            seven_bit = job.options.seven_bit_weights
            quantize_dynamic_int8(job.source, job.dest, all_ops, seven_bit, kept_float)


@contextlib.contextmanager
def _root_logger_held() -> Iterator[None]:
    """ONNX Runtime's quantization tools report through the root logger (`logging.warning`: "Please
    consider to run pre-processing", on every component), which also configures it to print
    every later root message: the root logger holds a handler that drops them while they run."""
    root = logging.getLogger()
    held = logging.NullHandler()
    root.addHandler(held)
    try:
        yield
    finally:
        root.removeHandler(held)


# -- writing graphs -----------------------------------------------------------------------------
def export_graph(module, spec: ComponentSpec, path: Path, example: dict[str, np.ndarray]) -> Path:
    """torch.onnx.export into an empty folder, with the spec's names and dynamic axes (the
    exporter itself scatters weights over 2 GB over one file per tensor beside the graph)."""
    import torch

    tensors = (*spec.inputs, *spec.outputs)
    dynamic_axes = {
        t.name: {i: size for i, size in enumerate(t.shape) if isinstance(size, str)}
        for t in tensors
    }
    inputs = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    with tracing(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes or None,
            opset_version=OPSET,
            dynamo=False,
        )
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
    from onnxruntime.transformers.onnx_model import OnnxModel

    feeds = {t.name: reference[t.name] for t in spec.inputs}
    fp32 = onnx.load(str(source))
    blocked = overflowing_nodes(fp32, feeds)
    fp16 = convert_float_to_float16(_copy(fp32), keep_io_types=True, node_block_list=blocked)
    fp16 = _skip_fp16_round_trips(fp16, blocked)
    # the converter appends the input casts last: sorted, the graph passes onnx.checker (clients
    # and tools that check graphs refuse an unsorted one; ONNX Runtime alone does not care)
    OnnxModel(fp16).topological_sort()
    save_onnx(fp16, dest)
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
def nodes_reading(path: Path, inputs: tuple[str, ...]) -> list[str]:
    """The nodes of a graph that read the named graph inputs: kept float when activations are
    quantized, as `Component.float_inputs` says why."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if set(node.input) & set(inputs)]


def quantize_dynamic_int8(
    source: Path, dest: Path, all_ops: bool, seven_bit: bool, kept_float: list[str]
) -> Path:
    """Dynamic int8: weights int8 (7-bit if asked), activations quantized at run time; MatMul
    only unless all_ops; the `kept_float` nodes not at all."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        dest,
        op_types_to_quantize=None if all_ops else ["MatMul"],
        weight_type=QuantType.QInt8,
        reduce_range=seven_bit,
        nodes_to_exclude=kept_float,
        use_external_data_format=_has_external_data(source),
    )
    return dest


def quantize_static_qdq(
    source: Path,
    dest: Path,
    feeds: Iterator[dict[str, np.ndarray]],
    options: OnnxQuantizeOptions,
    float_inputs: tuple[str, ...] = (),
) -> Path:
    """Static int8 QDQ of Conv/MatMul/Gemm: per-channel int8 weights (7-bit if asked), uint8
    activations whose ranges come from the calibration feeds; the ops reading `float_inputs`
    stay float (`Component.float_inputs` says why)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    external = _has_external_data(source)
    prepared = dest.with_name(f".{dest.stem}.pre.onnx")
    ranges = dest.with_name(f".{dest.stem}.ranges.json")
    _pre_process(source, prepared, external)
    kept_float = nodes_reading(prepared, float_inputs)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    # silenced: the percentile calibrator print()s
    with contextlib.redirect_stdout(io.StringIO()):
        _calibrate(prepared, ranges, feeds, method[options.calibration_method], external)
        quantize_static(
            prepared,
            dest,
            None,  # the ranges are calibrated: quantize_static reads them from its cache
            calibration_cache_path=ranges,
            calibrate_method=method[options.calibration_method],
            quant_format=QuantFormat.QDQ,
            # the compute-heavy ops only: quantizing Add as well would calibrate the text encoder's
            # causal mask (-inf), which MinMax turns into a meaningless range and Percentile refuses
            op_types_to_quantize=STATIC_OP_TYPES,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=options.seven_bit_weights,
            nodes_to_exclude=kept_float,
            use_external_data_format=external,
        )
    for leftover in dest.parent.glob(f".{dest.stem}.*"):
        leftover.unlink()
    return dest


def _pre_process(source: Path, prepared: Path, external: bool) -> None:
    """ONNX Runtime's pre-processing for quantization, as `quant_pre_process` does it (symbolic
    shape inference, ONNX Runtime's basic optimizations, ONNX's shape inference), holding one
    copy of the weights at a time. `quant_pre_process` held up to three: sd15's UNet peaked at
    10.1 GiB in it. The symbolic shape inference runs on the graph without its weights, in
    `source`'s folder so that the few tensors it reads load from their file (the UNet's: 1 s at
    0.3 GiB instead of 21 s at 9.9 GiB, the same shapes), and the inferred graph is freed before
    ONNX Runtime's session loads the weights again."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    source = source.resolve()  # read after a chdir: a user's relative path must still name it

    def save(model, path: Path, location: str | None = None) -> None:
        if external:
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, convert_attribute=False)  # fmt: skip
        else:
            onnx.save(model, path)

    with tempfile.TemporaryDirectory(prefix="pre.quant.") as scratch:
        with _working_directory(source.parent):
            graph = onnx.load(source, load_external_data=False)
            try:  # auto_merge: "Incomplete symbolic shape inference" without it
                graph = SymbolicShapeInference.infer_shapes(graph, auto_merge=True)
            finally:  # where it fails, it saves its graph so far in the working directory
                for leftover in source.parent.glob("sym_shape_infer_temp.onnx*"):
                    leftover.unlink()
        onnx.load_external_data_for_model(graph, str(source.parent))
        inferred = Path(scratch) / "preprocessed.onnx"
        save(graph, inferred)
        del graph
        return_freed_memory()
        optimized = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ort.InferenceSession(str(inferred), options, providers=["CPUExecutionProvider"])
        return_freed_memory()
        shaped = Path(scratch) / "onnx_shape_inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(optimized), str(shaped))
        model = onnx.load(shaped)
    add_pre_process_metadata(model)
    save(model, prepared, f"{prepared.name}.data")


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """Run the block in `folder` (contextlib.chdir from Python 3.11)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _calibrate(
    model: Path, ranges: Path, feeds: Iterator[dict[str, np.ndarray]], method, external: bool
) -> None:
    """The activation ranges of `model`'s STATIC_OP_TYPES over `feeds`, by ONNX Runtime's
    calibrator as `quantize_static` runs it, written to `ranges` in its calibration cache's format.

    Apart from `quantize_static`, which loads the model to quantize before it calibrates and so
    held it through calibration beside the calibrator's own copy and the calibration session
    (sd15's UNet: three copies of its 3.3 GiB of weights); here the calibrator's copy also goes
    once its augmented graph is saved (see `_calibration_session`)."""
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="ort.quant.") as scratch, _calibration_session():
        calibrator = create_calibrator(
            model,
            STATIC_OP_TYPES,
            augmented_model_path=str(Path(scratch) / "augmented_model.onnx"),
            calibrate_method=method,
            use_external_data_format=external,
        )
        calibrator.collect_data(Reader())
        save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
    return_freed_memory()


@contextlib.contextmanager
def _calibration_session() -> Iterator[None]:
    """Open ONNX Runtime's calibration sessions lean; neither setting has an option:

    - in ONNX Runtime's priority-based order. The calibrator adds a ReduceMin and a ReduceMax
      after every tensor it calibrates; in the default order they ran after the rest of the
      graph, so every activation stayed alive until its statistic was taken (sd15's VAE decoder:
      5.6 GiB for one calibration run, 2.9 GiB in priority order; the same ops on the same
      inputs, so the same ranges);
    - without the calibrator's own copy of the model, weights included: the augmented graph is
      saved by then, and neither collecting nor computing the ranges reads it."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibraterBase

    open_session = CalibraterBase.create_inference_session

    def open_lean(calibrator: CalibraterBase) -> None:
        calibrator.model = None
        return_freed_memory()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        calibrator.infer_session = ort.InferenceSession(
            calibrator.augmented_model_path,
            sess_options=options,
            providers=calibrator.execution_providers,
        )

    CalibraterBase.create_inference_session = open_lean
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = open_session


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
