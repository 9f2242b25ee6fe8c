"""The inputs and outputs of each exported component, declared once as data.

Export, validation and the bundle manifest all read these specs, in the manner of optimum's
exporter configs. Axis sizes are ints, or strings naming a dynamic axis ("batch").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "int64", "float32", "float16", "uint8"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data["dtype"])


@dataclass(frozen=True)
class ComponentSpec:
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


def component_specs(shapes: ModelShapes, float_dtype: str = "float32") -> dict[str, ComponentSpec]:
    """The three components of a one-step model, with optimum's tensor names and a dynamic batch."""
    latent = ("batch", shapes.latent_channels, shapes.latent_size, shapes.latent_size)
    text = ("batch", shapes.text_length, shapes.text_hidden)
    image = ("batch", 3, shapes.image_size, shapes.image_size)
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", ("batch", shapes.text_length), "int64"),),
            outputs=(TensorSpec("last_hidden_state", text, float_dtype),),
        ),
        "unet": ComponentSpec(
            "unet",
            inputs=(
                TensorSpec("sample", latent, float_dtype),
                TensorSpec("timestep", ("batch",), float_dtype),
                TensorSpec("encoder_hidden_states", text, float_dtype),
            ),
            outputs=(TensorSpec("out_sample", latent, float_dtype),),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent_sample", latent, float_dtype),),
            outputs=(TensorSpec("sample", image, float_dtype),),
        ),
    }


def generator_spec(shapes: ModelShapes) -> ComponentSpec:
    """The fused one-step generator: token ids and noise in, a uint8 NHWC image out."""
    latent = ("batch", shapes.latent_channels, shapes.latent_size, shapes.latent_size)
    return ComponentSpec(
        "generator",
        inputs=(
            TensorSpec("input_ids", ("batch", shapes.text_length), "int64"),
            TensorSpec("noise", latent, "float32"),
        ),
        outputs=(TensorSpec("image", ("batch", shapes.image_size, shapes.image_size, 3), "uint8"),),
    )
