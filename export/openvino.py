"""OpenVINO target: convert each component from PyTorch to IR (optimum-intel's layout), quantize with NNCF.

Calibrated methods (hybrid, int8-full) read our calibration sets, recorded at t=1000, the one
operating point a one-step model has. optimum-intel instead calibrates diffusion models by running
the pipeline's own multi-step scheduler, which feeds the UNet latents at t < 1000 that a one-step
model never sees and so sets activation ranges for the wrong inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instaflow_edge.components import BATCH, COMPONENTS, ComponentSpec
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
from instaflow_edge.options import option

if TYPE_CHECKING:  # openvino and torch load only when a conversion runs
    import openvino as ov

    from instaflow_edge.calibration import CalibrationSet

MODEL_FILE = "openvino_model.xml"  # its weights: openvino_model.bin beside it
# What a calibrated method does to each component: "full" (weights and activations int8, from
# calibration), "hybrid" (optimum-intel's for the UNet: the convolutions' weights and
# activations int8, the MatMuls' and embeddings' weights only) or "weights" (weights only).
CALIBRATED_RECIPES: dict[str, dict[str, str]] = {
    "hybrid": {"unet": "hybrid", "text_encoder": "weights", "vae_decoder": "weights"},
    # hybrid, and the VAE decoder (three quarters of a one-step model's FLOPs) as int8-full
    "hybrid-vae": {"unet": "hybrid", "text_encoder": "weights", "vae_decoder": "full"},
    "int8-full": {"unet": "full", "text_encoder": "full", "vae_decoder": "full"},
}

# NNCF's bias correction, measured on sd15 (bf16 against the fp32 IR, 4 calibrated and 4 unseen
# inputs): the VAE decoder's int8-full 34.99 dB with it and without, and its quantization's peak
# 11.4 GiB with it, 8.3 GiB without (its 512x512 activations; both before `_statistics_models_lean`);
# the UNet's int8-full 38.94 against 39.06 dB without (peak 10.4 instead of 10.9 GiB, 132
# instead of 187 s), hybrid 37.47 against 37.63 dB (7.0 instead of 7.3 GiB). The text encoder's
# was not measured and keeps it.
WITHOUT_BIAS_CORRECTION = {"unet", "vae_decoder"}


@dataclass(frozen=True)
class OpenVinoExportOptions(ExportOptions):
    """OpenVINO export options."""

    dynamic_batch: bool = option(
        False, "a dynamic batch axis (default: static batch 1, the one-step case)"
    )


class OpenVinoExporter(Exporter):
    """PyTorch modules -> `ov.convert_model` -> IR per component.

    Methods: int8-weights, int4-weights (NNCF weight compression of every component), and the
    calibrated ones of CALIBRATED_RECIPES: hybrid (optimum-intel's), hybrid-vae, int8-full.
    """

    target = "openvino"
    runtime = "openvino"
    layout = {name: f"{name}/{MODEL_FILE}" for name in COMPONENTS}  # optimum-intel's folders
    converter = "openvino.convert_model from PyTorch"
    export_options = OpenVinoExportOptions
    quantize_options = Int8QuantizeOptions
    calibrated_methods = tuple(CALIBRATED_RECIPES)
    methods = ("int8-weights", "int4-weights", *calibrated_methods)
    presets = {
        "fastest-cpu": Preset(
            why="the fp32 IR executed in bf16 where the CPU has it (OpenVINO's own CPU default), "
            "held to fp16's gates: UNet 2.4x PyTorch fp32 on sd15 at 38.8 dB (issue 16); end to "
            "end 3.2x on the embedded default at 41.4 dB (bench/results/bench_tiny)",
            runtime_options={"inference_precision": "bf16"},
        ),
        "fastest-cpu-int8": Preset(
            why="hybrid-vae (int8 activations in the UNet's convolutions and the whole VAE "
            "decoder, the MatMuls' weights int8; calibrated at t=1000 on 16 prompts of the "
            "model's own set) executed in bf16: on sd15 UNet 5.00x PyTorch fp32 at 38.3 dB, VAE "
            "decoder 5.15x at 35.0 dB, end to end 5.23x at 32.3 dB on an AVX-512 VNNI CPU "
            "(bench/results/bench_sd15_openvino_int8_vnni; int8-full is faster there, UNet 5.76x, "
            "but at 34.1 dB); on the embedded default end to end 2.93x at 32.1 dB "
            "(bench/results/bench_tiny)",
            method="hybrid-vae",
            runtime_options={"inference_precision": "bf16"},
            calibration_prompts=16,
        ),
    }

    def static_batch(self, options: OpenVinoExportOptions) -> int | None:
        return None if options.dynamic_batch else 1

    def convert(self, job: Conversion) -> ov.Model:
        """`ov.convert_model` from the PyTorch module, with the spec's tensor names and shapes."""
        import openvino as ov
        import torch

        inputs = {name: torch.from_numpy(value) for name, value in job.example.items()}
        with tracing():
            model = ov.convert_model(job.module, example_input=inputs)
        for port, tensor in zip(model.outputs, job.spec.outputs, strict=True):
            port.get_tensor().set_names({tensor.name})
        model.reshape(
            {
                tensor.name: ov.PartialShape([-1 if d == BATCH else d for d in tensor.shape])
                for tensor in job.spec.inputs
            }
        )
        return model

    def save(self, model: ov.Model, path: Path, job: Conversion) -> None:
        import openvino as ov

        # ov.save_model stores fp16 weights unless told not to: an fp32 IR stays fp32 on disk
        ov.save_model(model, path, compress_to_fp16=job.precision == "fp16")

    def write_assets(
        self, staging: Path, pipeline: Any, specs: dict[str, ComponentSpec], options: ExportOptions
    ) -> list[str]:
        """optimum-intel's layout: what `OVDiffusionPipeline.from_pretrained(bundle)` reads."""
        return write_client_files(staging, pipeline, self.layout)

    def quantize_component(self, job: Quantization) -> bool:
        import openvino as ov

        if job.spec.name == "generator" and job.calibration is not None:
            return False  # calibrated per component: the fused generator has no samples
        model = ov.Core().read_model(job.source)
        model = nncf_quantize(
            model,
            job.spec,
            job.method,
            job.calibration,
            job.options.seven_bit_weights,
            weights=job.source.with_suffix(".bin"),
        )
        ov.save_model(model, job.dest, compress_to_fp16=job.precision == "fp16")
        return True


def nncf_quantize(
    model: ov.Model,
    spec: ComponentSpec,
    method: str,
    calibration: CalibrationSet | None,
    seven_bit_weights: bool = True,
    advanced: dict[str, Any] | None = None,
    weights: Path | None = None,
) -> ov.Model:
    """One component's IR quantized by `method` (optimum-intel's definitions for diffusion);
    where activations are quantized, weights are 7-bit everywhere or (NNCF's default) in the
    first layer only, and `advanced` adds NNCF's advanced parameters (bench/unet_int8_levers.py).
    `weights`: the file `model`'s weights are mapped from, when it was read from one."""
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix

    name = spec.name
    recipe = CALIBRATED_RECIPES.get(method, {}).get(name)
    if method == "int8-weights" or recipe == "weights":
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
    overflow_fix = OverflowFix.ENABLE if seven_bit_weights else OverflowFix.FIRST_LAYER
    parameters = {
        "overflow_fix": overflow_fix,
        "disable_bias_correction": name in WITHOUT_BIAS_CORRECTION,
        **(advanced or {}),
    }
    # the ops whose activations stay float: those reading the UNet's noise, and in hybrid mode
    # the MatMuls and embeddings (their weights int8 only)
    ignored = _ops_reading(model, COMPONENTS[name].float_inputs)
    if recipe == "hybrid":
        # optimum-intel's hybrid mode: MatMul/embedding weights int8 (weights only); the
        # convolutions and every activation quantized from calibration data, SmoothQuant off.
        ignored = _ops_with_weights(model) + ignored
        model = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT8_ASYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
        )
        parameters["smooth_quant_alpha"] = -1
    with _statistics_models_lean(model, weights):
        return nncf.quantize(
            model,
            dataset,
            model_type=None if name == "vae_decoder" else nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(**parameters),
        )


@contextmanager
def _statistics_models_lean(model: ov.Model, weights: Path | None) -> Iterator[None]:
    """While NNCF compiles the statistics models it builds from `model`, keep what each one holds
    to what it needs. Neither NNCF nor OpenVINO has an option for either; both were measured on
    sd15 with the same statistics and the same IR, byte for byte:

    - `model`'s own outputs are listed after the statistics' outputs that NNCF adds. OpenVINO's
      CPU plugin runs a graph in the order of its outputs, and NNCF lists the model's own first:
      the whole graph then ran before any statistic was taken, so every activation stayed alive
      until its statistic was (the VAE decoder's statistics model held 8.0 GiB, 1.5 GiB so).
    - Before each compile, the memory freed since is handed back, and so are the pages of the
      mapped `weights` read so far (`drop_mapped_pages`): the compiled model works from a copy of
      its own. The UNet's int8-full compiles twice, before and after SmoothQuant, and its second
      compile began at 5.8 GiB (3.3 GiB of them read pages, 1.2 GiB freed heap): now 1.4 GiB,
      and the quantization's peak 9.0 -> 7.3 GiB."""
    import openvino as ov
    from nncf.openvino.engine import OVNativeEngine

    from instaflow_edge.memory import drop_mapped_pages, return_freed_memory

    own = {result.get_friendly_name() for result in model.get_results()}
    compile_model = OVNativeEngine.__init__

    def compile_lean(engine: OVNativeEngine, graph: ov.Model, *args: Any, **kwargs: Any):
        results = graph.get_results()
        last = [r for r in results if r.get_friendly_name() in own]
        first = [r for r in results if r.get_friendly_name() not in own]
        if first and last:
            graph = ov.Model(
                results=first + last,
                sinks=graph.get_sinks(),
                parameters=graph.get_parameters(),
                name=graph.friendly_name,
            )
        return_freed_memory()
        if weights is not None:
            drop_mapped_pages(weights)
        compile_model(engine, graph, *args, **kwargs)

    OVNativeEngine.__init__ = compile_lean
    try:
        yield
    finally:
        OVNativeEngine.__init__ = compile_model


def _ops_reading(model: ov.Model, inputs: tuple[str, ...]) -> list[str]:
    """The ops that read the named inputs (through type conversions): kept float, as
    `Component.float_inputs` says why."""
    reading = []
    pending = [p.output(0) for p in model.get_parameters() if p.output(0).get_names() & set(inputs)]
    while pending:
        for consumer in pending.pop().get_target_inputs():
            node = consumer.get_node()
            if node.get_type_name() == "Convert":
                pending.append(node.output(0))
            else:
                reading.append(node.get_friendly_name())
    return reading


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
