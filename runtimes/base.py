"""The Runtime contract: load a bundle on a device, run one component, or generate end to end.

Imports only numpy, `tokenizers` and the standard library (never torch): edge boxes use this.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instaflow_edge.components import ComponentSpec, ModelShapes, component_specs
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest, SamplingRecipe, verify_bundle
from instaflow_edge.options import Options, option
from instaflow_edge.recipe import one_step, require_finite, to_uint8

logger = logging.getLogger(__name__)


# (component, tensor) -> its dtype in the contract: what every session returns, whatever the
# graph computes in, and what the PyTorch reference takes, whatever a graph takes
CONTRACT_DTYPES = {
    (name, tensor.name): tensor.dtype
    for name, spec in component_specs(ModelShapes(1, 1, 1, 1, 1), fused=True).items()
    for tensor in (*spec.inputs, *spec.outputs)
}


# what a graph declares for one tensor: its shape (None for a dynamic axis) and numpy dtype name;
# None for either where the graph does not say
GraphTensor = tuple[tuple[int | None, ...] | None, str | None]


class RuntimeUnavailable(UserError):
    """This runtime cannot run here: not installed, wrong OS, or the device is absent."""


def thread_count(threads: int) -> int:
    """A runtime's `threads` option, at least 1 and at most the CPUs this process may run on:
    more threads than CPUs only wait for each other, and ONNX Runtime starts every thread it is
    given (threads=100000 had not started in 5 minutes)."""
    if threads < 1:
        raise UserError("threads must be at least 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and threads > cpus:
        logger.warning("threads=%d is more than the %d CPUs here: running %d", threads, cpus, cpus)
        return cpus
    return threads


@dataclass(frozen=True)
class RuntimeOptions(Options):
    """Options of every runtime."""

    fused: bool = option(True, "generate with the bundle's fused one-graph generator if it has one")
    reduce_memory: bool = option(
        False,
        "hold one component's graph at a time: each loads when it runs and the one before is "
        "released (Apple's reduceMemory); the peak is the largest graph's, not the sum, for a "
        "load per component per generation",
    )


class Session(ABC):
    """A loaded bundle (or reference model) that runs components with numpy in and out.

    `executed_on` names what actually ran (e.g. "CPUExecutionProvider" after a CUDA request
    fell back), never just what was asked for.
    """

    runtime: str
    executed_on: str
    recipe: SamplingRecipe
    options: RuntimeOptions

    def settings(self) -> dict[str, object]:
        """What this session runs with, for reports: the options asked for and what ran."""
        return {"runtime": self.runtime, "executed_on": self.executed_on, **self.options.to_dict()}

    @abstractmethod
    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one component ("text_encoder", "unet", "vae_decoder") by its tensor names."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids (B, L) int64, padded/truncated to the model's length, as the reference does."""

    def component_io(
        self, input_ids: np.ndarray, noise: np.ndarray
    ) -> dict[str, dict[str, np.ndarray]]:
        """Every component's inputs and outputs for one one-step generation (`recipe.one_step`),
        computed by this session, as `OneStepPipeline.component_io` gives them."""
        noise = noise.astype(np.float32)
        return one_step(
            lambda ids: self.run("text_encoder", {"input_ids": ids})["last_hidden_state"],
            lambda sample, timestep, states: self.run(
                "unet", {"sample": sample, "timestep": timestep, "encoder_hidden_states": states}
            )["out_sample"].astype(np.float32),
            lambda latent_sample: self.run("vae_decoder", {"latent_sample": latent_sample})[
                "sample"
            ],
            input_ids.astype(np.int64),
            noise,
            np.full((noise.shape[0],), self.recipe.timestep, dtype=np.float32),
            np.float32(self.recipe.vae_scaling_factor),
        )

    def prepare(self, component: str, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """A call that runs `component` on `feeds`, for timing; a runtime that binds inputs on
        its device overrides this so that the call excludes host copies."""
        return lambda: self.run(component, feeds)

    def prepare_generate(self, input_ids: np.ndarray, noise: np.ndarray) -> Callable[[], object]:
        """A call that generates from these inputs, for timing (`prepare`'s, end to end)."""
        return lambda: self.generate(input_ids, noise)

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """The one-step recipe from components: uint8 NHWC images from token ids and noise;
        NaN or Inf in the noise or the decoded image is a NonFiniteError."""
        require_finite(noise, "the noise")
        decoded = self.component_io(input_ids, noise)["vae_decoder"]["sample"]
        return to_uint8(require_finite(decoded, f"the {self.runtime} decoded image"))


class BundleSession(Session):
    """A session over an exported bundle: it tokenizes with the bundle's own `tokenizer.json`
    and, when the bundle holds a fused generator and it was asked for, generates in one call.

    A runtime's session loads each component's graph with `load_graph`; `loaded` holds them,
    each checked against the manifest as it loads: all of them from the start, or with the
    option `reduce_memory` one at a time, loaded when it runs.
    """

    def attach_bundle(self, bundle: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        """Keep the manifest, its sampling recipe, component specs and options; load the tokenizer."""
        self.bundle = bundle
        self.loaded: dict[str, Any] = {}
        self.manifest = manifest
        self.options = options
        self.fused = options.fused and "generator" in manifest.components
        self.recipe = manifest.sampling
        self.specs: dict[str, ComponentSpec] = {
            name: entry.spec for name, entry in manifest.components.items()
        }
        length = int(manifest.components["text_encoder"].spec.inputs[0].shape[-1])
        self.tokenizer = load_bundle_tokenizer(bundle, length)

    @abstractmethod
    def load_graph(self, component: str, path: Path) -> Any:
        """One component's graph loaded from its file (a session, a compiled model...)."""

    def load_graphs(self) -> None:
        """Load every graph now; with `reduce_memory` only the first (errors show at load, and
        the session can say what it runs on), the others when they run."""
        for component in self.specs:
            self.graph(component)
            if self.options.reduce_memory:
                break

    def graph(self, component: str) -> Any:
        """`component`'s loaded graph, loaded on first use and checked against the manifest;
        with `reduce_memory`, the graph held before is released first."""
        if component not in self.loaded:
            if self.options.reduce_memory:
                self.loaded.clear()
            graph = self.load_graph(
                component, self.bundle / self.manifest.components[component].file
            )
            self.check_graph(component, graph)  # a graph that disagrees is never held
            self.loaded[component] = graph
        return self.loaded[component]

    def tokenize(self, prompts: str | list[str]) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not prompt.strip() for prompt in prompts):
            raise UserError("empty prompt: describe the image to generate")
        encodings = self.tokenizer.encode_batch(prompts)
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:
                logger.warning(
                    "prompt longer than %d tokens: truncated: %r", len(encoding.ids), prompt
                )
        return np.array([encoding.ids for encoding in encodings], dtype=np.int64)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a component by its tensor names: inputs arranged and cast as the graph takes them,
        outputs back to the contract's (float32; uint8 pixels); a static batch-1 graph fed a batch
        runs per sample."""
        if component not in self.specs:
            raise UserError(
                f"this bundle has no component {component!r}; it has {', '.join(self.specs)}"
            )
        spec = self.specs[component]
        missing = [t.name for t in spec.inputs if t.name not in feeds]
        if missing:
            raise UserError(f"{component} needs input(s) {', '.join(missing)}")
        inputs = spec.to_graph(feeds)
        batch = len(next(iter(inputs.values())))
        if spec.static_batch == 1 and batch > 1:
            parts = [
                self.infer(component, {k: v[i : i + 1] for k, v in inputs.items()})
                for i in range(batch)
            ]
            outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        else:
            outputs = self.infer(component, inputs)
        return {
            name: value.astype(CONTRACT_DTYPES[component, name])
            for name, value in spec.to_contract(outputs).items()
        }

    @abstractmethod
    def infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on inputs already in its dtypes and batch; outputs by tensor name."""

    @abstractmethod
    def graph_tensors(self, component: str, graph: Any) -> dict[str, GraphTensor] | None:
        """`component`'s loaded graph's own inputs and outputs by name, or None where the format keeps no
        signature (then the manifest's word is all there is)."""

    def check_graph(self, component: str, loaded: Any) -> None:
        """Refuse a manifest whose tensors disagree with the graph it describes: names, dtypes,
        ranks and every fixed axis (a manifest edited by hand would otherwise crash mid-run)."""
        graph = self.graph_tensors(component, loaded)
        if graph is None:
            return
        spec, bundle = self.specs[component], self.bundle
        declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
        if set(graph) != set(declared):
            raise UserError(
                f"bundle {bundle}: {component}'s graph has tensors {sorted(graph)}, its "
                f"manifest declares {sorted(declared)}"
            )
        for name, (shape, dtype) in graph.items():
            tensor = declared[name]
            if dtype is not None and dtype != tensor.dtype:
                raise UserError(
                    f"bundle {bundle}: {component}.{name} is {tensor.dtype} in the manifest "
                    f"but {dtype} in the graph"
                )
            if shape is not None and not _shapes_agree(shape, tensor.shape):
                raise UserError(
                    f"bundle {bundle}: {component}.{name} has shape {list(tensor.shape)} in "
                    f"the manifest but {[d if d is not None else '?' for d in shape]} in "
                    "the graph"
                )

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """With a fused generator (and option fused): one graph call; else three graphs."""
        if self.fused:  # its weights passed the export's finite checks; the noise is new
            noise = require_finite(noise, "the noise")
            return self.run("generator", {"input_ids": input_ids, "noise": noise})["image"]
        return super().generate(input_ids, noise)


class Runtime(ABC):
    """One runtime (ONNX Runtime, OpenVINO, Core ML, the PyTorch reference).

    A runtime module in `instaflow_edge.runtimes` defines one subclass; a bundle's manifest names
    the module (`runtime`), and `runtimes.load_session` finds the class there.
    """

    name: str  # its module's name in instaflow_edge.runtimes, as manifests record it
    target: str  # the bundle target it runs
    options: type[RuntimeOptions] = RuntimeOptions
    # what the export-time parity check loads a bundle with on top of its recorded options:
    # settings that lower the check's memory and never change a number it computes (one graph
    # held at a time: the check's peak is the UNet's, not the whole bundle's beside it)
    check_settings: Mapping[str, Any] = {"reduce_memory": True}

    def load(
        self,
        bundle: Path,
        device: str = "cpu",
        options: RuntimeOptions | Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> Session:
        """Verify every file of the bundle against its manifest and open it on `device` (a
        bundle session checks each graph's tensors against the manifest's as it loads it).

        `options` is this runtime's options class (taken whole), or a mapping of its fields laid
        over the manifest's `runtime_options` (the settings the bundle was made to run with);
        keyword `settings` are fields too, on top (`load(bundle, "cpu", fused=False)`).
        """
        bundle = Path(bundle)
        manifest = self.verify(bundle)
        if not isinstance(options, RuntimeOptions):
            options = {**manifest.runtime_options, **(options or {})}
        options = self.options.coerce(options, **settings)
        return self.open(bundle, manifest, device, options)

    @abstractmethod
    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: RuntimeOptions
    ) -> Session:
        """Open a verified bundle on `device` with these options."""

    def why_not_timed(self, device: str) -> str | None:
        """Why this runtime's latencies on `device` would not measure that device here (bench
        then skips its bundles, saying why), or None."""
        return None

    def verify(self, bundle: Path) -> Manifest:
        manifest = verify_bundle(bundle)
        if manifest.target != self.target:
            raise UserError(
                f"bundle {bundle} is for target {manifest.target!r}, not {self.target!r}"
            )
        return manifest


def _shapes_agree(graph: tuple[int | None, ...], declared: tuple[int | str, ...]) -> bool:
    """Same rank, and every axis the graph fixes is the declared one (a dynamic declared axis,
    such as "batch", needs a dynamic graph axis)."""
    if len(graph) != len(declared):
        return False
    return all(g is None or g == d for g, d in zip(graph, declared, strict=True))


def load_bundle_tokenizer(bundle: Path, max_length: int):
    """The bundle's `tokenizer/tokenizer.json` with the reference's padding and truncation."""
    import json

    from tokenizers import Tokenizer

    folder = Path(bundle) / "tokenizer"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    pad_token = config.get("pad_token") or config.get("eos_token")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(
        length=max_length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token
    )
    return tokenizer
