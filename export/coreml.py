"""Core ML target: mlprogram export with Apple's resource names, weight compression, parity checks.

Converter choice (measured with torch 2.13 and coremltools 9.0 on the embedded model): tracing
(`torch.jit.trace`) converts all three components; `torch.export` + `run_decompositions({})`
converts the UNet and the VAE decoder to the same program (same PSNR), but fails on the CLIP text
encoder ("Unsupported fx node alias") and names tensors by its graph, not ours. So: tracing.

Timestep: the UNet keeps `timestep` as an input. Folding 1000 in as a constant gave the same
parity and conversion time and only drops the sin/cos of the time embedding (a negligible part of
the size), while the input keeps the interface of Apple's `Unet.mlpackage` and of our contract.
"""

from __future__ import annotations

import itertools
import logging
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from instaflow_edge.components import ComponentSpec
from instaflow_edge.errors import UserError
from instaflow_edge.export.base import (
    Conversion,
    Exporter,
    ExportOptions,
    Quantization,
    QuantizeOptions,
    tracing,
)
from instaflow_edge.metrics import tensor_metrics
from instaflow_edge.options import option
from instaflow_edge.recipe import decoder_input
from instaflow_edge.runtimes.coreml import COMPUTE_UNITS

if TYPE_CHECKING:  # torch and coremltools load only when a conversion runs
    import torch


logger = logging.getLogger(__name__)

APPLE_TOKENIZER_FILES = ("vocab.json", "merges.txt")
# what an app does with the three packages (the Swift package's pipeline needs a one-step
# scheduler and decoderScaleFactor set to vae_scaling_factor for it)
ONE_STEP_RECIPE = (
    "ids = CLIP BPE (vocab.json, merges.txt) padded to the TextEncoder's length; "
    "text = TextEncoder(ids).last_hidden_state; states = text as (1, D, 1, L); "
    "out = Unet(sample=noise, timestep=[1000], encoder_hidden_states=states); "
    "image = VAEDecoder((noise - out) / vae_scaling_factor), in [-1, 1]"
)
DESCRIPTIONS = {
    "text_encoder": "CLIP text encoder of a one-step InstaFlow model",
    "unet": "One-step InstaFlow UNet: flow prediction (noise - data) at timestep 1000",
    "vae_decoder": "VAE decoder: latents divided by the scaling factor to an image in [-1, 1]",
    "generator": "The whole one-step recipe: token ids and noise to an RGB image (0-255)",
}
TENSOR_DESCRIPTIONS = {
    "input_ids": "CLIP token ids as Float32, padded with the end token",
    "last_hidden_state": "The text encoder's last hidden states (1, L, D)",
    "sample": "Latents: the noise (UNet) or the decoded image in [-1, 1] (VAE decoder)",
    "timestep": "The timestep: 1000, the one-step model's only operating point",
    "encoder_hidden_states": "The text states, channels first (1, D, 1, L)",
    "out_sample": "Flow prediction noise - data: latents = noise - out_sample",
    "latent_sample": "(noise - out_sample) / vae_scaling_factor",
    "noise": "Standard normal latent noise",
    "image": "RGB pixels, 0-255",
}
MIN_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
MIXED_BITS = (4, 8)  # mixed: the least sensitive layers at 4 bits, the rest at 8


@dataclass(frozen=True)
class CoreMLExportOptions(ExportOptions):
    """Core ML export options."""

    compute_units: str = option("ALL", "the compute units the packages ask for", COMPUTE_UNITS)
    attention: str = option(
        "split-einsum",
        "attention layout: split-einsum (Apple's converter's choice for the Neural Engine) or "
        "original",
        ("original", "split-einsum"),
    )
    min_target: str = option("iOS16", "minimum deployment target", MIN_TARGETS)


@dataclass(frozen=True)
class CoreMLQuantizeOptions(QuantizeOptions):
    """Core ML compression options."""

    # Apple's mixed-bit recipes aim at about 40 dB
    target_psnr: float = option(40.0, "mixed: the one-step latents' PSNR to hold, in dB")
    calibration_samples: int = option(4, "mixed: calibration samples measured per candidate")


# -- the modules that are converted -------------------------------------------------------------
# -- the Neural Engine attention variant ----------------------------------------------------------
def _conv1x1(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    import torch.nn.functional as F

    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class SplitEinsumAttnProcessor:
    """Attention in Apple's ANE layout: (B, C, 1, S) tensors, 1x1-conv projections, one einsum
    pair per head (split heads), as in ml-stable-diffusion's `SPLIT_EINSUM` implementation."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        import torch

        if attention_mask is not None:
            raise UserError("split-einsum attention does not support attention masks")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        x = hidden_states.transpose(1, 2).unsqueeze(2)  # (B, C, 1, S)
        ctx = context.transpose(1, 2).unsqueeze(2)
        query, key, value = (
            _conv1x1(x, attn.to_q),
            _conv1x1(ctx, attn.to_k),
            _conv1x1(ctx, attn.to_v),
        )
        head_dim = query.shape[1] // attn.heads
        heads = []
        for q, k, v in zip(
            query.split(head_dim, 1), key.split(head_dim, 1), value.split(head_dim, 1), strict=True
        ):
            weights = (torch.einsum("bchq,bchk->bkhq", q, k) * attn.scale).softmax(dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", weights, v))
        out = _conv1x1(torch.cat(heads, dim=1), attn.to_out[0]).squeeze(2).transpose(1, 2)
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def attention_variant(module: torch.nn.Module, attention: str) -> Iterator[bool]:
    """Switch the attention of every diffusers model inside `module` (UNet, VAE) to `attention`
    for the block and restore it after; yields whether anything was switched."""
    models = [m for m in module.modules() if hasattr(m, "set_attn_processor")]
    if attention == "original" or not models:
        yield False
        return
    saved = {m: m.attn_processors for m in models}
    try:
        for model in saved:
            model.set_attn_processor(SplitEinsumAttnProcessor())
        yield True
    finally:
        for model, processors in saved.items():
            model.set_attn_processor(processors)


@contextmanager
def coremltools_scratch() -> Iterator[None]:
    """Keep coremltools' temporary packages in a private folder, removed when the block ends.

    coremltools writes every converted or compressed model to a temporary .mlpackage that it
    deletes only when the process exits; a UNet's is the size of its weights.
    """
    previous = tempfile.tempdir
    folder = tempfile.mkdtemp(prefix="instaflow-edge-coreml-")
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


# -- conversion ---------------------------------------------------------------------------------
def _deployment_target(name: str):
    import coremltools as ct

    # macOS 13/14/15 share the spec versions of iOS 16/17/18
    return getattr(
        ct.target, {"macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18"}.get(name, name)
    )


def run_module(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]):
    """The PyTorch output of `module` on the spec's inputs, as numpy."""
    import torch

    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()


class CoreMLExporter(Exporter):
    """Core ML mlprograms laid out as Apple's Swift StableDiffusion resources, batch 1.

    Converter choice (measured with torch 2.13 and coremltools 9.0 on the embedded model):
    tracing converts all three components; `torch.export` + `run_decompositions({})` converts the
    UNet and the VAE decoder to the same program, but fails on the CLIP text encoder ("Unsupported
    fx node alias") and names tensors by its graph, not ours. The UNet keeps `timestep` as an
    input: folding 1000 in gave the same parity and only drops the time embedding's sin/cos,
    while the input keeps the interface of Apple's `Unet.mlpackage`.

    Methods compress weights (coremltools.optimize.coreml): palettize-8/6/4, int8-linear, and
    mixed (per-layer 4/8-bit palettes holding --target-psnr on the one-step latents, measured
    through the MIL interpreter on calibration samples at t=1000).
    """

    target = "coreml"
    runtime = "coreml"
    default_precision = "fp16"  # Apple's converter's default; fp32 is one flag away
    layout = {  # Apple's Swift StableDiffusion resource names (the generator is ours)
        "text_encoder": "TextEncoder.mlpackage",
        "unet": "Unet.mlpackage",
        "vae_decoder": "VAEDecoder.mlpackage",
        "generator": "OneStepGenerator.mlpackage",
    }
    converter = "coremltools mlprogram from torch.jit.trace; timestep kept as an input"
    export_options = CoreMLExportOptions
    quantize_options = CoreMLQuantizeOptions
    methods = ("palettize-8", "palettize-6", "palettize-4", "int8-linear", "mixed")
    calibrated_methods = ("mixed",)
    # what Apple's Swift package feeds: token ids as Float32 (TextEncoder.swift), the text states
    # channels first (StableDiffusionPipeline.swift's toHiddenStates); the pixels out as int32
    dtypes = {"int64": "float32", "uint8": "int32"}
    tensor_layouts = {"encoder_hidden_states": "B,D,1,L"}

    def static_batch(self, options: ExportOptions) -> int | None:
        return 1

    def convert(self, job: Conversion) -> Any:
        """Trace the module on the example and convert it to an mlprogram with the spec's names."""
        import coremltools as ct
        import torch

        spec, options = job.spec, job.options
        inputs = tuple(torch.from_numpy(job.example[t.name]) for t in spec.inputs)
        with attention_variant(job.module, options.attention) as variant:
            with tracing():
                traced = torch.jit.trace(job.module, inputs)
            if variant:
                changed = run_module(job.module, spec, job.example)
        if variant:  # the reference stays the original attention: say what the variant costs
            psnr = tensor_metrics(run_module(job.module, spec, job.example), changed)["psnr_db"]
            job.notes["split_einsum_vs_original_psnr_db"] = psnr
            logger.info("%s: split-einsum vs original attention: %.1f dB", spec.name, psnr)
        return ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype))
                for t in spec.inputs
            ],
            outputs=[
                ct.TensorType(
                    name=t.name, dtype=np.float32 if t.dtype.startswith("float") else None
                )
                for t in spec.outputs
            ],
            convert_to="mlprogram",
            compute_precision=(
                ct.precision.FLOAT16 if job.precision == "fp16" else ct.precision.FLOAT32
            ),
            compute_units=ct.ComputeUnit[options.compute_units],
            minimum_deployment_target=_deployment_target(options.min_target),
            skip_model_load=platform.system() != "Darwin",
        )

    def scratch(self) -> Any:
        return coremltools_scratch()

    def save(self, model: Any, path: Path, job: Conversion) -> None:
        """Save with model metadata as Apple's converter writes it (Xcode shows it), and the
        one-step recipe and scaling factor an app needs in the user-defined metadata."""
        from importlib.metadata import version

        name, recipe = job.spec.name, job.sampling
        model.author = "instaflow-edge"
        model.version = version("instaflow-edge")
        model.short_description = DESCRIPTIONS[name]
        for tensor in job.spec.inputs:
            model.input_description[tensor.name] = TENSOR_DESCRIPTIONS[tensor.name]
        for tensor in job.spec.outputs:
            model.output_description[tensor.name] = TENSOR_DESCRIPTIONS[tensor.name]
        model.user_defined_metadata.update(
            {
                "instaflow_edge.component": name,
                "instaflow_edge.timestep": str(recipe.timestep),
                "instaflow_edge.prediction": recipe.prediction,
                "instaflow_edge.vae_scaling_factor": str(recipe.vae_scaling_factor),
                "instaflow_edge.recipe": ONE_STEP_RECIPE,
            }
        )
        model.save(str(path))

    def write_assets(
        self, staging: Path, pipeline: Any, specs: dict[str, ComponentSpec], options: ExportOptions
    ) -> list[str]:
        for file in APPLE_TOKENIZER_FILES:  # Apple's package reads them at the bundle root
            shutil.copy2(staging / "tokenizer" / file, staging / file)
        return list(APPLE_TOKENIZER_FILES)

    def quantize_component(self, job: Quantization) -> bool:
        if job.method == "mixed" and job.spec.name == "unet":
            job.notes["mixed"] = compress_mixed(job)
        else:  # mixed: the other packages at 8 bits
            method = "palettize-8" if job.method == "mixed" else job.method
            compress_package(job.source, job.dest, method)
        return True


# -- compression --------------------------------------------------------------------------------
def _compressor(method: str, nbits: int | None = None):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig

    if method == "int8-linear":
        return OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"
        )
    return OpPalettizerConfig(mode="kmeans", nbits=nbits or int(method.split("-")[1]))


def compress_package(
    src: Path, dst: Path, method: str, layer_bits: dict[str, int] | None = None
) -> None:
    """Compress one saved package's weights; `layer_bits` gives per-layer palette bits for mixed."""
    import coremltools as ct
    from coremltools.optimize.coreml import (
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )

    model = ct.models.MLModel(str(src), skip_model_load=platform.system() != "Darwin")
    if method == "mixed":
        config = OptimizationConfig(
            op_name_configs={name: _compressor(method, bits) for name, bits in layer_bits.items()}
        )
    else:
        config = OptimizationConfig(global_config=_compressor(method))
    compress = linear_quantize_weights if method == "int8-linear" else palettize_weights
    compress(model, config).save(str(dst))


def one_step_psnr(program, samples: list[dict[str, np.ndarray]], constants=None) -> float:
    """PSNR of the one-step latents against the calibration set's PyTorch ones."""
    reference, candidate = [], []
    for sample in samples:
        feeds = {name: sample[name] for name in program.inputs}
        out = program.run(feeds, constants)["out_sample"].astype(np.float32)
        reference.append(decoder_input(sample["sample"], sample["out_sample"], 1.0))
        candidate.append(decoder_input(sample["sample"], out, 1.0))
    return tensor_metrics(np.concatenate(reference), np.concatenate(candidate))["psnr_db"]


def compress_mixed(job: Quantization) -> dict[str, Any]:
    """Palettize the UNet with per-layer bits holding the target PSNR; what was chosen."""
    from instaflow_edge.runtimes.mil_interpreter import load_program

    source, dest, options = job.source, job.dest, job.options
    recorded = itertools.islice(job.calibration.samples("unet"), options.calibration_samples)
    samples = [{**sample, **job.spec.to_graph(sample)} for sample in recorded]  # graph layout
    bits = choose_mixed_bits(source, dest.parent, samples, options.target_psnr)
    compress_package(source, dest, "mixed", bits)
    return {
        "target_psnr_db": options.target_psnr,
        "one_step_psnr_db": one_step_psnr(load_program(dest), samples),
        "layers_per_bits": {b: sum(v == b for v in bits.values()) for b in MIXED_BITS},
        "layer_bits": bits,
    }


def choose_mixed_bits(
    unet: Path, work: Path, samples: list[dict[str, np.ndarray]], target: float
) -> dict[str, int]:
    """Per-layer palette bits that hold the target PSNR of the one-step latents.

    Palettize the whole UNet once per candidate width (4 and 8 bits), rank layers by their 4-bit
    weight error, then binary-search how many of the most sensitive layers stay at 8 bits,
    measuring each candidate through the MIL interpreter on the calibration set at t=1000.
    """
    from instaflow_edge.runtimes.mil_interpreter import load_program

    base = load_program(unet)
    decompressed = {}  # bits -> base value name -> decompressed weight
    for bits in MIXED_BITS:
        path = work / f".mixed-{bits}.mlpackage"
        compress_package(unet, path, f"palettize-{bits}")
        program = load_program(path)
        decompressed[bits] = {  # a palettized weight is named after the const op it replaced
            base.const_ops[name.removesuffix("_palettized")]: program.constants[name]
            for name in program.decompressed
        }
        shutil.rmtree(path)
    low, high = MIXED_BITS

    def sensitivity(name: str) -> float:
        weight = base.constants[name].astype(np.float32)
        error = np.linalg.norm(decompressed[low][name] - weight)
        return float(error / max(np.linalg.norm(weight), 1e-12))

    layers = sorted(decompressed[low], key=sensitivity, reverse=True)

    def measure(keep: int) -> float:
        constants = {n: decompressed[high if i < keep else low][n] for i, n in enumerate(layers)}
        return one_step_psnr(base, samples, constants)

    lo, hi = 0, len(layers)  # invariant: keeping `hi` layers at 8 bits meets the target
    if measure(hi) < target:
        raise UserError(
            f"mixed: even {high}-bit palettization of every layer misses {target:.1f} dB; "
            "lower --target-psnr or use palettize-8"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    logger.info(
        "coreml mixed: %d of %d layers at %d bits, the rest at %d", hi, len(layers), high, low
    )
    op_names = {value: op for op, value in base.const_ops.items()}
    return {op_names[n]: high if i < hi else low for i, n in enumerate(layers)}
