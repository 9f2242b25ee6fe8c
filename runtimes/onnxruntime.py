"""ONNX Runtime: run an ONNX bundle on the CUDA provider when asked and present, else on the CPU.

Imports only numpy, onnxruntime, tokenizers and the standard library (never torch): edge boxes
run bundles with this module, and a test imports it with torch blocked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instaflow_edge.components import BATCH
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest
from instaflow_edge.options import option
from instaflow_edge.runtimes.base import (
    BundleSession,
    GraphTensor,
    Runtime,
    RuntimeOptions,
    RuntimeUnavailable,
    Session,
    thread_count,
)

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
}


@dataclass(frozen=True)
class OnnxRuntimeOptions(RuntimeOptions):
    """ONNX Runtime options."""

    threads: int | None = option(None, "intra-op threads per graph (default: ONNX Runtime's)")
    spinning: bool = option(
        False,
        "let idle threads spin for work (off by default: the three graphs run one after another, "
        "and a spinning session took the CPU from the next one)",
    )
    graph_optimization: str = option(
        "all", "ONNX Runtime's graph optimisation level at load", GRAPH_OPTIMIZATIONS
    )
    memory_arena: bool = option(
        True,
        "keep freed activations in ONNX Runtime's CPU memory arena for the next call (off: sd15 "
        "holds up to 2.7 GiB less, and its UNet runs 13% slower, its VAE decoder 8%)",
    )
    cuda_graph: bool = option(
        False,
        "capture each graph as a CUDA graph on its first call and replay it after (ONNX "
        "Runtime's enable_cuda_graph: no per-kernel launch cost); each graph then keeps one "
        "set of input and output buffers, so one input shape per session; CUDA only: on the CPU "
        "the buffers are kept and nothing is captured",
    )


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeUnavailable(
            "onnxruntime is not installed: pip install 'instaflow-edge[runtime]'"
        ) from error
    return onnxruntime


# a one-node ONNX model (Identity, float[1], opset 17; written by onnx.helper) to probe providers
PROBE_MODEL = bytes.fromhex(
    "080812003a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a0808011204"
    "0a020801620f0a0179120a0a08080112040a02080142040a001011"
)


@functools.cache
def cuda_available() -> bool:
    """Whether the CUDA provider really loads here: a GPU build lists it even where the CUDA
    libraries or the GPU are missing, and then falls back to the CPU one session at a time."""
    ort = _onnxruntime()
    if CUDA not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)  # the failed load's log lines would read as our errors
    try:
        probe = ort.InferenceSession(PROBE_MODEL, providers=[CUDA, CPU])
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default
    return probe.get_providers()[0] == CUDA


def providers_for(device: str) -> list[str]:
    """The execution providers to ask for: CUDA first when asked for and built in, else the CPU."""
    if device.startswith("cuda"):
        if cuda_available():
            return [CUDA, CPU]
        logger.warning(
            "ONNX Runtime's CUDA provider does not load here (no GPU build, GPU or CUDA "
            "libraries): running on the CPU provider"
        )
        return [CPU]
    if device != "cpu":
        raise UserError(f"unknown device {device!r} for onnxruntime: use cpu or cuda")
    return [CPU]


def _session_options(ort, component: str, options: OnnxRuntimeOptions):
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    level = ort.GraphOptimizationLevel
    session_options.graph_optimization_level = {
        "disable": level.ORT_DISABLE_ALL,
        "basic": level.ORT_ENABLE_BASIC,
        "extended": level.ORT_ENABLE_EXTENDED,
        "all": level.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    if options.threads is not None:
        session_options.intra_op_num_threads = thread_count(options.threads)
    if component != "generator" and not options.spinning:
        # tiny model, 2 cores: end to end 23 ms with spinning threads, 15 ms without
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.enable_cpu_mem_arena = options.memory_arena
    return session_options


@dataclass
class KeptBinding:
    """One graph's binding to buffers kept across calls (cuda_graph)."""

    binding: object
    inputs: dict[str, object]  # input name -> its OrtValue on the session's device


class OnnxSession(BundleSession):
    """The bundle's graphs, one InferenceSession each, fed through IO binding.

    On CUDA the inputs are bound on the GPU once, so `prepare(...)` returns a call whose timing
    excludes host copies; `run` adds the copies back for parity checks.
    """

    runtime = "onnxruntime"

    def __init__(
        self, bundle: Path, manifest: Manifest, providers: list[str], options: OnnxRuntimeOptions
    ):
        self.providers = providers
        self.attach_bundle(bundle, manifest, options)
        self.load_graphs()
        ran = {session.get_providers()[0] for session in self.loaded.values()}
        self.executed_on = CUDA if ran == {CUDA} else CPU
        if providers[0] == CUDA and self.executed_on != CUDA:
            logger.warning("CUDA was asked for but the CUDA provider did not load: running on CPU")
        if options.cuda_graph and self.executed_on != CUDA:
            logger.warning("cuda_graph needs the CUDA provider: on the CPU nothing is captured")
        threads = {s.get_session_options().intra_op_num_threads for s in self.loaded.values()}
        self.threads = (threads.pop() or None) if len(threads) == 1 else None
        self._kept: dict[str, KeptBinding] = {}  # cuda_graph: each graph's one set of buffers

    def load_graph(self, component: str, path: Path):
        ort = _onnxruntime()
        providers: list = list(self.providers)
        if not (self.options.cuda_graph and providers[0] == CUDA):
            return ort.InferenceSession(
                str(path), _session_options(ort, component, self.options), providers=providers
            )
        providers[0] = (CUDA, {"enable_cuda_graph": "1"})
        try:
            return ort.InferenceSession(
                str(path), _session_options(ort, component, self.options), providers=providers
            )
        except Exception as error:  # ONNX Runtime refuses a graph not wholly on the CUDA provider
            raise UserError(
                f"{component}: ONNX Runtime cannot capture this graph as a CUDA graph ({error}); "
                "run it without --runtime-option cuda_graph=true"
            ) from error

    @property
    def _device(self) -> str:
        return "cuda" if self.executed_on == CUDA else "cpu"

    def prepare(self, component: str, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """Bind `feeds` on the session's device; the returned call runs the graph, no host copies.
        With cuda_graph, into the graph's one set of buffers (a captured graph replays on the
        addresses it was captured with)."""
        if component not in self.specs:
            raise UserError(f"this bundle has no component {component!r}")
        for spec in self.specs[component].inputs:
            if spec.name not in feeds:
                raise UserError(f"{component} needs input {spec.name!r}")
        values = {
            spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            for spec in self.specs[component].inputs
        }
        session = self.graph(component)
        if self.options.cuda_graph:
            binding = self._kept_binding(component, values).binding
        else:
            ort = _onnxruntime()
            binding = session.io_binding()
            for name, value in values.items():
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
                )
            for spec in self.specs[component].outputs:
                binding.bind_output(spec.name, self._device)

        def call() -> object:
            session.run_with_iobinding(binding)
            return binding

        return call

    def infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.prepare(component, inputs)()
        names = [spec.name for spec in self.specs[component].outputs]
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def _kept_binding(self, component: str, values: dict[str, np.ndarray]) -> KeptBinding:
        """The graph's one binding, its input buffers refilled with `values`; made on the first
        call, with output buffers of the spec's shapes at these inputs' batch size."""
        kept = self._kept.get(component)
        if kept is None:
            ort = _onnxruntime()
            batch = len(next(iter(values.values())))
            binding = self.graph(component).io_binding()
            inputs = {}
            for name, value in values.items():  # buffers of their own: never the caller's array
                inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    value.shape, value.dtype, self._device, 0
                )
                inputs[name].update_inplace(value)
                binding.bind_ortvalue_input(name, inputs[name])
            for spec in self.specs[component].outputs:
                shape = [batch if d == BATCH else d for d in spec.shape]
                binding.bind_ortvalue_output(
                    spec.name,
                    ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, np.dtype(spec.dtype), self._device, 0
                    ),
                )
            kept = self._kept[component] = KeptBinding(binding, inputs)
            return kept
        for name, value in values.items():
            if list(value.shape) != kept.inputs[name].shape():
                raise UserError(
                    f"with cuda_graph, {component} runs the input shapes of its first call: "
                    f"{name} was {kept.inputs[name].shape()}, now {list(value.shape)} (load "
                    "another session for another batch size)"
                )
            kept.inputs[name].update_inplace(value)
        return kept

    def graph_tensors(self, component: str, session) -> dict[str, GraphTensor]:
        return {
            node.name: (
                tuple(d if isinstance(d, int) else None for d in node.shape),
                ONNX_TYPES.get(node.type, node.type),
            )
            for node in (*session.get_inputs(), *session.get_outputs())
        }


class OnnxRuntime(Runtime):
    """ONNX bundles (optimum's layout) on ONNX Runtime."""

    name = "onnxruntime"
    target = "onnx"
    options = OnnxRuntimeOptions
    # the arena keeps each graph's largest activations after a call: sd15's check held 2.7 GiB
    # more with it; a check runs each graph once or twice, so it has nothing to gain
    check_settings = {**Runtime.check_settings, "memory_arena": False}

    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: OnnxRuntimeOptions
    ) -> Session:
        providers = providers_for(device)
        optimized_for = manifest.details.get("options", {}).get("device")
        if optimized_for == "cuda" and providers[0] != CUDA:
            raise RuntimeUnavailable(
                "this bundle was optimised for CUDA (it holds GPU-only fused ops) and no CUDA "
                "provider is available here: export it with --device cpu to run on the CPU"
            )
        return OnnxSession(bundle, manifest, providers, options)
