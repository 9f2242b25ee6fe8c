"""The Exporter contract and the one flow every target's export and quantization go through.

A target module supplies only what is its own: how to convert a torch module and save it, how to
quantize one saved component, its file layout, its options and the runtime that runs its bundles.
This module does everything else, the same way for every target (DESIGN.md section 3): staging,
example inputs, conversion, saving, the tokenizer, the manifest, the parity check through the
target's own runtime against fixed inputs, the gate policy (shared with `validate`), and the
final rename. A parity miss fails every target's export the same way, with the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from instaflow_edge.atomic import atomic_directory, check_replaceable, scratch_directory
from instaflow_edge.components import COMPONENTS, RECIPE, ComponentSpec, component_specs
from instaflow_edge.errors import UserError
from instaflow_edge.gates import GateFailed, Gates, failure_line, failures_of
from instaflow_edge.manifest import (
    MANIFEST_NAME,
    ComponentEntry,
    Manifest,
    SamplingRecipe,
    hash_files,
    write_manifest,
)
from instaflow_edge.memory import return_freed_memory
from instaflow_edge.metrics import image_metrics, tensor_metrics
from instaflow_edge.options import Options, option
from instaflow_edge.recipe import require_finite, with_generator
from instaflow_edge.runtimes import RuntimeUnavailable, Session, get_runtime

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# the fixed inputs of every export-time parity check: prompts (none in a shipped prompt set, so
# none calibrated on), and noise seeds 0, 1, ... An export checks the first; a quantization all
# of them: its error varies from input to input (one prompt passed int8 bundles at 51 dB that
# then failed validate's four at 24 dB)
CHECK_PROMPTS = [
    "a red circle above a blue square",
    "two small green triangles",
    "a yellow triangle right of a purple circle",
    "three large red squares",
]
TRACE_BATCH = 2  # a graph with a dynamic batch axis is traced at batch 2 and checked at batch 1

IO = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class ExportOptions(Options):
    """Export options of every target."""

    fused: bool = option(
        False,
        "also export the whole one-step recipe as one graph: token ids + noise -> uint8 image",
    )


@dataclass(frozen=True)
class QuantizeOptions(Options):
    """Quantization options of every target."""


@dataclass(frozen=True)
class Int8QuantizeOptions(QuantizeOptions):
    """Quantization options of the targets whose int8 methods multiply uint8 activations by
    int8 weights on the CPU (ONNX Runtime, OpenVINO)."""

    seven_bit_weights: bool = option(
        True,
        "int8 methods that quantize activations write 7-bit weights (ONNX Runtime's "
        "reduce_range, NNCF's overflow fix): CPUs without VNNI (AVX2 only) saturate the 16-bit "
        "sums of uint8 x int8 products, which cost sd15's int8-full UNet 6 dB there (28.6 vs "
        "34.5 dB); off: 8-bit weights (NNCF: 7-bit in the first layer only)",
    )


@dataclass(frozen=True)
class Preset:
    """A recipe a user picks by name (`export --preset NAME`): the precision, export options,
    quantization method and runtime settings a target's bundle is made with. The runtime settings
    go into the manifest, so every load runs it so."""

    why: str  # what was measured, shown in --help and recorded
    precision: str = "fp32"
    export_options: Mapping[str, Any] = field(default_factory=dict)
    method: str | None = None
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    # a calibrated method's calibration set, when none is given: this many prompts of the model's
    # own prompt set (calibration.prompts.model_prompt_set), recorded at t=1000 by the preset
    calibration_prompts: int = 0


@dataclass
class Conversion:
    """One component to convert: its torch module, its spec (in the target's batch, dtypes and
    layouts), example inputs (PyTorch's, as the graph takes them), the precision, options and the
    sampling recipe the bundle states; `notes` collects what the target finds worth recording in
    the manifest."""

    module: Any
    spec: ComponentSpec
    example: dict[str, np.ndarray]
    precision: str
    options: ExportOptions
    sampling: SamplingRecipe
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Quantization:
    """One component to quantize: the source file and where its copy goes, its spec, the method,
    the source bundle's precision, the calibration set when the method takes one, the
    component's inputs and outputs in the source bundle on fixed inputs, the options; `notes`
    collects what is worth recording."""

    source: Path
    dest: Path
    spec: ComponentSpec
    method: str
    precision: str
    calibration: Any
    reference: dict[str, np.ndarray]
    options: QuantizeOptions
    notes: dict[str, Any] = field(default_factory=dict)


class Exporter(ABC):
    """One target: export a model to a bundle, and quantize a bundle into a new bundle.

    Both write into a staging directory renamed into place at the end, so an interrupted run
    leaves no bundle that looks complete.
    """

    target: str
    runtime: str  # the module of instaflow_edge.runtimes that runs this target's bundles
    layout: dict[str, str]  # component -> its file (or package folder) in the bundle
    converter: str  # how graphs are made, recorded in the manifest
    export_options: type[ExportOptions] = ExportOptions
    quantize_options: type[QuantizeOptions] = QuantizeOptions
    methods: tuple[str, ...] = ()  # quantization methods
    calibrated_methods: tuple[str, ...] = ()  # methods that need a calibration set
    quantizes_from: tuple[str, ...] = PRECISIONS  # source precisions its methods accept
    method_precisions: dict[str, str] = {}  # methods that change the precision (ONNX fp16)
    default_precision = "fp32"  # what its ecosystem's own converter writes by default
    dtypes: dict[str, str] = {}  # tensor dtypes this target has no equivalent for -> its own
    tensor_layouts: dict[str, str] = {}  # tensors its graphs take arranged (components.LAYOUTS)
    presets: dict[str, Preset] = {}  # recipes by name, e.g. "fastest-cpu"

    # -- what a target supplies -----------------------------------------------------------------
    def static_batch(self, options: ExportOptions) -> int | None:
        """The batch size its graphs are fixed to, or None for a dynamic batch axis."""
        return None

    @abstractmethod
    def convert(self, job: Conversion) -> Any:
        """The target's model of one component's torch module."""

    @abstractmethod
    def save(self, model: Any, path: Path, job: Conversion) -> None:
        """Write the model at `path` (its layout entry), with whatever files it needs beside it."""

    def quantize_component(self, job: Quantization) -> bool:
        """Write a quantized copy of one component; False leaves the component out of the bundle."""
        raise UserError(f"target {self.target} has no quantization methods")

    def scratch(self) -> AbstractContextManager:
        """A context entered around each component's conversion or quantization (a target whose
        library leaves temporary files keeps them there)."""
        return nullcontext()

    def parity_device(self, options: ExportOptions) -> str:
        """Where the export-time parity check runs the new bundle; a RuntimeUnavailable when
        the options need a device that is not here (asked before any work)."""
        return "cpu"

    def write_assets(
        self, staging: Path, pipeline: Any, specs: dict[str, ComponentSpec], options: ExportOptions
    ) -> list[str]:
        """Files beyond the components and the tokenizer (e.g. the clients' configs); their bundle
        paths. They stay assets (quantization copies them), even inside a component's folder."""
        return []

    def preset(self, name: str) -> Preset:
        """The preset `name` of this target, or one clear error naming the known ones."""
        if name not in self.presets:
            raise UserError(
                f"target {self.target} has no preset {name!r}; its presets: "
                f"{', '.join(self.presets) or 'none'}"
            )
        return self.presets[name]

    # -- the flow -------------------------------------------------------------------------------
    def graph_spec(self, contract: ComponentSpec, options: ExportOptions) -> ComponentSpec:
        """A component's tensors as this target's graph takes them: its batch, dtypes, layouts."""
        batch = self.static_batch(options)
        return contract.with_batch(batch).with_dtypes(self.dtypes).with_layouts(self.tensor_layouts)

    def conversion(
        self, pipeline: Any, name: str, precision: str, options: ExportOptions, traced: IO
    ) -> Conversion:
        """The job of converting one component: its module taking the graph's inputs, and
        example inputs from `traced` (PyTorch's tensors, `pytorch_io`) as the graph takes them."""
        from instaflow_edge.exportable import graph_module

        contract = COMPONENTS[name].spec(pipeline.shapes)
        spec = self.graph_spec(contract, options)
        module = graph_module(COMPONENTS[name].build(pipeline), spec, contract)
        example = spec.to_graph(traced[name])
        return Conversion(module, spec, example, precision, options, sampling_recipe(pipeline))

    def export(
        self,
        pipeline: Any,
        out_dir: Path,
        precision: str | None = None,
        options: ExportOptions | Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        gate_overrides: dict[str, float | None] | None = None,
        runtime_options: Mapping[str, Any] | None = None,
        preset: str | None = None,
        release_model: bool = False,
    ) -> Path:
        """Export every component (at `precision`, by default the target's), check the bundle
        against PyTorch through its runtime (with `runtime_options`, which the manifest records
        for every later load), and commit it only if the gates pass; returns the bundle
        directory. `preset` only records the preset's name. `release_model` frees each of the
        model's modules once its last graph is saved (the check needs only PyTorch's outputs,
        computed first), for a caller done with the model: the next conversion and the check's
        runtime then do not sit beside weights no longer needed."""
        options = self.export_options.coerce(options)
        runtime_options = dict(runtime_options or {})
        get_runtime(self.runtime).options.from_mapping(runtime_options)  # checked before work
        precision = precision or self.default_precision
        check_out(out_dir, overwrite)
        if precision not in PRECISIONS:
            raise UserError(
                f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        gates = Gates.for_bundle(precision, None, gate_overrides, runtime_options)
        device = self.parity_device(options)  # before any work: it refuses a device not here
        batch = self.static_batch(options)
        specs = {
            name: self.graph_spec(contract, options)
            for name, contract in component_specs(pipeline.shapes, fused=options.fused).items()
        }
        reference = pytorch_io(pipeline, 1)
        traced = reference if batch == 1 else pytorch_io(pipeline, batch or TRACE_BATCH)
        source_model = {"id": pipeline.source, "sha256": pipeline.fingerprint()}
        # each of the model's modules is freed after the last graph that holds its weights
        last_graph = {module: name for name in specs for module in COMPONENTS[name].weights}
        notes: dict[str, dict[str, Any]] = {}
        with staged_bundle(Path(out_dir), overwrite) as staging:
            for name in tqdm(specs, desc=f"export {self.target}", unit="graph"):
                job = self.conversion(pipeline, name, precision, options, traced)
                notes[name] = job.notes
                path = staging / self.layout[name]
                path.parent.mkdir(parents=True, exist_ok=True)
                with self.scratch():
                    model = self.convert(job)
                    self.save(model, path, job)
                    del model, job  # the job holds the module: free both before the next
                if release_model:
                    pipeline.release_weights([m for m, last in last_graph.items() if last == name])
                return_freed_memory()
            assets = copy_tokenizer(pipeline, staging)
            assets += self.write_assets(staging, pipeline, specs, options)
            manifest = Manifest(
                target=self.target,
                runtime=self.runtime,
                precision=precision,
                source_model=source_model,
                sampling=sampling_recipe(pipeline),
                components=self._entries(staging, specs, assets),
                assets=hash_files(staging, assets),
                runtime_options=runtime_options,
                details={
                    "converter": self.converter,
                    "options": options.to_dict(),
                    "preset": preset,
                    "notes": {name: found for name, found in notes.items() if found},
                },
            )
            write_manifest(staging, manifest)
            self._check(staging, manifest, reference, "PyTorch", gates, device)
        return_freed_memory()  # the caller goes on with the model (bench): not beside our garbage
        return Path(out_dir)

    def quantize(
        self,
        bundle: Path,
        out_dir: Path,
        method: str,
        calibration: Path | None = None,
        options: QuantizeOptions | Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        gate_overrides: dict[str, float | None] | None = None,
        preset: str | None = None,
    ) -> Path:
        """Write a quantized copy of `bundle` to `out_dir`, checked against the source bundle
        through the runtime and committed only if the gates pass; returns it. The copy keeps the
        source's recorded runtime options; `preset` only records the preset's name."""
        options = self.quantize_options.coerce(options)
        if method not in self.methods:
            raise UserError(
                f"unknown method {method!r} for target {self.target}; choose one of "
                f"{', '.join(self.methods)}"
            )
        check_out(out_dir, overwrite)
        bundle = Path(bundle)
        source = load_for_check(self.runtime, bundle, "cpu")
        manifest = source.manifest
        if manifest.quantization is not None:
            raise UserError(f"bundle {bundle} is already quantized ({manifest.quantization})")
        if manifest.precision not in self.quantizes_from:
            raise UserError(
                f"bundle {bundle} is {manifest.precision}: {self.target} quantizes "
                f"{' or '.join(self.quantizes_from)} exports"
            )
        calibration_set = self._calibration(method, calibration, manifest)
        precision = self.method_precisions.get(method, manifest.precision)
        gates = Gates.for_bundle(precision, method, gate_overrides, manifest.runtime_options)
        reference = session_io(source, len(CHECK_PROMPTS))
        del source  # a bundle's worth of memory, not needed beside the quantizer
        return_freed_memory()
        notes: dict[str, dict[str, Any]] = {}
        with staged_bundle(Path(out_dir), overwrite) as staging:
            copy_assets(bundle, staging, manifest)
            specs = {}
            for name, entry in tqdm(manifest.components.items(), desc=method, unit="graph"):
                dest = staging / entry.file
                dest.parent.mkdir(parents=True, exist_ok=True)
                job = Quantization(
                    bundle / entry.file,
                    dest,
                    entry.spec,
                    method,
                    manifest.precision,
                    calibration_set,
                    reference[name],
                    options,
                )
                notes[name] = job.notes
                with self.scratch():
                    kept = self.quantize_component(job)
                if kept:
                    specs[name] = entry.spec
                else:
                    logger.warning("%s: %s is left out of the quantized bundle", method, name)
            components = self._entries(staging, specs, list(manifest.assets))
            details: dict[str, Any] = {
                "converter": manifest.details.get("converter"),
                "source_bundle": str(bundle),
                "source_options": manifest.details.get("options", {}),
                "options": options.to_dict(),
                "preset": preset,
                "notes": {name: found for name, found in notes.items() if found},
                "sizes": sizes(bundle, manifest.components, staging, components),
            }
            if calibration_set is not None:
                details["calibration"] = {
                    "set": str(calibration),
                    "samples": len(calibration_set),
                }
            quantized = dataclasses.replace(
                manifest,
                precision=precision,
                quantization=method,
                components=components,
                assets=hash_files(staging, list(manifest.assets)),
                details=details,
            )
            write_manifest(staging, quantized)
            self._check(staging, quantized, reference, "source bundle", gates, "cpu")
        ratio = details["sizes"]["ratio"]
        logger.info("%s %s: %.2fx smaller than %s", self.target, method, ratio, bundle)
        return Path(out_dir)

    def export_preset(
        self,
        pipeline: Any,
        out_dir: Path,
        name: str,
        options: ExportOptions | None = None,
        *,
        overwrite: bool = False,
        gate_overrides: dict[str, float | None] | None = None,
        calibration: Path | None = None,
        release_model: bool = False,
    ) -> Path:
        """Make the bundle of preset `name`: export at its precision with its export options
        (`options` instead, where given) and runtime options, then quantize with its method, if
        any, from a source bundle kept beside `out_dir` until the end; returns the bundle. A
        calibrated method reads `calibration`, else a set the preset records from the model's
        own prompts beside the source. `release_model` as in `export`."""
        preset = self.preset(name)
        options = self.export_options.coerce(preset.export_options if options is None else options)
        made = {
            "runtime_options": preset.runtime_options,
            "preset": name,
            "release_model": release_model,
        }
        if calibration is not None and preset.method not in self.calibrated_methods:
            raise UserError(f"preset {name} is not calibrated: leave out --calibration")
        if preset.method is None:
            return self.export(
                pipeline,
                out_dir,
                preset.precision,
                options,
                overwrite=overwrite,
                gate_overrides=gate_overrides,
                **made,
            )
        out_dir = Path(out_dir)
        check_out(out_dir, overwrite)
        with scratch_directory(out_dir, "source") as scratch:
            if preset.method in self.calibrated_methods and calibration is None:
                from instaflow_edge.calibration.builder import build_calibration
                from instaflow_edge.calibration.prompts import load_prompts, model_prompt_set

                prompts = load_prompts(model_prompt_set(pipeline), preset.calibration_prompts)
                calibration = build_calibration(pipeline, prompts, scratch / "calibration")
            source = self.export(pipeline, scratch / "source", preset.precision, options, **made)
            return self.quantize(
                source,
                out_dir,
                preset.method,
                calibration,
                overwrite=overwrite,
                gate_overrides=gate_overrides,
                preset=name,
            )

    # -- the flow's steps ---------------------------------------------------------------------
    def _entries(
        self, staging: Path, specs: dict[str, ComponentSpec], assets: list[str]
    ) -> dict[str, ComponentEntry]:
        return {
            name: ComponentEntry.from_files(
                staging, spec, self.layout[name], owned_files(staging, self.layout[name], assets)
            )
            for name, spec in specs.items()
        }

    def _calibration(self, method: str, calibration: Path | None, manifest: Manifest):
        if method in self.calibrated_methods and calibration is None:
            raise UserError(
                f"{method} needs --calibration SET (make one with `instaflow-edge calibrate`)"
            )
        if calibration is None:
            return None
        if method not in self.calibrated_methods:
            logger.warning("%s does not use a calibration set: %s is ignored", method, calibration)
            return None
        from instaflow_edge.calibration import load_calibration

        calibration_set = load_calibration(calibration)
        if calibration_set.source_model != manifest.source_model.get("id"):
            raise UserError(
                f"calibration set {calibration} was made from {calibration_set.source_model!r}, "
                f"but the bundle from {manifest.source_model.get('id')!r}"
            )
        calibration_set.check_shapes(
            {name: entry.spec for name, entry in manifest.components.items() if name in RECIPE}
        )
        return calibration_set

    def _check(
        self,
        staging: Path,
        manifest: Manifest,
        reference: IO,
        against: str,
        gates: Gates,
        device: str,
    ) -> None:
        """Parity of the staged bundle through this target's runtime, recorded in the manifest;
        a missed gate raises `GateFailed` (and the staging directory is discarded)."""
        try:
            session = load_for_check(self.runtime, staging, device)
        except RuntimeUnavailable as error:
            logger.warning("parity not checked here: %s", error)
            manifest.details["parity"] = {"skipped": str(error)}
            write_manifest(staging, manifest)
            return
        parity = session_parity(session, reference, against, gates)
        manifest.details["parity"] = parity
        write_manifest(staging, manifest)
        failures = failures_of({**parity["components"], "end_to_end": parity["end_to_end"]})
        if failures:
            raise GateFailed(
                f"{self.target} {manifest.quantization or manifest.precision} bundle missed its "
                f"parity gates against {against}: {failure_line(failures)}"
            )


@contextmanager
def tracing() -> Iterator[None]:
    """Trace a module for conversion: no autograd, and none of torch's TracerWarnings (the shape
    checks in transformers' and diffusers' code that a trace keeps as constants: a bundle's sizes
    are fixed by design, and its parity is checked after conversion)."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# -- bundle files ---------------------------------------------------------------------------------
def check_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing `out_dir` unless asked to replace it, and a folder that is not a bundle
    even then."""
    check_replaceable(Path(out_dir), overwrite, MANIFEST_NAME)


@contextmanager
def staged_bundle(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """The staging directory of a bundle: renamed to `out_dir` only when the block succeeds."""
    with atomic_directory(Path(out_dir), overwrite, MANIFEST_NAME) as staging:
        yield staging


def copy_tokenizer(pipeline: Any, staging: Path) -> list[str]:
    """Save the tokenizer into `tokenizer/` (tokenizer.json, config, vocab.json, merges.txt)."""
    folder = staging / "tokenizer"
    pipeline.tokenizer.save_pretrained(folder)
    pipeline.tokenizer.backend_tokenizer.model.save(str(folder))
    return sorted(p.relative_to(staging).as_posix() for p in folder.iterdir())


def copy_assets(source_bundle: Path, staging: Path, manifest: Manifest) -> None:
    """Copy a bundle's shared assets (tokenizer, ...) into a new bundle being quantized."""
    for relative in manifest.assets:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_bundle / relative, staging / relative)


def owned_files(staging: Path, file: str, assets: list[str]) -> list[str]:
    """The files a component owns beside its main file: everything else in its own folder (an
    ONNX graph's external data, an IR's weights) but the bundle's assets (a client's config.json);
    a package folder is hashed whole anyway."""
    path = staging / file
    if path.is_dir() or path.parent == staging:
        return []
    return sorted(
        p.relative_to(staging).as_posix()
        for p in path.parent.rglob("*")
        if p.is_file() and p != path and p.relative_to(staging).as_posix() not in assets
    )


def _bytes(bundle: Path, entries: dict[str, ComponentEntry]) -> dict[str, int]:
    return {
        name: sum((bundle / file).stat().st_size for file in entry.files)
        for name, entry in entries.items()
    }


def sizes(
    source: Path,
    source_entries: dict[str, ComponentEntry],
    staging: Path,
    entries: dict[str, ComponentEntry],
) -> dict[str, Any]:
    """Bytes per component before and after quantization, the totals and their ratio."""
    before, after = _bytes(source, source_entries), _bytes(staging, entries)
    total_before = sum(before[name] for name in after)
    total_after = sum(after.values())
    return {
        "components": {
            name: {"bytes_before": before[name], "bytes_after": after[name]} for name in after
        },
        "bytes_before": total_before,
        "bytes_after": total_after,
        "ratio": total_before / max(total_after, 1),
    }


# -- fixed inputs and parity -------------------------------------------------------------------------
def load_for_check(runtime: str, bundle: Path, device: str) -> Session:
    """A bundle loaded for a parity check: its three graphs (not the fused generator), with the
    runtime's `check_settings` (less memory, the same numbers) on top of its recorded options."""
    loader = get_runtime(runtime)
    return loader.load(bundle, device, fused=False, **loader.check_settings)


def sampling_recipe(pipeline: Any) -> SamplingRecipe:
    """The recipe a bundle of `pipeline` states: latent shape, scaling factor, image size."""
    return SamplingRecipe(
        latent_shape=list(pipeline.latent_shape),
        vae_scaling_factor=pipeline.scaling_factor,
        image_size=pipeline.image_size,
    )


def pytorch_io(pipeline: Any, batch: int = 1) -> IO:
    """Every component's (and the fused generator's) inputs and outputs from PyTorch on the
    check prompts and noise seeds 0..batch-1."""
    ids = pipeline.tokenize(check_prompts(batch))
    io = pipeline.component_io(ids, pipeline.make_noise(range(batch)))
    for name, tensors in io.items():
        for tensor, value in tensors.items():
            require_finite(value, f"the model's {name}.{tensor} on the check prompt")
    return with_generator(io)


def session_io(session: Session, batch: int = 1) -> IO:
    """The same kind of fixed inputs run through a bundle (the reference of a quantization), one
    prompt at a time: a batch's activations (sd15's attention scores: 0.5 GiB a map per prompt)
    would sit beside the whole bundle, the largest moment of a quantize command."""
    noise = np.random.default_rng(0).standard_normal(
        (batch, *session.recipe.latent_shape), dtype=np.float32
    )
    ids = session.tokenize(check_prompts(batch))
    runs = [session.component_io(ids[i : i + 1], noise[i : i + 1]) for i in range(batch)]
    return with_generator(
        {
            name: {tensor: np.concatenate([run[name][tensor] for run in runs]) for tensor in io}
            for name, io in runs[0].items()
        }
    )


def check_prompts(batch: int) -> list[str]:
    """The first `batch` check prompts, repeated as needed."""
    return [CHECK_PROMPTS[i % len(CHECK_PROMPTS)] for i in range(batch)]


def compare(name: str, expected: np.ndarray, got: np.ndarray, against: str) -> dict[str, Any]:
    """Image metrics for uint8 outputs, tensor metrics otherwise; logged."""
    if got.dtype == np.uint8:
        metrics = image_metrics(expected, got)
        line = f"image PSNR {metrics['image_psnr_db']:.1f} dB"
    else:
        metrics = tensor_metrics(expected, got)
        line = f"tensor PSNR {metrics['psnr_db']:.1f} dB, cosine {metrics['cosine']:.6f}"
    logger.info("%s vs %s: max-abs %.3g, %s", name, against, metrics["max_abs"], line)
    return metrics


def session_parity(session: Session, reference: IO, against: str, gates: Gates) -> dict[str, Any]:
    """Every component of a loaded bundle on the reference's inputs for it, then end to end from
    the same token ids and noise; each part's numbers with the gate checks they pass or fail."""
    components: dict[str, Any] = {}
    for name, spec in session.specs.items():
        output = spec.outputs[0].name
        got = session.run(name, reference[name])[output]
        metrics = compare(name, reference[name][output], got, against)
        checks = (
            gates.image_checks(metrics)
            if got.dtype == np.uint8
            else gates.tensor_checks(name, {output: metrics})
        )
        components[name] = {**metrics, "checks": checks}
    ids, noise = reference["generator"]["input_ids"], reference["generator"]["noise"]
    images = session.generate(ids, noise)
    end_to_end = compare("end to end", reference["generator"]["image"], images, against)
    if "generator" in components:
        fused = session.run("generator", {"input_ids": ids, "noise": noise})["image"]
        vs_three = image_metrics(images, fused)["image_psnr_db"]
        components["generator"]["vs_three_graphs_image_psnr_db"] = vs_three
        logger.info("generator vs the three graphs: image PSNR %.1f dB", vs_three)
    return {
        "against": against,
        "executed_on": session.executed_on,
        "gates": gates.to_dict(),
        "components": components,
        "end_to_end": {**end_to_end, "checks": gates.image_checks(end_to_end)},
    }
