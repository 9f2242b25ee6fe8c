"""The exportable components of a one-step model, declared once as data (optimum-style).

Each `Component` says how to build its torch module from a pipeline, which tensors go in and out
(names, shapes with a dynamic "batch" axis, dtypes) and which outputs parity compares. Export,
validation, the manifest, the runtimes, calibration and the tests all read these declarations.
A target's own naming of files lives in its exporter (`Exporter.layout`), so adding a target
edits nothing here. No torch import: edge runtimes read the specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import import_module
from typing import Any

BATCH = "batch"  # the name of the dynamic batch axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "int64", "int32", "float32", "float16", "uint8"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data["dtype"])


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
    `tensors(shapes)` gives (inputs, outputs); `fused` marks the optional one-graph generator,
    which has no PyTorch counterpart of its own and is compared on its image.
    """

    name: str
    module: str
    tensors: Callable[[ModelShapes], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]
    fused: bool = False

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
        ),
        Component(
            "vae_decoder",
            f"{_MODULES}:VaeDecoder",
            lambda s: (
                (_f32("latent_sample", s.latent),),
                (_f32("sample", (BATCH, 3, s.image_size, s.image_size)),),
            ),
        ),
        Component(
            "generator",
            f"{_MODULES}:OneStepGenerator",
            lambda s: (
                (_ids(s), _f32("noise", s.latent)),
                (TensorSpec("image", (BATCH, s.image_size, s.image_size, 3), "uint8"),),
            ),
            fused=True,
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
