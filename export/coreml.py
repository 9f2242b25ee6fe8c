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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from instaflow_edge.components import ComponentSpec, TensorSpec, component_specs, generator_spec
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
    IO,
    end_to_end_parity,
    json_safe,
    pytorch_io,
    session_io,
    session_parity,
    warn_below_gates,
)
from instaflow_edge.fused import OneStepGenerator, component_modules
from instaflow_edge.manifest import (
    ComponentEntry,
    Manifest,
    hash_files,
    verify_bundle,
    write_manifest,
)
from instaflow_edge.metrics import tensor_metrics
from instaflow_edge.pipeline import OneStepPipeline

logger = logging.getLogger(__name__)

# component -> Apple's Swift StableDiffusion resource name (the generator is ours)
PACKAGES = {
    "text_encoder": "TextEncoder.mlpackage",
    "unet": "Unet.mlpackage",
    "vae_decoder": "VAEDecoder.mlpackage",
    "generator": "OneStepGenerator.mlpackage",
}
APPLE_TOKENIZER_FILES = ("vocab.json", "merges.txt")
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
ATTENTIONS = ("original", "split-einsum")
MIN_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
METHODS = ("palettize-8", "palettize-6", "palettize-4", "int8-linear", "mixed")
MIXED_BITS = (4, 8)  # mixed: the least sensitive layers at 4 bits, the rest at 8
MIXED_TARGET_PSNR_DB = 40.0  # of the one-step latents (Apple's mixed-bit recipes aim at ~40 dB)
MIXED_SAMPLES = 4  # calibration samples measured per candidate


# -- the modules that are converted -------------------------------------------------------------
# -- the Neural Engine attention variant ----------------------------------------------------------
def _conv1x1(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class SplitEinsumAttnProcessor:
    """Attention in Apple's ANE layout: (B, C, 1, S) tensors, 1x1-conv projections, one einsum
    pair per head (split heads), as in ml-stable-diffusion's `SPLIT_EINSUM` implementation."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
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
def attention_variant(pipeline: OneStepPipeline, attention: str) -> Iterator[None]:
    """Switch the UNet's and VAE's attention to `attention` for the block; restore it after."""
    if attention == "original":
        yield
        return
    saved = {m: m.attn_processors for m in (pipeline.unet, pipeline.vae)}
    try:
        for module in saved:
            module.set_attn_processor(SplitEinsumAttnProcessor())
        yield
    finally:
        for module, processors in saved.items():
            module.set_attn_processor(processors)


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
def resolve_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The Core ML options with their defaults, checked: compute units, attention, target, fused."""
    settings = {
        "compute_units": options.get("compute_units") or "ALL",
        "attention": options.get("attention") or "original",
        "min_target": options.get("min_target") or "iOS16",
        "fused": bool(options.get("fused")),
    }
    for key, allowed in (
        ("compute_units", COMPUTE_UNITS),
        ("attention", ATTENTIONS),
        ("min_target", MIN_TARGETS),
    ):
        if settings[key] not in allowed:
            raise UserError(f"unknown {key} {settings[key]!r}; choose one of {', '.join(allowed)}")
    return settings


def _deployment_target(name: str):
    import coremltools as ct

    # macOS 13/14/15 share the spec versions of iOS 16/17/18
    return getattr(
        ct.target, {"macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18"}.get(name, name)
    )


def batch_one(spec: ComponentSpec) -> ComponentSpec:
    """Core ML models here take batch 1 (static shapes) and int32 token ids, and return the
    generator's uint8 pixels as int32 (Core ML's integer arrays): record what they take and give."""

    def fix(tensor: TensorSpec) -> TensorSpec:
        dtype = "int32" if tensor.dtype in ("int64", "uint8") else tensor.dtype
        return replace(
            tensor, shape=tuple(1 if s == "batch" else s for s in tensor.shape), dtype=dtype
        )

    return replace(spec, inputs=tuple(map(fix, spec.inputs)), outputs=tuple(map(fix, spec.outputs)))


def convert(
    module: torch.nn.Module,
    spec: ComponentSpec,
    example: dict[str, np.ndarray],
    precision: str,
    settings: dict[str, Any],
):
    """Trace `module` on `example` and convert it to an mlprogram with the spec's tensor names."""
    import coremltools as ct

    inputs = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), inputs)
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype)) for t in spec.inputs
        ],
        outputs=[
            ct.TensorType(name=t.name, dtype=np.float32 if t.dtype.startswith("float") else None)
            for t in spec.outputs
        ],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        compute_units=ct.ComputeUnit[settings["compute_units"]],
        minimum_deployment_target=_deployment_target(settings["min_target"]),
        skip_model_load=platform.system() != "Darwin",
    )


def check_examples(reference: IO) -> IO:
    """The PyTorch reference's inputs (`pytorch_io`: one prompt, noise seed 0, t=1000, batch 1)
    as the packages take them: int32 token ids."""
    ids = reference["text_encoder"]["input_ids"].astype(np.int32)
    return {
        **reference,
        "text_encoder": {**reference["text_encoder"], "input_ids": ids},
        "generator": {**reference["generator"], "input_ids": ids},
    }


def run_module(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]):
    """The PyTorch output of `module` on the spec's inputs, as numpy."""
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()


def check_package(
    path: Path,
    module: torch.nn.Module,
    spec: ComponentSpec,
    feeds: dict[str, np.ndarray],
    settings: dict[str, Any],
) -> dict[str, float]:
    """Run the saved package (Core ML on macOS, the MIL interpreter elsewhere) against PyTorch."""
    from instaflow_edge.runtimes.coreml import run_package

    reference = run_module(module, spec, feeds)
    output, executed_on = run_package(path, feeds, settings["compute_units"])
    metrics = tensor_metrics(reference, output[spec.outputs[0].name])
    metrics["executed_on"] = executed_on
    return metrics


class CoreMLExporter(Exporter):
    """Export to Core ML mlprograms laid out as Apple's Swift StableDiffusion resources."""

    target = "coreml"
    quantization_methods = METHODS

    def export(
        self,
        pipeline: OneStepPipeline,
        out_dir: Path,
        precision: str = "fp32",
        options: dict[str, Any] | None = None,
    ) -> Path:
        options = dict(options or {})
        if precision not in PRECISIONS:
            raise UserError(
                f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        settings = resolve_settings(options)
        modules = component_modules(pipeline)
        specs = {name: batch_one(spec) for name, spec in component_specs(pipeline.shapes).items()}
        if settings["fused"]:
            modules["generator"] = OneStepGenerator(pipeline).eval()
            specs["generator"] = batch_one(generator_spec(pipeline.shapes))
        reference = pytorch_io(pipeline)
        examples = check_examples(reference)
        gate = GATES_DB[precision]
        parity: dict[str, Any] = {"against": "PyTorch"}
        with (
            staged_bundle(Path(out_dir), bool(options.get("overwrite"))) as staging,
            coremltools_scratch(),
        ):
            for name in tqdm(specs, desc="export coreml", unit="model"):
                spec, feeds = specs[name], examples[name]
                with attention_variant(pipeline, settings["attention"]):
                    model = convert(modules[name], spec, feeds, precision, settings)
                    if settings["attention"] != "original" and name != "text_encoder":
                        variant = run_module(modules[name], spec, feeds)
                model.save(str(staging / PACKAGES[name]))
                del model
                if settings["attention"] != "original" and name != "text_encoder":
                    check = tensor_metrics(run_module(modules[name], spec, feeds), variant)
                    parity[f"{name}_split_einsum_vs_original_psnr_db"] = check["psnr_db"]
                    logger.info(
                        "coreml %s: split-einsum attention vs original in PyTorch: PSNR %.1f dB",
                        name,
                        check["psnr_db"],
                    )
                # the reference is always the original PyTorch model
                metrics = check_package(
                    staging / PACKAGES[name], modules[name], spec, feeds, settings
                )
                parity["executed_on"] = metrics.pop("executed_on")
                parity[name] = metrics
                logger.info(
                    "coreml %s %s vs PyTorch: max-abs %.3g, PSNR %.1f dB, cosine %.6f (%s)",
                    name,
                    precision,
                    metrics["max_abs"],
                    metrics["psnr_db"],
                    metrics["cosine"],
                    parity["executed_on"],
                )
                if not metrics["finite"] or metrics["psnr_db"] < gate:
                    raise UserError(
                        f"coreml export of {name} failed its parity check: PSNR "
                        f"{metrics['psnr_db']:.1f} dB < {gate:.0f} dB ({precision})"
                    )
            assets = copy_tokenizer(pipeline, staging)
            for file in APPLE_TOKENIZER_FILES:  # Apple's package reads them at the bundle root
                shutil.copy2(staging / "tokenizer" / file, staging / file)
            details = {
                "coreml": {**settings, "converter": "torch.jit.trace", "timestep": "input"},
                "parity": parity,
            }
            manifest = write_bundle_manifest(
                staging,
                pipeline,
                self.target,
                precision,
                {name: (spec, PACKAGES[name], []) for name, spec in specs.items()},
                [*assets, *APPLE_TOKENIZER_FILES],
                details=details,
            )
            from instaflow_edge.runtimes.coreml import CoreMLRuntime

            session = CoreMLRuntime().load(staging)
            end_to_end_parity(self.target, session, reference, parity)
            details["parity"] = json_safe(parity)
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
        """Compress every package's weights (coremltools.optimize.coreml); sizes before and after."""
        if method not in METHODS:
            raise UserError(
                f"unknown Core ML method {method!r}; choose one of {', '.join(METHODS)}"
            )
        options = dict(options or {})
        source = verify_bundle(Path(bundle))
        if source.target != self.target:
            raise UserError(f"bundle {bundle} is for target {source.target!r}, not 'coreml'")
        if source.quantization:
            raise UserError(f"bundle {bundle} is already quantized ({source.quantization})")
        if method == "mixed" and calibration is None:
            raise UserError("--method mixed needs a calibration set (--calibration SET)")
        from instaflow_edge.runtimes.coreml import CoreMLRuntime
        from instaflow_edge.runtimes.mil_interpreter import load_program

        reference = session_io(CoreMLRuntime().load(Path(bundle)))
        record: dict[str, Any] = {"method": method, "components": {}}
        with (
            staged_bundle(Path(out_dir), options.get("overwrite", False)) as staging,
            coremltools_scratch(),
        ):
            copy_assets(Path(bundle), staging, source)
            for name, entry in tqdm(source.components.items(), desc=f"quantize {method}"):
                src, dst = Path(bundle) / entry.file, staging / entry.file
                if method == "mixed" and name == "unet":
                    samples = unet_samples(calibration, options)
                    bits = choose_mixed_bits(src, staging, samples, _target_psnr(options))
                    compress_package(src, dst, "mixed", bits)
                    record["mixed"] = {
                        "target_psnr_db": _target_psnr(options),
                        "one_step_psnr_db": one_step_psnr(load_program(dst), samples),
                        "layers_per_bits": {
                            b: sum(v == b for v in bits.values()) for b in MIXED_BITS
                        },
                        "layer_bits": bits,
                    }
                else:  # mixed: the other packages at 8 bits
                    compress_package(src, dst, "palettize-8" if method == "mixed" else method)
                record["components"][name] = {"bytes_before": _size(src), "bytes_after": _size(dst)}
                logger.info(
                    "coreml %s %s: %.2f MiB -> %.2f MiB",
                    name,
                    method,
                    _size(src) / 2**20,
                    _size(dst) / 2**20,
                )
            before = sum(c["bytes_before"] for c in record["components"].values())
            after = sum(c["bytes_after"] for c in record["components"].values())
            record.update(bytes_before=before, bytes_after=after, size_ratio=before / after)
            manifest = Manifest(
                target=self.target,
                precision=source.precision,
                quantization=method,
                source_model=source.source_model,
                sampling=source.sampling,
                components={
                    name: ComponentEntry.from_files(staging, entry.spec, entry.file)
                    for name, entry in source.components.items()
                },
                assets=hash_files(staging, list(source.assets)),
                details={**source.details, "quantization": record},
            )
            write_manifest(staging, manifest)
            # checked against the source bundle on the same runtime (the MIL interpreter off macOS)
            session = CoreMLRuntime().load(staging)
            parity = session_parity(self.target, session, reference, "source bundle")
            warn_below_gates(parity, None)
            manifest.details["parity"] = json_safe(parity)
            write_manifest(staging, manifest)
        logger.info(
            "coreml %s: %.2f MiB -> %.2f MiB (%.2fx smaller)",
            method,
            before / 2**20,
            after / 2**20,
            before / after,
        )
        return Path(out_dir)


# -- compression --------------------------------------------------------------------------------
def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _target_psnr(options: dict[str, Any]) -> float:
    return float(options.get("target_psnr") or MIXED_TARGET_PSNR_DB)


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
    """PSNR of the one-step latents (noise + v) against the calibration set's PyTorch ones."""
    from instaflow_edge.metrics import tensor_metrics

    reference, candidate = [], []
    for sample in samples:
        feeds = {name: sample[name] for name in program.inputs}
        out = program.run(feeds, constants)["out_sample"].astype(np.float32)
        reference.append(sample["sample"] + sample["out_sample"])
        candidate.append(sample["sample"] + out)
    return tensor_metrics(np.concatenate(reference), np.concatenate(candidate))["psnr_db"]


def unet_samples(calibration: Path, options: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """The first calibration samples of the UNet (inputs and PyTorch output at t=1000)."""
    from instaflow_edge.calibration import load_calibration

    limit = int(options.get("calibration_samples") or MIXED_SAMPLES)
    return list(itertools.islice(load_calibration(calibration).samples("unet"), limit))


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
