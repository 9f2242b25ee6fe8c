"""The Exporter contract and what every target's bundle shares: tokenizer, manifest, atomic write."""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from instaflow_edge.atomic import atomic_directory
from instaflow_edge.components import ComponentSpec
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import (
    ComponentEntry,
    Manifest,
    SamplingRecipe,
    hash_files,
    write_manifest,
)
from instaflow_edge.pipeline import OneStepPipeline

PRECISIONS = ("fp32", "fp16")


class Exporter(ABC):
    """One target: export a model to a bundle, and quantize a bundle into a new bundle.

    Both write into a temporary directory renamed into place at the end, so an interrupted run
    leaves no bundle that looks complete.
    """

    target: str
    quantization_methods: tuple[str, ...]

    @abstractmethod
    def export(
        self,
        pipeline: OneStepPipeline,
        out_dir: Path,
        precision: str = "fp32",
        options: dict[str, Any] | None = None,
    ) -> Path:
        """Export text encoder, UNet and VAE decoder; check each against PyTorch; return the bundle."""

    @abstractmethod
    def quantize(
        self,
        bundle: Path,
        out_dir: Path,
        method: str,
        calibration: Path | None = None,
        options: dict[str, Any] | None = None,
    ) -> Path:
        """Write a quantized copy of `bundle` to `out_dir`; return it."""


@contextmanager
def staged_bundle(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """The staging directory of a bundle: renamed to `out_dir` only when the block succeeds."""
    if Path(out_dir).exists() and not overwrite:
        raise UserError(f"{out_dir} already exists: choose another --out or pass --overwrite")
    with atomic_directory(Path(out_dir), overwrite=overwrite) as staging:
        yield staging


def copy_tokenizer(pipeline: OneStepPipeline, staging: Path) -> list[str]:
    """Save the tokenizer into `tokenizer/` (tokenizer.json, config, vocab.json, merges.txt)."""
    folder = staging / "tokenizer"
    pipeline.tokenizer.save_pretrained(folder)
    pipeline.tokenizer.backend_tokenizer.model.save(str(folder))
    return sorted(p.relative_to(staging).as_posix() for p in folder.iterdir())


def write_bundle_manifest(
    staging: Path,
    pipeline: OneStepPipeline,
    target: str,
    precision: str,
    components: dict[str, tuple[ComponentSpec, str, list[str]]],
    assets: list[str],
    quantization: str | None = None,
    source_model: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> Manifest:
    """Hash every file and write `manifest.json`. components: name -> (spec, main file, extras)."""
    manifest = Manifest(
        target=target,
        precision=precision,
        quantization=quantization,
        source_model=source_model or {"id": pipeline.source, "sha256": pipeline.fingerprint()},
        sampling=SamplingRecipe(
            latent_shape=list(pipeline.latent_shape),
            vae_scaling_factor=pipeline.scaling_factor,
            image_size=pipeline.image_size,
        ),
        components={
            name: ComponentEntry.from_files(staging, spec, file, extras)
            for name, (spec, file, extras) in components.items()
        },
        assets=hash_files(staging, assets),
        details=details or {},
    )
    write_manifest(staging, manifest)
    return manifest


def copy_assets(source_bundle: Path, staging: Path, manifest: Manifest) -> None:
    """Copy a bundle's shared assets (tokenizer, ...) into a new bundle being quantized."""
    for relative in manifest.assets:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_bundle / relative, staging / relative)
