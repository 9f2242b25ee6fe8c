"""The contract every target keeps, checked the same way for each target by one suite.

Targets: onnx, openvino, coreml, and "toy", a fourth target that the suite adds as one exporter
module and one runtime module (tests/toy_target/) and nothing else. Per target: the export is
checked where it happens and refused when it misses a gate, the manifest lists and hashes every
file and names the runtime, any runtime loads the bundle by its manifest and reproduces PyTorch
on inputs the export never saw, a tampered file is refused, an interrupted export leaves
nothing; per quantization method: the same promises against the source bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_edge import export as export_package
from instaflow_edge import runtimes as runtimes_package
from instaflow_edge.calibration.prompts import load_prompts
from instaflow_edge.cli import main
from instaflow_edge.components import COMPONENTS, RECIPE
from instaflow_edge.errors import UserError
from instaflow_edge.export import get_exporter, target_names
from instaflow_edge.gates import GateFailed
from instaflow_edge.manifest import MANIFEST_NAME, BundleError, read_manifest
from instaflow_edge.metrics import image_psnr
from instaflow_edge.runtimes import get_runtime, load_session
from tests.conftest import assert_one_line_error, component_psnr, run_cli

TOY = Path(__file__).parent / "toy_target"
TARGETS = ["onnx", "openvino", "coreml", "toy"]
# (target, method): every quantization method that runs in seconds on the embedded model
METHODS = [
    ("onnx", "fp16"),
    ("onnx", "int8-dynamic"),
    ("onnx", "int8-dynamic-all"),
    ("onnx", "int8-static"),
    ("openvino", "int8-weights"),
    ("openvino", "hybrid"),
    ("openvino", "hybrid-vae"),
    ("openvino", "int8-full"),
    ("coreml", "palettize-8"),
    ("coreml", "int8-linear"),
    ("toy", "fp16"),
]
# the slow tier's: the fast one keeps at least one method per target
SLOW_METHODS = {
    ("openvino", "int8-full"),
    ("openvino", "hybrid"),
    ("openvino", "hybrid-vae"),
    ("onnx", "int8-dynamic-all"),
    ("coreml", "palettize-8"),
}
# the targets whose export takes 10-20 s here: some repeated checks of them are in the slow tier
HEAVY = [pytest.param(target, marks=pytest.mark.slow) for target in ("openvino", "coreml")]
UNSEEN_PROMPTS = load_prompts("synthetic")[200:202]  # neither the export check nor calibration
UNSEEN_SEEDS = [200, 201]


@pytest.fixture(scope="session", autouse=True)
def toy_target():
    """Add the toy target's two modules to the export and runtime packages' paths."""
    export_package.__path__.append(str(TOY / "export"))
    runtimes_package.__path__.append(str(TOY / "runtimes"))
    yield
    export_package.__path__.remove(str(TOY / "export"))
    runtimes_package.__path__.remove(str(TOY / "runtimes"))


@pytest.fixture(scope="session")
def unseen(pipeline):
    """PyTorch's tensors and images on prompts and seeds the export check never used."""
    ids, noise = pipeline.tokenize(UNSEEN_PROMPTS), pipeline.make_noise(UNSEEN_SEEDS)
    images = pipeline(input_ids=ids, noise=noise, output_type="np")
    return ids.numpy(), noise.numpy(), pipeline.component_io(ids, noise), images


def all_files(bundle: Path) -> set[str]:
    return {
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


# -- export ---------------------------------------------------------------------------------------
def test_a_new_target_is_one_exporter_and_one_runtime_module():
    assert "toy" in target_names()
    assert {get_exporter(target).target for target in TARGETS} == set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_export_records_parity_through_its_runtime_and_passes_the_gates(bundles, target):
    bundle = bundles(target)
    manifest = read_manifest(bundle)
    assert (manifest.target, manifest.runtime) == (target, get_exporter(target).runtime)
    assert (manifest.precision, manifest.quantization) == ("fp32", None)
    assert manifest.sampling.timestep == 1000.0
    parity = manifest.details["parity"]
    assert parity["against"] == "PyTorch" and parity["gates"]["min_tensor_psnr_db"] == 60
    assert set(parity["components"]) == set(COMPONENTS)  # the fused generator too
    for name in RECIPE:
        assert float(parity["components"][name]["psnr_db"]) >= 60, parity["components"][name]
    for part in [*parity["components"].values(), parity["end_to_end"]]:
        assert (
            part["checks"]
            and all(check["passed"] for check in part["checks"])
            or (not part["checks"] and "image_psnr_db" in part)
        )


@pytest.mark.parametrize("target", TARGETS)
def test_validate_passes_what_export_wrote(bundles, target, tmp_path):
    """`validate` at its defaults, as a user runs it, on every target's bundle (it once stopped
    with a traceback on Core ML's: its text encoder takes the token ids as float32, and the
    PyTorch reference was timed on them)."""
    report = tmp_path / "report"
    validate = ["validate", "--bundle", str(bundles(target)), "--runs", "1", "--warmup", "0"]
    assert main([*validate, "--report", str(report)]) == 0, failed_gates(report)
    assert json.loads((report / "report.json").read_text())["latency"]["rows"]


def _held_at_each_conversion(monkeypatch, exporter, model) -> dict[str, set[str]]:
    """Which of the model's modules still hold their weights as each graph is converted."""
    held: dict[str, set[str]] = {}
    convert = exporter.convert

    def recording(job):
        held[job.spec.name] = {
            name
            for name in ("text_encoder", "unet", "vae")
            if not any(p.is_meta for p in getattr(model, name).parameters())
        }
        return convert(job)

    monkeypatch.setattr(exporter, "convert", recording)
    return held


@pytest.mark.parametrize("target", ["onnx", "toy"])  # the flow is every target's
def test_an_export_that_frees_the_model_checks_the_same_numbers(
    bundles, target, tmp_path, monkeypatch
):
    """The export command frees each of the model's modules once its last graph is saved (the
    check needs only PyTorch's outputs, computed first), so the UNet's conversion does not sit
    beside the text encoder: the bundle and its parity are those of an export that kept the
    model."""
    from instaflow_edge.pipeline import OneStepPipeline

    model = OneStepPipeline.from_pretrained()
    exporter = get_exporter(target)
    held = _held_at_each_conversion(monkeypatch, exporter, model)
    out = exporter.export(model, tmp_path / "b", "fp32", release_model=True)
    assert held == {
        "text_encoder": {"text_encoder", "unet", "vae"},
        "unet": {"unet", "vae"},
        "vae_decoder": {"vae"},
    }
    assert all(
        p.is_meta for m in (model.text_encoder, model.unet, model.vae) for p in m.parameters()
    )
    assert read_manifest(out).source_model == read_manifest(bundles(target)).source_model
    freed, kept = (read_manifest(b).details["parity"] for b in (out, bundles(target)))
    for name in RECIPE:
        assert freed["components"][name]["psnr_db"] == kept["components"][name]["psnr_db"]
    assert freed["end_to_end"]["image_psnr_db"] == kept["end_to_end"]["image_psnr_db"]


def test_a_fused_export_frees_no_module_before_the_generator_graph(tmp_path, monkeypatch):
    """The fused generator holds every module's weights: they are freed only after it."""
    from instaflow_edge.pipeline import OneStepPipeline

    model = OneStepPipeline.from_pretrained()
    exporter = get_exporter("toy")
    held = _held_at_each_conversion(monkeypatch, exporter, model)
    exporter.export(model, tmp_path / "b", "fp32", {"fused": True}, release_model=True)
    assert held["generator"] == {"text_encoder", "unet", "vae"}
    assert held["vae_decoder"] == {"text_encoder", "unet", "vae"}
    assert all(p.is_meta for p in model.unet.parameters())


def test_an_export_leaves_no_garbage_beside_the_callers_model(pipeline, tmp_path):
    """bench goes on with the model after exporting it in the same process: what only reference
    cycles hold (traced graphs, sessions) is freed before export returns, not at Python's next
    collection, which may come after the next peak."""
    import gc

    gc.disable()  # only what export itself frees is freed
    try:
        get_exporter("onnx").export(pipeline, tmp_path / "b", "fp32")
        assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("target", TARGETS)
def test_manifest_is_a_closed_world(bundles, target):
    bundle = bundles(target)
    manifest = read_manifest(bundle)
    assert set(manifest.all_files()) == all_files(bundle)  # every file listed and hashed
    assert (bundle / "tokenizer" / "tokenizer.json").is_file()
    for name, entry in manifest.components.items():
        assert entry.file == get_exporter(target).layout[name]


@pytest.mark.parametrize("target", TARGETS)
def test_bundle_reproduces_pytorch_on_unseen_inputs(bundles, unseen, target):
    ids, noise, io, images = unseen
    session = load_session(bundles(target), fused=False)
    np.testing.assert_array_equal(session.tokenize(UNSEEN_PROMPTS), ids)  # its own tokenizer
    psnr = component_psnr(session, io)
    assert min(psnr.values()) >= 60, psnr
    three = session.generate(ids, noise)
    fused = load_session(bundles(target)).generate(ids, noise)  # the generator graph
    assert three.dtype == fused.dtype == np.uint8 and three.shape == images.shape
    assert image_psnr(images, three) >= 40 and image_psnr(images, fused) >= 40


@pytest.mark.parametrize("target", TARGETS)
def test_reduce_memory_holds_one_graph_at_a_time_and_makes_the_same_image(bundles, unseen, target):
    """`reduce_memory` (Apple's reduceMemory): each graph loads when it runs, the one before
    is released; the numbers are those of a session holding them all."""
    ids, noise, io, _ = unseen
    whole = load_session(bundles(target), fused=False)
    lean = load_session(bundles(target), fused=False, reduce_memory=True)
    assert list(lean.loaded) == ["text_encoder"] and set(whole.loaded) == set(whole.specs)
    np.testing.assert_array_equal(lean.generate(ids, noise), whole.generate(ids, noise))
    assert list(lean.loaded) == ["vae_decoder"]
    assert component_psnr(lean, io) == component_psnr(whole, io)
    assert lean.executed_on == whole.executed_on
    from instaflow_edge.export.base import load_for_check  # the export's check loads it so

    assert len(load_for_check(get_exporter(target).runtime, bundles(target), "cpu").loaded) == 1


@pytest.mark.parametrize("target", ["onnx", "openvino", "coreml"])
def test_reduce_memory_refuses_a_graph_that_disagrees_with_the_manifest_when_it_loads(
    bundles, unseen, target, tmp_path
):
    import shutil

    bundle = shutil.copytree(bundles(target), tmp_path / "edited")
    edit_manifest(bundle, half_sample)
    session = load_session(bundle, fused=False, reduce_memory=True)  # the UNet is not loaded yet
    ids, noise, _, _ = unseen
    for _ in range(2):  # a graph refused once is not held and run the next time
        with pytest.raises(UserError, match="unet.sample is float16 in the manifest but"):
            session.generate(ids, noise)


@pytest.mark.parametrize("target", TARGETS)
def test_tampered_file_is_refused_by_name(bundles, target, tmp_path):
    import shutil

    bundle = shutil.copytree(bundles(target), tmp_path / "tampered")
    name, _ = max(read_manifest(bundle).components["unet"].files.items(), key=lambda kv: kv[0])
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match"):
        load_session(bundle)


def edit_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    change(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def shorter_text(data: dict) -> None:
    """Prompt length 32 -> 16 everywhere: a manifest consistent in itself, not with its graphs."""
    components = data["components"]
    for tensor in [
        components["text_encoder"]["inputs"][0],
        components["text_encoder"]["outputs"][0],
        components["unet"]["inputs"][2],
        *(t for t in components.get("generator", {}).get("inputs", []) if t["name"] == "input_ids"),
    ]:
        tensor["shape"][-1 if tensor.get("layout") == "B,D,1,L" else 1] = 16


def half_sample(data: dict) -> None:
    data["components"]["unet"]["inputs"][0]["dtype"] = "float16"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("change", "words"),
    [(shorter_text, "has shape"), (half_sample, "unet.sample is float16 in the manifest but")],
)
def test_a_manifest_that_disagrees_with_its_graphs_is_refused(
    bundles, target, tmp_path, change, words
):
    import shutil

    bundle = shutil.copytree(bundles(target), tmp_path / "edited")
    edit_manifest(bundle, change)
    if target == "toy":  # TorchScript keeps no signature to check against
        pytest.skip("the toy target's graphs declare no tensors")
    with pytest.raises(UserError, match=words):
        load_session(bundle)


class ScaledUnet(torch.nn.Module):
    """A UNet whose output is 1% off: what a bad conversion of one layer would give."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states) * 1.01


@pytest.mark.parametrize("target", ["onnx", "toy", *HEAVY])
def test_a_parity_miss_fails_every_target_the_same_way(pipeline, target, tmp_path, monkeypatch):
    exporter = get_exporter(target)
    convert = exporter.convert

    def misconvert(job):
        if job.spec.name == "unet":
            job.module = ScaledUnet(job.module)
        return convert(job)

    monkeypatch.setattr(exporter, "convert", misconvert)
    with pytest.raises(GateFailed) as failed:
        exporter.export(pipeline, tmp_path / "bundle", "fp32")
    message = str(failed.value)
    assert message.startswith(f"{target} fp32 bundle missed its parity gates against PyTorch: ")
    assert "unet: out_sample tensor PSNR" in message and "< 60.00 dB" in message
    assert "text_encoder" not in message
    assert list(tmp_path.iterdir()) == []  # nothing committed, no staging left


@pytest.mark.parametrize("target", TARGETS)
def test_interrupted_export_leaves_nothing(pipeline, target, tmp_path, monkeypatch):
    exporter = get_exporter(target)

    def crash(model, path, job):
        raise RuntimeError("simulated crash mid-export")

    monkeypatch.setattr(exporter, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        exporter.export(pipeline, tmp_path / "bundle", "fp32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fp16_export_keeps_35_db(pipeline, unseen, target, tmp_path):
    bundle = get_exporter(target).export(pipeline, tmp_path / "fp16", "fp16")
    manifest = read_manifest(bundle)
    assert manifest.precision == "fp16" and manifest.details["parity"]["gates"]["basis"] == "fp16"
    psnr = component_psnr(load_session(bundle), unseen[2])
    assert min(psnr.values()) >= 35, psnr


@pytest.mark.parametrize("target", TARGETS)
def test_export_mistakes_are_one_line_user_errors(pipeline, target, tmp_path):
    exporter = get_exporter(target)
    with pytest.raises(UserError, match="unknown precision 'int3'"):
        exporter.export(pipeline, tmp_path / "b", "int3")
    with pytest.raises(UserError, match="unknown option 'colour' for .*; known: fused"):
        exporter.export(pipeline, tmp_path / "b", "fp32", {"colour": "red"})
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="already exists"):
        exporter.export(pipeline, tmp_path / "b", "fp32")


# -- quantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_a_quantizations_reference_runs_one_prompt_at_a_time_with_the_batchs_numbers(
    bundles, target, monkeypatch
):
    """quantize records the source bundle's outputs on the check prompts one prompt at a time
    (sd15's UNet at batch 4 held 2 GiB a map of attention scores, the command's peak); they are
    the numbers of the whole batch run at once, in the same order."""
    from instaflow_edge.export.base import CHECK_PROMPTS, check_prompts, load_for_check, session_io

    session = load_for_check(get_exporter(target).runtime, bundles(target), "cpu")
    batches, run = [], session.run
    monkeypatch.setattr(
        session,
        "run",
        lambda name, feeds: batches.append(len(next(iter(feeds.values())))) or run(name, feeds),
    )
    batch = len(CHECK_PROMPTS)
    reference = session_io(session, batch)
    assert batches == [1] * 3 * batch  # three graphs a prompt
    noise = np.random.default_rng(0).standard_normal(
        (batch, *session.recipe.latent_shape), dtype=np.float32
    )
    at_once = session.component_io(session.tokenize(check_prompts(batch)), noise)
    for name, tensors in at_once.items():
        for tensor, value in tensors.items():
            np.testing.assert_allclose(reference[name][tensor], value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("target", "method"),
    [
        pytest.param(*case, marks=pytest.mark.slow) if case in SLOW_METHODS else case
        for case in METHODS
    ],
)
def test_quantized_bundle_keeps_the_contract(bundles, quantized, unseen, target, method, tmp_path):
    exporter = get_exporter(target)
    source = bundles(target)
    bundle = quantized(target, method)
    manifest = read_manifest(bundle)
    assert (manifest.target, manifest.runtime, manifest.quantization) == (
        target,
        exporter.runtime,
        method,
    )
    assert manifest.source_model == read_manifest(source).source_model
    assert set(manifest.all_files()) == all_files(bundle)
    parity = manifest.details["parity"]
    assert parity["against"] == "source bundle"
    checks = [c for part in parity["components"].values() for c in part["checks"]]
    assert checks and all(c["passed"] for c in [*checks, *parity["end_to_end"]["checks"]])
    sizes = manifest.details["sizes"]
    assert sizes["bytes_after"] < sizes["bytes_before"]  # the weights did shrink
    if method in exporter.calibrated_methods:
        assert manifest.details["calibration"]["samples"] == 8
    ids, noise, _, images = unseen
    assert image_psnr(images, load_session(bundle, fused=False).generate(ids, noise)) >= 25
    # what quantize wrote, validate passes at its defaults (once 24 dB, on its worst prompt 10 dB,
    # when quantize checked one prompt and the int8 methods rounded the UNet's input noise)
    report = tmp_path / "report"
    validate = ["validate", "--bundle", str(bundle), "--runs", "1", "--warmup", "0"]
    assert main([*validate, "--report", str(report)]) == 0, failed_gates(report)


@pytest.mark.parametrize(
    ("target", "method"),
    [
        ("onnx", "int8-static"),
        ("onnx", "int8-dynamic-all"),
        *(("openvino", m) for m in ("hybrid", "hybrid-vae", "int8-full")),
    ],
)
def test_int8_activations_leave_the_unets_input_noise_unrounded(quantized, target, method):
    """At t=1000 the UNet's output carries its input noise through (Component.float_inputs):
    every method that quantizes activations leaves the ops reading it float."""
    bundle = quantized(target, method)
    path = bundle / read_manifest(bundle).components["unet"].file
    assert readers_of(path, "sample", target) == {"Convolution" if target == "openvino" else "Conv"}
    assert quantizes_activations(path, target)  # and the rest is int8


def readers_of(path: Path, tensor: str, target: str) -> set[str]:
    """The op types reading a graph input directly (past type conversions; not its shape)."""
    if target == "onnx":
        import onnx

        nodes = onnx.load(path, load_external_data=False).graph.node
        return {n.op_type for n in nodes if tensor in n.input and n.op_type != "Shape"}
    import openvino as ov

    model = ov.Core().read_model(path)
    pending = [p.output(0) for p in model.get_parameters() if tensor in p.output(0).get_names()]
    readers = set()
    while pending:
        for port in pending.pop().get_target_inputs():
            kind = port.get_node().get_type_name()
            if kind == "Convert":
                pending.append(port.get_node().output(0))
            elif kind != "ShapeOf":
                readers.add(kind)
    return readers


def quantizes_activations(path: Path, target: str) -> bool:
    if target == "openvino":
        return "FakeQuantize" in path.read_text()
    import onnx

    quantizing = {"QuantizeLinear", "DynamicQuantizeLinear"}
    return any(n.op_type in quantizing for n in onnx.load(path).graph.node)


def failed_gates(report: Path) -> list[str]:
    return json.loads((report / "report.json").read_text())["failures"]


def largest_int8_weight(bundle: Path) -> int:
    """The largest magnitude among the int8 weight constants of a quantized bundle's UNet."""
    manifest = read_manifest(bundle)
    path = bundle / manifest.components["unet"].file
    if manifest.target == "onnx":
        import onnx
        from onnx import numpy_helper

        weights = [
            numpy_helper.to_array(tensor)
            for tensor in onnx.load(path).graph.initializer
            if tensor.data_type == onnx.TensorProto.INT8
        ]
    else:
        import openvino as ov

        weights = [
            op.get_data()
            for op in ov.Core().read_model(path).get_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
        ]
    return max(int(np.abs(w.astype(np.int16)).max()) for w in weights)


@pytest.mark.parametrize(
    ("target", "method"),
    [
        ("onnx", "int8-static"),
        ("onnx", "int8-dynamic"),
        pytest.param("openvino", "int8-full", marks=pytest.mark.slow),
    ],
)
def test_int8_methods_write_7_bit_weights_unless_told_not_to(
    bundles, calibration, quantized, target, method, tmp_path
):
    """CPUs without VNNI (AVX2 only) saturate the 16-bit sums of uint8 x int8 products: 7-bit
    weights (ONNX Runtime's reduce_range, NNCF's overflow fix) keep what was calibrated there,
    so a bundle computes the same on every x86 CPU; the option says so in the manifest."""
    exporter = get_exporter(target)
    given = calibration if method in exporter.calibrated_methods else None
    seven = quantized(target, method)
    eight = tmp_path / "8"
    command = ["quantize", "--bundle", str(bundles(target)), "--method", method, "-o", str(eight)]
    assert (
        main(
            [*command, *(["--calibration", str(given)] if given else []), "--no-seven-bit-weights"]
        )
        == 0
    )
    assert largest_int8_weight(seven) <= 64 < largest_int8_weight(eight)
    assert read_manifest(seven).details["options"]["seven_bit_weights"] is True
    assert read_manifest(eight).details["options"]["seven_bit_weights"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_quantize_refusals_are_the_same_for_every_target(bundles, pipeline, target, tmp_path):
    exporter = get_exporter(target)
    source = bundles(target)
    with pytest.raises(UserError, match=f"unknown method 'int2' for target {target}; choose"):
        exporter.quantize(source, tmp_path / "q", "int2")
    for method in exporter.calibrated_methods[:1]:
        with pytest.raises(UserError, match=f"{method} needs --calibration SET"):
            exporter.quantize(source, tmp_path / "q", method)
        with pytest.raises(UserError, match="not a calibration set"):
            exporter.quantize(source, tmp_path / "q", method, tmp_path)
    assert not (tmp_path / "q").exists()


# -- runtimes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_edge_runtime_runs_with_torch_blocked(bundles, unseen, target, tmp_path):
    ids, noise, _, images = unseen
    np.save(tmp_path / "noise.npy", noise)
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        import numpy as np

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError(f"{{name}} is blocked")

        sys.meta_path.insert(0, Block())
        from instaflow_edge.runtimes import load_session

        session = load_session({str(bundles(target))!r})
        ids = session.tokenize({UNSEEN_PROMPTS!r})
        image = session.generate(ids, np.load({str(tmp_path / "noise.npy")!r}))
        np.save({str(tmp_path / "image.npy")!r}, image)
        loaded = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        print(json.dumps({{"ids": ids.tolist(), "loaded": loaded}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == [] and result["ids"] == ids.tolist()
    assert image_psnr(images, np.load(tmp_path / "image.npy")) >= 40


@pytest.mark.parametrize("target", TARGETS)
def test_unknown_runtime_option_names_the_known_ones(bundles, target):
    with pytest.raises(UserError, match="unknown option 'warp_speed'.*known: fused"):
        load_session(bundles(target), warp_speed=True)


@pytest.mark.parametrize("target", target_names())
def test_the_cli_export_prints_the_bundle_and_its_parity_and_no_library_noise(tmp_path, target):
    out = tmp_path / "b"
    result = run_cli("export", "--target", target, "--out", str(out))
    assert result.returncode == 0, result.stderr
    precision = get_exporter(target).default_precision
    assert f"bundle: {out} ({target}, {precision}, 3 graphs)" in result.stdout
    assert "unet" in result.stdout and "tensor PSNR" in result.stdout
    noise = [line for line in result.stderr.splitlines() if "Warning" in line or "Failed" in line]
    assert noise == []  # torch's TracerWarnings, coremltools' import warnings
    again = run_cli("export", "--target", target, "--out", str(out))
    assert_one_line_error(again, "already exists", "--overwrite")


THREADED = [  # the real targets whose runtime takes a thread count
    t for t in target_names() if "threads" in get_runtime(get_exporter(t).runtime).options.keys()
]


@pytest.mark.parametrize("target", THREADED)
def test_threads_beyond_the_cpus_run_on_the_cpus(bundles, target):
    cpus = len(os.sched_getaffinity(0))
    assert load_session(bundles(target), threads=cpus + 1).threads == cpus
    assert load_session(bundles(target), threads=1).threads == 1
    with pytest.raises(UserError, match="threads must be at least 1"):
        load_session(bundles(target), threads=0)


CALIBRATED_PRESETS = [  # the real targets' (the toy target registers itself in a fixture)
    (target, name)
    for target in target_names()
    for name, preset in get_exporter(target).presets.items()
    if preset.calibration_prompts
]


@pytest.mark.parametrize(("target", "name"), CALIBRATED_PRESETS)
def test_a_calibrated_preset_records_its_own_calibration_set_and_its_runtime_options(
    tmp_path, calibration, target, name, monkeypatch
):
    preset = get_exporter(target).presets[name]
    bundle = tmp_path / "int8"
    monkeypatch.chdir(tmp_path)  # a user's relative path (ONNX's pre-processing changes folder)
    assert main(["export", "--target", target, "--preset", name, "-o", "int8"]) == 0
    manifest = read_manifest(bundle)
    assert (manifest.quantization, manifest.details["preset"]) == (preset.method, name)
    assert manifest.runtime_options == preset.runtime_options
    assert manifest.details["parity"]["gates"]["basis"] == "quantized"
    assert not list(tmp_path.glob(".*"))  # its source bundle and calibration set are gone
    # a calibration set of the user's own instead
    status = main(["export", "--target", target, "--preset", name]
                  + ["--calibration", str(calibration), "-o", "theirs"])  # fmt: skip
    assert status == 0 and read_manifest(tmp_path / "theirs").quantization == preset.method


@pytest.mark.parametrize("target", TARGETS)
def test_presets_are_data_the_target_and_its_runtime_take(target):
    from instaflow_edge.export.base import PRECISIONS
    from instaflow_edge.runtimes import get_runtime

    exporter = get_exporter(target)
    for preset in exporter.presets.values():
        assert preset.why and preset.precision in PRECISIONS
        assert preset.method in (None, *exporter.methods)
        # a calibrated method's preset says how many prompts it records its calibration set from
        assert (preset.method in exporter.calibrated_methods) == (preset.calibration_prompts > 0)
        exporter.export_options.from_mapping(preset.export_options)
        get_runtime(exporter.runtime).options.from_mapping(preset.runtime_options)
    with pytest.raises(UserError, match=f"target {target} has no preset 'slowest'"):
        exporter.preset("slowest")
