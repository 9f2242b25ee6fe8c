"""`instaflow-edge inspect`: a model's or a bundle's components, parameter counts, shapes and precision."""

from __future__ import annotations

import argparse
from pathlib import Path

from instaflow_edge.components import ComponentSpec, TensorSpec
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import MANIFEST_NAME
from instaflow_edge.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's or a bundle's components, parameters, shapes and precision",
        description=(
            "Show what a model or a bundle holds. A directory with a manifest.json is a bundle "
            "(its files are checked against their sha256 first); anything else is a model."
        ),
    )
    parser.add_argument(
        "target",
        nargs="?",
        help="a bundle directory, or a model ('tiny' default, 'sd15', a directory or a hub id)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="only check that TARGET is a closed bundle: every file listed, inside the bundle and "
        "matching its sha256, the manifest well formed; exit 2 naming the first problem",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.verify:
        from instaflow_edge.manifest import verify_bundle

        if not args.target:
            raise UserError("--verify needs a bundle directory")
        manifest = verify_bundle(Path(args.target))
        print(f"{args.target}: verified {len(manifest.all_files())} files against the manifest")
        return 0
    if args.target and (Path(args.target) / MANIFEST_NAME).is_file():
        print(describe_bundle(Path(args.target)))
    else:
        print(describe_model(args.target))
    return 0


def _tensors(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name}[{','.join(map(str, s.shape))}]:{s.dtype}" for s in specs)


def _component_rows(specs: dict[str, ComponentSpec], extra: dict[str, list[str]]) -> list[str]:
    return [
        [name, *extra[name], _tensors(spec.inputs), _tensors(spec.outputs)]
        for name, spec in specs.items()
    ]


def describe_model(model: str | None) -> str:
    from instaflow_edge.components import component_specs
    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.presets import count_parameters
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained(model)
    modules = {
        "text_encoder": [pipeline.text_encoder],
        "unet": [pipeline.unet],
        "vae_decoder": [pipeline.vae.post_quant_conv, pipeline.vae.decoder],
    }
    extra = {
        name: [f"{sum(count_parameters(m) for m in parts):,}", _dtype_name(parts[0])]
        for name, parts in modules.items()
    }
    shapes = pipeline.shapes
    header = [
        f"model: {pipeline.source}",
        f"image {shapes.image_size}x{shapes.image_size}, latents {pipeline.latent_shape}, "
        f"text {shapes.text_length} tokens x {shapes.text_hidden}, "
        f"VAE scaling factor {pipeline.scaling_factor}, one UNet call at timestep 1000",
        f"VAE encoder (training only): {count_parameters(pipeline.vae.encoder):,} parameters",
        "",
    ]
    rows = [["component", "parameters", "dtype", "inputs", "outputs"]]
    rows += _component_rows(component_specs(shapes), extra)
    return "\n".join(header) + format_table(rows)


def _dtype_name(module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def describe_bundle(bundle_dir: Path) -> str:
    from instaflow_edge.manifest import verify_bundle

    manifest = verify_bundle(bundle_dir)
    quantization = manifest.quantization or "none"
    header = [
        f"bundle: {bundle_dir} (files match manifest sha256)",
        f"target {manifest.target} (runtime {manifest.runtime}), precision {manifest.precision}, quantization {quantization}",
        f"source model {manifest.source_model.get('id', '?')}, "
        f"toolkit {manifest.toolkit_version}, schema {manifest.schema_version}",
        "",
    ]
    extra = {}
    for name, entry in manifest.components.items():
        size = sum((bundle_dir / path).stat().st_size for path in entry.files)
        extra[name] = [entry.file, f"{size / 2**20:.2f} MiB"]
    specs = {name: entry.spec for name, entry in manifest.components.items()}
    rows = [["component", "file", "size", "inputs", "outputs"]]
    rows += _component_rows(specs, extra)
    return "\n".join(header) + format_table(rows)
