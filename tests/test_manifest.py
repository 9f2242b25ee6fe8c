"""Bundle manifest: round trip, sha256 of every file, refusal of tampered, missing or malformed bundles."""

from __future__ import annotations

import json

import pytest

from instaflow_edge.components import ModelShapes, component_specs
from instaflow_edge.manifest import (
    MANIFEST_NAME,
    BundleError,
    ComponentEntry,
    Manifest,
    SamplingRecipe,
    hash_files,
    read_manifest,
    verify_bundle,
    write_manifest,
)

SHAPES = ModelShapes(
    text_length=32, text_hidden=64, latent_channels=4, latent_size=16, image_size=64
)


@pytest.fixture()
def bundle(tmp_path):
    """A bundle of placeholder files, laid out like an ONNX export with external data."""
    files = {
        "text_encoder/model.onnx": b"te",
        "unet/model.onnx": b"unet-graph",
        "unet/model.onnx.data": b"unet-weights" * 100,
        "vae_decoder/model.onnx": b"vae",
        "tokenizer/tokenizer.json": b"{}",
        "tokenizer/tokenizer_config.json": b"{}",
        "Unet.mlpackage/Data/model.mlmodel": b"spec",  # a directory-shaped component file
        "Unet.mlpackage/Manifest.json": b"{}",
    }
    for relative, content in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    specs = component_specs(SHAPES)
    components = {
        "text_encoder": ComponentEntry.from_files(
            tmp_path, specs["text_encoder"], "text_encoder/model.onnx"
        ),
        "unet": ComponentEntry.from_files(
            tmp_path, specs["unet"], "unet/model.onnx", ["unet/model.onnx.data"]
        ),
        "vae_decoder": ComponentEntry.from_files(tmp_path, specs["vae_decoder"], "Unet.mlpackage"),
    }
    manifest = Manifest(
        target="onnx",
        runtime="onnxruntime",
        precision="fp32",
        source_model={"id": "embedded:tiny", "sha256": "0" * 64},
        sampling=SamplingRecipe(latent_shape=[4, 16, 16], vae_scaling_factor=1.0, image_size=64),
        components=components,
        assets=hash_files(
            tmp_path, ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
        ),
    )
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_round_trip_keeps_everything(bundle):
    manifest = verify_bundle(bundle)
    assert manifest.target == "onnx" and manifest.precision == "fp32"
    assert manifest.sampling.timestep == 1000.0 and manifest.sampling.guidance_scale == 0.0
    unet = manifest.components["unet"]
    assert unet.file == "unet/model.onnx"
    assert set(unet.files) == {"unet/model.onnx", "unet/model.onnx.data"}
    assert [spec.name for spec in unet.spec.inputs] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
    ]
    assert unet.spec.inputs[0].shape == ("batch", 4, 16, 16)
    assert "Unet.mlpackage/Data/model.mlmodel" in manifest.components["vae_decoder"].files
    assert manifest.library_versions["torch"].startswith("2.")
    assert manifest.to_dict() == read_manifest(bundle).to_dict()


def test_tampered_file_is_refused_by_name(bundle):
    (bundle / "unet/model.onnx.data").write_bytes(b"unet-weights" * 99 + b"tampered!!!!")
    with pytest.raises(BundleError, match="unet/model.onnx.data does not match"):
        verify_bundle(bundle)


def test_tampered_file_inside_a_directory_component_is_refused(bundle):
    (bundle / "Unet.mlpackage/Data/model.mlmodel").write_bytes(b"SPEC")
    with pytest.raises(BundleError, match="model.mlmodel does not match"):
        verify_bundle(bundle)


def test_missing_file_is_refused_by_name(bundle):
    (bundle / "tokenizer/tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing tokenizer/tokenizer.json"):
        verify_bundle(bundle)


def test_no_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(tmp_path)


def test_malformed_manifest_is_refused(bundle):
    (bundle / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)


def test_newer_schema_is_refused(bundle):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["schema_version"] = 99
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(bundle)


def test_missing_field_is_refused(bundle):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["components"]["unet"]["files"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed"):
        read_manifest(bundle)


def edit(bundle, change) -> None:
    """Rewrite the manifest's JSON with `change(data)` applied (a hostile or careless author)."""
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def outside_file(bundle):
    secret = bundle.parent / "secret.txt"
    secret.write_text("not the bundle's")
    return secret


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d, s: d["assets"].update({"../secret.txt": "0" * 64}), "not a path inside"),
        (lambda d, s: d["assets"].update({str(s): "0" * 64}), "not a path inside"),
        (lambda d, s: d["components"]["unet"].update(file="../secret.txt"), "not a path inside"),
        (lambda d, s: d["components"]["unet"].update(files={}), "unet lists no files"),
        (lambda d, s: d["assets"].pop("tokenizer/tokenizer.json"), "does not list tokenizer"),
        (
            lambda d, s: d["components"]["vae_decoder"]["files"].pop(
                "Unet.mlpackage/Data/model.mlmodel"
            ),
            "Unet.mlpackage/Data/model.mlmodel is not in its manifest",
        ),
    ],
)
def test_a_manifest_that_reaches_outside_or_leaves_files_unlisted_is_refused(bundle, change, words):
    secret = outside_file(bundle)
    edit(bundle, lambda data: change(data, secret))
    with pytest.raises(BundleError, match=words):
        verify_bundle(bundle)


def test_a_link_out_of_the_bundle_is_refused(bundle):
    secret = outside_file(bundle)
    link = bundle / "tokenizer" / "tokenizer.json"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json links outside the bundle"):
        verify_bundle(bundle)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(components=[]), "malformed"),
        (lambda d: d["components"].pop("unet"), "no unet component"),
        (lambda d: d["components"]["unet"]["inputs"][0].update(dtype="float99"), "float99"),
        (
            lambda d: d["components"]["unet"]["outputs"][0].update(name="v"),
            "should be 'out_sample'",
        ),
        (lambda d: d["components"]["unet"]["inputs"][0].update(shape=[1, 4, 8, 8]), "disagrees"),
        (lambda d: d["sampling"].update(image_size=128), "disagrees"),
        (lambda d: d["components"].update(safety_checker={}), "malformed"),
    ],
)
def test_a_manifest_that_breaks_the_component_contract_is_refused(bundle, change, words):
    edit(bundle, change)
    with pytest.raises(BundleError, match=words):
        read_manifest(bundle)
