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

from instaflow_edge.errors import UserError

INDEX_NAME = "calibration.json"
SCHEMA_VERSION = 1


@dataclass
class CalibrationSet:
    """A calibration set on disk."""

    path: Path
    source_model: str
    prompts: list[str]
    seeds: list[int]
    shards: list[str]

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
            raise UserError(f"{index}: unsupported schema version {data['schema_version']}")
        calibration = CalibrationSet(
            path=path,
            source_model=data["source_model"],
            prompts=list(data["prompts"]),
            seeds=list(data["seeds"]),
            shards=list(data["shards"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{index} is malformed: {error}") from error
    missing = [shard for shard in calibration.shards if not (path / shard).is_file()]
    if missing:
        raise UserError(f"calibration set {path} is missing {', '.join(missing)}")
    return calibration


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
    }
    path = Path(out) / INDEX_NAME
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(index, indent=2) + "\n")
    return path
