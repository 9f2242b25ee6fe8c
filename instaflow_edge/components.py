"""The exportable components of a one-step model, declared once as data (optimum-style).

Each `Component` says how to build its torch module from a pipeline, which tensors go in and out
(names, shapes with a dynamic "batch" axis, dtypes) and which outputs parity compares. Export,
validation, the manifest, the runtimes, calibration and the tests all read these declarations.
A target's own naming of files lives in its exporter (`Exporter.layout`), so adding a target
edits nothing here. A target whose graphs take a tensor in another arrangement (Apple's Unet takes
the text states channels first) names one of `LAYOUTS`; the spec then carries the graph's shape
and `to_graph` converts feeds. No torch import: edge runtimes read the specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import import_module
from typing import Any

import numpy as np

BATCH = "batch"  # the name of the dynamic batch axis


@dataclass(frozen=True)
class Layout:
    """Another arrangement of a tensor than the contract's, that some target's graphs take.
    `to_graph` and `to_contract` take numpy arrays and torch tensors alike."""

    shape: Callable[[tuple[int | str, ...]], tuple[int | str, ...]]
    to_graph: Callable[[Any], Any]
    to_contract: Callable[[Any], Any]


def _permuted(x: Any, *axes: int) -> Any:
    """`x` with its axes in this order, numpy array or torch tensor (whose converters know
    `permute`, not `swapaxes`)."""
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(*axes)


LAYOUTS = {
    # text states (B, L, D) as Apple's Swift Unet feeds them: (B, D, 1, L), channels first
    "B,D,1,L": Layout(
        shape=lambda s: (s[0], s[2], 1, s[1]),
        to_graph=lambda x: _permuted(x, 0, 2, 1)[:, :, None, :],
        to_contract=lambda x: _permuted(x[:, :, 0, :], 0, 2, 1),
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "int64", "int32", "float32", "float16", "uint8"
    layout: str | None = None  # a key of LAYOUTS: the graph takes the tensor so arranged

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return {**data, "layout": self.layout} if self.layout else data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=data["name"],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            layout=data.get("layout"),
        )


@dataclass(frozen=True)
class ComponentSpec:
    """One component's tensors as a graph takes and gives them."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> ComponentSpec:
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_dict(spec) for spec in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(spec) for spec in data["outputs"]),
        )

    def with_batch(self, batch: int | None) -> ComponentSpec:
        """The spec with its batch axis fixed to `batch` (a static graph), or dynamic (None)."""
        if batch is None:
            return self
        return self._map(
            lambda t: replace(t, shape=tuple(batch if d == BATCH else d for d in t.shape))
        )

    def with_dtypes(self, dtypes: dict[str, str]) -> ComponentSpec:
        """The spec with tensor dtypes renamed (e.g. {"int64": "int32"} where a target has no int64)."""
        return self._map(lambda t: replace(t, dtype=dtypes.get(t.dtype, t.dtype)))

    def with_layouts(self, layouts: dict[str, str]) -> ComponentSpec:
        """The spec with the named tensors in a `LAYOUTS` arrangement (their graph shapes)."""
        return self._map(
            lambda t: (
                replace(t, layout=layouts[t.name], shape=LAYOUTS[layouts[t.name]].shape(t.shape))
                if t.name in layouts
                else t
            )
        )

    def to_graph(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """The inputs as the graph takes them, from contract arrays: arranged, in its dtypes."""
        return {
            t.name: np.ascontiguousarray(
                LAYOUTS[t.layout].to_graph(feeds[t.name]) if t.layout else feeds[t.name],
                dtype=t.dtype,
            )
            for t in self.inputs
        }

    def to_contract(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The graph's outputs back in the contract's arrangement."""
        arranged = {t.name: t.layout for t in self.outputs if t.layout}
        return {
            name: LAYOUTS[arranged[name]].to_contract(value) if name in arranged else value
            for name, value in outputs.items()
        }

    def _map(self, change: Callable[[TensorSpec], TensorSpec]) -> ComponentSpec:
        return replace(
            self, inputs=tuple(map(change, self.inputs)), outputs=tuple(map(change, self.outputs))
        )

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size of a static graph, or None when the batch axis is dynamic."""
        first = self.inputs[0].shape[0]
        return None if isinstance(first, str) else int(first)


@dataclass(frozen=True)
class ModelShapes:
    """The sizes that fix every component's tensor shapes."""

    text_length: int
    text_hidden: int
    latent_channels: int
    latent_size: int
    image_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def latent(self) -> tuple[int | str, ...]:
        return (BATCH, self.latent_channels, self.latent_size, self.latent_size)

    @property
    def text(self) -> tuple[int | str, ...]:
        return (BATCH, self.text_length, self.text_hidden)


@dataclass(frozen=True)
class Component:
    """One exportable part: its torch module (built from a pipeline) and its tensors.

    `module` is "module:Class" of an `nn.Module` taking the pipeline (imported only on export);
    `tensors(shapes)` gives (inputs, outputs); `weights` names the pipeline's modules whose
    weights it holds (an export frees each after its last component); `fused` marks the optional
    one-graph generator, which has no PyTorch counterpart of its own and is compared on its image.
    `float_inputs` names the inputs that the ops reading them take unquantized when activations
    are quantized to int8: at t=1000 the UNet predicts noise - data, so its output carries its
    input noise through, and rounding that input puts the rounding into the image (the embedded
    default's worst validate prompt: 18 dB quantized, 30 dB with the noise's convolution float).
    """

    name: str
    module: str
    tensors: Callable[[ModelShapes], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]
    weights: tuple[str, ...]
    fused: bool = False
    float_inputs: tuple[str, ...] = ()

    def spec(self, shapes: ModelShapes) -> ComponentSpec:
        inputs, outputs = self.tensors(shapes)
        return ComponentSpec(self.name, inputs, outputs)

    def build(self, pipeline) -> Any:
        """The torch module to convert, in eval mode."""
        module_name, class_name = self.module.split(":")
        return getattr(import_module(module_name), class_name)(pipeline).eval()


def _f32(name: str, shape: tuple[int | str, ...]) -> TensorSpec:
    return TensorSpec(name, shape, "float32")


def _ids(shapes: ModelShapes) -> TensorSpec:
    return TensorSpec("input_ids", (BATCH, shapes.text_length), "int64")


_MODULES = "instaflow_edge.exportable"
COMPONENTS: dict[str, Component] = {
    component.name: component
    for component in (
        Component(
            "text_encoder",
            f"{_MODULES}:TextEncoder",
            lambda s: ((_ids(s),), (_f32("last_hidden_state", s.text),)),
            ("text_encoder",),
        ),
        Component(
            "unet",
            f"{_MODULES}:Unet",
            lambda s: (
                (
                    _f32("sample", s.latent),
                    _f32("timestep", (BATCH,)),
                    _f32("encoder_hidden_states", s.text),
                ),
                (_f32("out_sample", s.latent),),
            ),
            ("unet",),
            float_inputs=("sample",),
        ),
        Component(
            "vae_decoder",
            f"{_MODULES}:VaeDecoder",
            lambda s: (
                (_f32("latent_sample", s.latent),),
                (_f32("sample", (BATCH, 3, s.image_size, s.image_size)),),
            ),
            ("vae",),
        ),
        Component(
            "generator",
            f"{_MODULES}:OneStepGenerator",
            lambda s: (
                (_ids(s), _f32("noise", s.latent)),
                (TensorSpec("image", (BATCH, s.image_size, s.image_size, 3), "uint8"),),
            ),
            ("text_encoder", "unet", "vae"),
            fused=True,
            float_inputs=("noise",),
        ),
    )
}
# the three components of the recipe, in the order it runs them
RECIPE = tuple(name for name, component in COMPONENTS.items() if not component.fused)


def component_specs(shapes: ModelShapes, fused: bool = False) -> dict[str, ComponentSpec]:
    """The specs of the recipe's components (and of the fused generator when asked)."""
    return {
        name: component.spec(shapes)
        for name, component in COMPONENTS.items()
        if fused or not component.fused
    }
