"""What is Core ML's own: Apple's names, split-einsum attention, the MIL interpreter, compression.

The promises every target keeps (parity through the runtime, manifest, tamper refusal,
quantization) are in test_targets.
"""

from __future__ import annotations

import platform
import tempfile

import numpy as np
import pytest

pytest.importorskip("coremltools")

from instaflow_edge.calibration.builder import build_calibration  # noqa: E402
from instaflow_edge.export import get_exporter  # noqa: E402
from instaflow_edge.manifest import read_manifest  # noqa: E402
from instaflow_edge.metrics import image_psnr, tensor_metrics  # noqa: E402
from instaflow_edge.runtimes import RuntimeUnavailable, load_session  # noqa: E402
from instaflow_edge.runtimes.mil_interpreter import load_program  # noqa: E402
from tests.conftest import component_psnr  # noqa: E402

PROMPTS = ["a red circle above a blue square", "two small green triangles"]
MACOS_ONLY = pytest.mark.skipif(
    platform.system() != "Darwin", reason="Core ML prediction runs only on macOS"
)


@pytest.fixture(scope="module")
def reference(pipeline):
    ids = pipeline.tokenize(PROMPTS)
    noise = pipeline.make_noise([3, 4])
    image = pipeline(input_ids=ids, noise=noise, output_type="np")
    return ids.numpy(), noise.numpy(), pipeline.component_io(ids, noise), image


@pytest.fixture(scope="module")
def fp32_bundle(bundles):
    return bundles("coreml")


@pytest.fixture(scope="module")
def fp16_bundle(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "fp16"
    return get_exporter("coreml").export(pipeline, out, "fp16", {"attention": "split-einsum"})


# What Apple's Swift StableDiffusion package reads from each package, file and line in
# github.com/apple/ml-stable-diffusion swift/StableDiffusion/pipeline/ (commit e12202c):
# (package, "input"/"output", feature name or None for "the first one", dtype, shape, where)
L, D, LATENT, IMAGE = 32, 64, (1, 4, 16, 16), (1, 3, 64, 64)  # the embedded default's sizes
SWIFT_READS = [
    ("TextEncoder", "input", None, "float32", (1, L),
     "TextEncoder.swift:76-82: the first input, fed Float32(ids) in the model's input shape"),
    ("TextEncoder", "output", "last_hidden_state", "float32", (1, L, D),
     "TextEncoder.swift:88: featureValue(for: \"last_hidden_state\")"),
    ("Unet", "input", "sample", "float32", LATENT,
     "Unet.swift:63,108: inputDescriptionsByName[\"sample\"], the latents"),
    ("Unet", "input", "timestep", "float32", (1,),
     "Unet.swift:98-109: t = MLShapedArray<Float32>([timeStep]), shape [1] at batch 1"),
    ("Unet", "input", "encoder_hidden_states", "float32", (1, D, 1, L),
     "StableDiffusionPipeline.swift:449-452: toHiddenStates, [B, L, D] to [B, D, 1, L]"),
    ("Unet", "output", None, "float32", LATENT,
     "Unet.swift:127-130: the first output feature, whatever its name"),
    ("VAEDecoder", "input", None, "float32", LATENT,
     "Decoder.swift:49-53,74-77: the first input, fed latents / decoderScaleFactor"),
    ("VAEDecoder", "output", None, "float32", IMAGE,
     "Decoder.swift:64-68: the first output feature, an image in [-1, 1]"),
]  # fmt: skip
ARRAY_TYPES = {65568: "float32", 65552: "float16", 131104: "int32"}


@pytest.mark.parametrize("row", SWIFT_READS, ids=lambda row: f"{row[0]}-{row[1]}-{row[2]}")
def test_packages_give_apples_swift_package_what_it_reads(fp32_bundle, row):
    import coremltools as ct

    package, kind, name, dtype, shape, where = row
    description = ct.utils.load_spec(str(fp32_bundle / f"{package}.mlpackage")).description
    features = {f.name: f for f in getattr(description, kind)}
    feature = features[name] if name is not None else getattr(description, kind)[0]
    array = feature.type.multiArrayType
    assert ARRAY_TYPES[array.dataType] == dtype, where
    assert tuple(array.shape) == shape, where


def test_bundle_has_apples_resources_metadata_and_recipe(fp32_bundle):
    import coremltools as ct

    names = {p.name for p in fp32_bundle.iterdir()}
    # StableDiffusionPipeline+Resources.swift:29-33: TextEncoder, Unet, VAEDecoder (compiled to
    # .mlmodelc by coremlcompiler), vocab.json and merges.txt
    assert {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"} <= names
    assert {"vocab.json", "merges.txt", "OneStepGenerator.mlpackage"} <= names
    manifest = read_manifest(fp32_bundle)
    assert manifest.details["options"]["compute_units"] == "ALL"
    assert manifest.details["parity"]["executed_on"].startswith(("MIL interpreter", "Core ML"))
    metadata = ct.utils.load_spec(str(fp32_bundle / "VAEDecoder.mlpackage")).description.metadata
    assert metadata.author == "instaflow-edge" and metadata.shortDescription
    defined = dict(metadata.userDefined)  # what an app sets decoderScaleFactor from
    assert (
        float(defined["instaflow_edge.vae_scaling_factor"]) == manifest.sampling.vae_scaling_factor
    )
    assert defined["instaflow_edge.prediction"] == manifest.sampling.prediction == "flow_prediction"
    assert "(noise - out) / vae_scaling_factor" in defined["instaflow_edge.recipe"]


@pytest.mark.slow
def test_fp16_split_einsum_matches_pytorch_at_35db(fp16_bundle, reference):
    manifest = read_manifest(fp16_bundle)
    assert manifest.details["options"]["attention"] == "split-einsum"
    assert manifest.details["notes"]["unet"]["split_einsum_vs_original_psnr_db"] > 100
    psnr = component_psnr(load_session(fp16_bundle), reference[2])
    print("coreml fp16 split-einsum tensor PSNR:", psnr)
    assert min(psnr.values()) >= 35, psnr


def test_interpreter_detects_a_misconverted_weight(fp32_bundle, reference):
    program = load_program(fp32_bundle / "Unet.mlpackage")
    io = reference[2]["unet"]
    spec = read_manifest(fp32_bundle).components["unet"].spec
    feeds = spec.to_graph({name: value[:1] for name, value in io.items()})
    expected = io["out_sample"][:1]
    good = program.run(feeds)["out_sample"]
    # the weight of the last convolution, the UNet's output layer: what a bad conversion spoils
    name = [step for step in program.steps if step.op_type == "conv"][-1].inputs["weight"]
    damaged = program.run(feeds, {name: program.constants[name] * np.float32(2)})
    assert tensor_metrics(expected, good)["psnr_db"] >= 60
    assert tensor_metrics(expected, damaged["out_sample"])["psnr_db"] < 60


@pytest.mark.slow
def test_palettize_4_of_an_fp16_bundle_is_smaller_still(fp16_bundle, reference, tmp_path):
    ids, noise, _, image = reference
    out = get_exporter("coreml").quantize(fp16_bundle, tmp_path / "p4", "palettize-4")
    sizes = read_manifest(out).details["sizes"]
    psnr = image_psnr(image, load_session(out).generate(ids, noise))
    print(f"coreml palettize-4: size ratio {sizes['ratio']:.2f}x, image PSNR {psnr:.1f} dB")
    assert sizes["ratio"] > 2.5  # 16 bits to 4, with the palettes and indices' overhead


@pytest.mark.slow
def test_compression_leaves_no_temporary_packages(fp16_bundle, tmp_path, monkeypatch):
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    get_exporter("coreml").quantize(fp16_bundle, tmp_path / "i8", "int8-linear")
    assert list(scratch.iterdir()) == []
    assert tempfile.gettempdir() == str(scratch)  # restored


@pytest.mark.slow
def test_mixed_bits_hold_the_target_psnr(pipeline, fp16_bundle, tmp_path):
    calibration = build_calibration(pipeline, PROMPTS, tmp_path / "set")
    options = {"target_psnr": 40, "calibration_samples": 2}
    out = get_exporter("coreml").quantize(
        fp16_bundle, tmp_path / "mixed", "mixed", calibration, options
    )
    details = read_manifest(out).details
    mixed = details["notes"]["unet"]["mixed"]
    print(
        f"coreml mixed: {mixed['layers_per_bits']}, one-step latents {mixed['one_step_psnr_db']:.1f}"
        f" dB, size ratio {details['sizes']['ratio']:.2f}x"
    )
    assert set(mixed["layer_bits"].values()) <= {4, 8}
    assert mixed["one_step_psnr_db"] >= 40 - 1  # the final package is palettized (k-means) anew


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the refusal off macOS")
def test_real_core_ml_off_macos_is_refused_in_one_sentence(fp32_bundle):
    with pytest.raises(RuntimeUnavailable, match="only on macOS"):
        load_session(fp32_bundle, device="coreml-device")
    with pytest.raises(RuntimeUnavailable, match="only on macOS"):
        load_session(fp32_bundle, require_device=True)
    assert load_session(fp32_bundle).executed_on == "MIL interpreter (Linux)"


@MACOS_ONLY
def test_core_ml_prediction_on_macos(fp32_bundle, reference):
    session = load_session(fp32_bundle, device="coreml-device", compute_units="CPU_ONLY")
    assert session.executed_on == "Core ML (CPU_ONLY)"
    assert min(component_psnr(load_session(fp32_bundle), reference[2]).values()) >= 60
