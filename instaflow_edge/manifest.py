"""The bundle manifest: read, write and verify `manifest.json` (DESIGN.md section 4).

Imports only the standard library and numpy, so edge runtimes can verify a bundle without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from instaflow_edge.atomic import atomic_file, unfinished
from instaflow_edge.components import ComponentSpec, ModelShapes
from instaflow_edge.errors import UserError
from instaflow_edge.jsonio import dumps
from instaflow_edge.recipe import PREDICTION

# 2: the manifest names the runtime module that runs the bundle; 3: the UNet graph outputs
# diffusers' flow prediction (noise - data), declared as sampling.prediction; 4: runtime_options,
# the settings the runtime loads the bundle with (an older reader would run it otherwise)
SCHEMA_VERSION = 4
MANIFEST_NAME = "manifest.json"
TRACKED_LIBRARIES = (
    "instaflow-edge",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "coremltools",
)


# what every bundle session opens besides the components: the bundle's own tokenizer
REQUIRED_ASSETS = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
TENSOR_DTYPES = ("int64", "int32", "float32", "float16", "uint8")


class BundleError(UserError):
    """A bundle that is missing, malformed, or does not match its manifest."""


@dataclass
class SamplingRecipe:
    """How to run the bundle: one UNet call at timestep 1000, no guidance, latents = noise - the
    UNet's output (`prediction`: diffusers' flow prediction, noise - data), decode latents/scale."""

    latent_shape: list[int]
    vae_scaling_factor: float
    image_size: int
    prediction: str = PREDICTION
    timestep: float = 1000.0
    num_steps: int = 1
    guidance_scale: float = 0.0


@dataclass
class ComponentEntry:
    """One exported component: its main file, every file it owns with sha256, and its tensors."""

    spec: ComponentSpec
    file: str
    files: dict[str, str]

    @classmethod
    def from_files(cls, bundle_dir: Path, spec: ComponentSpec, file: str, extra: list[str] = ()):
        return cls(spec=spec, file=file, files=hash_files(bundle_dir, [file, *extra]))


@dataclass
class Manifest:
    target: str
    runtime: str  # the module in `instaflow_edge.runtimes` that runs this bundle
    precision: str
    source_model: dict[str, str]
    sampling: SamplingRecipe
    components: dict[str, ComponentEntry]
    assets: dict[str, str] = field(default_factory=dict)  # tokenizer files etc.: path -> sha256
    quantization: str | None = None
    # the runtime's settings for this bundle (e.g. OpenVINO's inference_precision from a preset):
    # every load applies them, under the caller's own
    runtime_options: dict[str, Any] = field(default_factory=dict)
    # what the exporter or quantizer found: parity at export, ops kept in fp32, graph optimisation
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = ""
    library_versions: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> ModelShapes:
        """The sizes that fix the components' tensors: text states from the text encoder's
        output, latents and image from the sampling recipe (`check_contract` checks the rest)."""
        text = self.components["text_encoder"].spec.outputs[0].shape
        latent = self.sampling.latent_shape
        return ModelShapes(text[1], text[2], latent[0], latent[1], self.sampling.image_size)

    def all_files(self) -> dict[str, str]:
        files = dict(self.assets)
        for entry in self.components.values():
            files.update(entry.files)
        return files

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "toolkit_version": self.toolkit_version,
            "library_versions": self.library_versions,
            "source_model": self.source_model,
            "target": self.target,
            "runtime": self.runtime,
            "precision": self.precision,
            "quantization": self.quantization,
            "runtime_options": self.runtime_options,
            "sampling": vars(self.sampling),
            "components": {
                name: {"file": entry.file, "files": entry.files, **entry.spec.to_dict()}
                for name, entry in self.components.items()
            },
            "assets": self.assets,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            schema_version=data["schema_version"],
            toolkit_version=data["toolkit_version"],
            library_versions=data["library_versions"],
            source_model=data["source_model"],
            target=data["target"],
            runtime=data["runtime"],
            precision=data["precision"],
            quantization=data["quantization"],
            runtime_options=dict(data["runtime_options"]),
            sampling=SamplingRecipe(**data["sampling"]),
            components={
                name: ComponentEntry(
                    spec=ComponentSpec.from_dict(name, entry),
                    file=entry["file"],
                    files=dict(entry["files"]),
                )
                for name, entry in data["components"].items()
            },
            assets=dict(data["assets"]),
            details=dict(data.get("details", {})),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(bundle_dir: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of each path relative to the bundle; a directory (an .mlpackage) adds every file in it."""
    bundle_dir = Path(bundle_dir)
    hashes = {}
    for relative in paths:
        path = bundle_dir / relative
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            hashes[file.relative_to(bundle_dir).as_posix()] = sha256_file(file)
    return hashes


def library_versions() -> dict[str, str]:
    """Versions of the installed libraries that shape an export (without importing them)."""
    found = {}
    for name in TRACKED_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Stamp versions and write `manifest.json` atomically; returns its path."""
    manifest.library_versions = library_versions()
    manifest.toolkit_version = manifest.library_versions.get("instaflow-edge", "0.0.0+source")
    path = Path(bundle_dir) / MANIFEST_NAME
    with atomic_file(path) as staging:
        staging.write_text(dumps(manifest.to_dict()))
    return path


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse a bundle's manifest; a clear BundleError when it is absent, malformed or too new."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist or is not a directory")
    if unfinished(bundle_dir):
        raise BundleError(
            f"{bundle_dir} is the staging folder of an unfinished or replaced run, not a bundle "
            "(the next run writing the same output removes it)"
        )
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from error
    schema = data.get("schema_version") if isinstance(data, dict) else None
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {schema!r}; this toolkit reads version {SCHEMA_VERSION} "
            "(export the bundle again)"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BundleError(f"{path} is malformed: missing or bad field {error}") from error
    check_contract(manifest, path)
    return manifest


def check_contract(manifest: Manifest, path: Path) -> None:
    """Refuse a manifest whose components break the contract every runtime relies on: the
    recipe's three components present, tensor names as declared in `components.COMPONENTS`,
    known dtypes, shapes that agree with the sampling recipe."""
    from instaflow_edge.components import COMPONENTS, LAYOUTS, RECIPE

    if manifest.sampling.prediction != PREDICTION:
        raise BundleError(
            f"{path}: its UNet predicts {manifest.sampling.prediction!r}; this toolkit runs "
            f"{PREDICTION!r} (noise - data) graphs"
        )
    missing = [name for name in RECIPE if name not in manifest.components]
    if missing:
        raise BundleError(f"{path} is malformed: it has no {', '.join(missing)} component")
    latent = manifest.sampling.latent_shape
    if len(latent) != 3 or latent[1] != latent[2]:
        raise BundleError(f"{path} is malformed: latent shape {latent} is not (C, S, S)")
    text = manifest.components["text_encoder"].spec.outputs[0].shape
    if len(text) != 3 or not all(isinstance(d, int) for d in text[1:]):
        raise BundleError(f"{path} is malformed: text states shape {list(text)}")
    shapes = manifest.shapes()
    for name, entry in manifest.components.items():
        if name not in COMPONENTS:
            raise BundleError(f"{path} is malformed: unknown component {name!r}")
        expected = COMPONENTS[name].spec(shapes)
        if len(entry.spec.inputs) != len(expected.inputs) or len(entry.spec.outputs) != len(
            expected.outputs
        ):
            raise BundleError(f"{path} is malformed: {name} has the wrong number of tensors")
        pairs = [
            *zip(entry.spec.inputs, expected.inputs, strict=True),
            *zip(entry.spec.outputs, expected.outputs, strict=True),
        ]
        for got, want in pairs:
            if got.name != want.name:
                raise BundleError(
                    f"{path} is malformed: {name} tensor {got.name!r} should be {want.name!r}"
                )
            if got.dtype not in TENSOR_DTYPES:
                raise BundleError(f"{path} is malformed: {name}.{got.name} dtype {got.dtype!r}")
            if got.layout is not None:
                if got.layout not in LAYOUTS:
                    raise BundleError(
                        f"{path} is malformed: {name}.{got.name} layout {got.layout!r}"
                    )
                want = replace(want, shape=LAYOUTS[got.layout].shape(want.shape))
            if list(got.shape[1:]) != list(want.shape[1:]) or not (
                got.shape[0] == want.shape[0] or isinstance(got.shape[0], int)
            ):
                raise BundleError(
                    f"{path} is malformed: {name}.{got.name} shape {list(got.shape)} disagrees "
                    f"with the sampling recipe ({list(want.shape)})"
                )


def inside(bundle_dir: Path, relative: str) -> Path:
    """The path of a file the manifest names, refused unless it stays inside the bundle: no
    absolute path, no `..`, no link that leads out."""
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise BundleError(f"bundle {bundle_dir}: {relative!r} is not a path inside the bundle")
    path = Path(bundle_dir) / relative
    if not path.resolve().is_relative_to(Path(bundle_dir).resolve()):
        raise BundleError(f"bundle {bundle_dir}: {relative} links outside the bundle")
    return path


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Read the manifest and check that it is a closed world (every file any code opens is
    listed, inside the bundle, and matches its sha256); refuse the bundle naming the file."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for relative in REQUIRED_ASSETS:
        if relative not in manifest.assets:
            raise BundleError(f"bundle {bundle_dir}: its manifest does not list {relative}")
    for name, entry in manifest.components.items():
        main = inside(bundle_dir, entry.file)
        if not entry.files:
            raise BundleError(f"bundle {bundle_dir}: component {name} lists no files")
        owned = (
            {p.relative_to(bundle_dir).as_posix() for p in main.rglob("*") if p.is_file()}
            if main.is_dir()
            else {entry.file}
        )
        unlisted = sorted(owned - set(entry.files))
        if unlisted:
            raise BundleError(f"bundle {bundle_dir}: {unlisted[0]} is not in its manifest")
    for relative, expected in manifest.all_files().items():
        path = inside(bundle_dir, relative)
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir} is missing {relative}")
        if sha256_file(path) != expected:
            raise BundleError(
                f"bundle {bundle_dir}: {relative} does not match its manifest sha256 "
                "(modified or corrupt); re-export the bundle"
            )
    return manifest
