"""Calibration sets: what every component sees at t=1000, per prompt, as sharded safetensors.

Layout of a set directory: `calibration.json` (source model, prompts, seeds, shards) and
`shard-00000.safetensors`, ... holding "<component>/<tensor name>" arrays stacked over samples
(the names of `components.component_specs`). Every quantizer of every target reads this format.
Reading needs only numpy and safetensors (no torch).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instaflow_edge.components import LAYOUTS, ComponentSpec
from instaflow_edge.errors import UserError
from instaflow_edge.recipe import PREDICTION

INDEX_NAME = "calibration.json"
SCHEMA_VERSION = 2  # 2: unet/out_sample is the flow prediction (noise - data, recipe.PREDICTION)


@dataclass
class CalibrationSet:
    """A calibration set on disk."""

    path: Path
    source_model: str
    prompts: list[str]
    seeds: list[int]
    shards: list[str]
    shapes: dict[str, tuple[int, ...]]  # "<component>/<tensor>" -> its shape in the first shard

    def __len__(self) -> int:
        return len(self.prompts)

    def samples(self, component: str) -> Iterator[dict[str, np.ndarray]]:
        """One feed dict (batch 1) per recorded sample: inputs and outputs of `component`."""
        from safetensors.numpy import load_file

        prefix = f"{component}/"
        for shard in self.shards:
            tensors = load_file(self.path / shard)
            named = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not named:
                raise UserError(f"calibration set {self.path} has no tensors for {component!r}")
            count = next(iter(named.values())).shape[0]
            for index in range(count):
                yield {name: value[index : index + 1] for name, value in named.items()}

    def check_shapes(self, specs: dict[str, ComponentSpec]) -> None:
        """Refuse a set whose recorded tensors do not fit these components (one made for another
        model, or edited): every input each component takes, in the shape it takes."""
        for component, spec in specs.items():
            for tensor in spec.inputs:
                key = f"{component}/{tensor.name}"
                if key not in self.shapes:
                    raise UserError(f"calibration set {self.path} has no {key}")
                recorded = self.shapes[key]  # as the contract arranges it; the graph may not
                if tensor.layout is not None:
                    recorded = LAYOUTS[tensor.layout].shape(recorded)
                if list(recorded[1:]) != list(tensor.shape[1:]):
                    raise UserError(
                        f"calibration set {self.path} holds {key} of shape "
                        f"{list(self.shapes[key][1:])}, which does not fit the bundle's "
                        f"{component} ({list(tensor.shape[1:])}): it was made for another model"
                    )

    def inputs(self, component: str, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Only the named inputs of each sample, as a quantizer's calibration reader wants them."""
        for sample in self.samples(component):
            yield {name: sample[name] for name in input_names}


def load_calibration(path: Path) -> CalibrationSet:
    """Open a calibration set; one clear error if it is missing or not a calibration set."""
    path = Path(path)
    index = path / INDEX_NAME
    if not index.is_file():
        raise UserError(
            f"{path} is not a calibration set (no {INDEX_NAME}); make one with calibrate"
        )
    try:
        data = json.loads(index.read_text())
        if data["schema_version"] != SCHEMA_VERSION:
            raise UserError(
                f"{index}: schema version {data['schema_version']}, this toolkit reads "
                f"{SCHEMA_VERSION}: make the set again with calibrate"
            )
        source_model, prompts = str(data["source_model"]), list(data["prompts"])
        seeds, shards = list(data["seeds"]), list(data["shards"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{index} is malformed: {error}") from error
    shapes = _shard_shapes(path, shards)
    return CalibrationSet(path, source_model, prompts, seeds, shards, shapes)


def _shard_shapes(path: Path, shards: list[str]) -> dict[str, tuple[int, ...]]:
    """Read every shard's header (not its data): each a file of the set, readable, with the same
    tensors; the shapes of the first. A truncated or foreign file is refused by name."""
    from safetensors import SafetensorError, safe_open

    if not shards or any(not isinstance(s, str) or Path(s).name != s for s in shards):
        raise UserError(f"calibration set {path}: its shards {shards!r} are not files of the set")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"calibration set {path} is missing {shard}")
        try:
            with safe_open(path / shard, "numpy") as handle:
                found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except SafetensorError as error:
            raise UserError(
                f"calibration set {path}: {shard} is not a readable safetensors file ({error}); "
                "make the set again with calibrate"
            ) from error
        if shapes and set(found) != set(shapes):
            raise UserError(f"calibration set {path}: {shard} holds other tensors than {shards[0]}")
        shapes = shapes or found
    return shapes


def write_calibration(
    out: Path, source_model: str, prompts: list[str], seeds: list[int], shards: list[str]
) -> Path:
    """Write the index of a set whose shards are already in `out` (the builder calls this last)."""
    from instaflow_edge.atomic import atomic_file

    index = {
        "schema_version": SCHEMA_VERSION,
        "source_model": source_model,
        "prompts": prompts,
        "seeds": seeds,
        "shards": shards,
        "timestep": 1000.0,
        "prediction": PREDICTION,
    }
    path = Path(out) / INDEX_NAME
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(index, indent=2) + "\n")
    return path
