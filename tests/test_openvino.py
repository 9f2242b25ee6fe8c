"""What is OpenVINO's own: static or dynamic batch, NNCF's methods, devices and runtime options.

The promises every target keeps (parity, manifest, tamper refusal, quantization) are in
test_targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from instaflow_edge.calibration.dataset import load_calibration
from instaflow_edge.calibration.prompts import load_prompts
from instaflow_edge.cli import main
from instaflow_edge.errors import UserError
from instaflow_edge.export import get_exporter
from instaflow_edge.gates import GateFailed
from instaflow_edge.manifest import read_manifest
from instaflow_edge.metrics import image_psnr
from instaflow_edge.runtimes import RuntimeUnavailable, load_session
from tests.conftest import assert_one_line_error, component_psnr, run_cli

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def exporter():
    return get_exporter("openvino")


@pytest.fixture(scope="module")
def inputs(pipeline):
    """Token ids and noise that neither calibration nor the export check used."""
    prompts = load_prompts("synthetic")[200:203]
    return pipeline.tokenize(prompts), pipeline.make_noise([200, 201, 202])


@pytest.fixture(scope="module")
def reference(pipeline, inputs):
    return pipeline.component_io(*inputs), pipeline(
        input_ids=inputs[0], noise=inputs[1], output_type="np"
    )


@pytest.fixture(scope="module")
def fp32_bundle(bundles):
    return bundles("openvino")


def end_to_end_psnr(bundle, inputs, reference) -> float:
    session = load_session(bundle)
    return image_psnr(reference[1], session.generate(inputs[0].numpy(), inputs[1].numpy()))


def test_fp32_export_has_a_static_batch_and_runs_in_f32(fp32_bundle):
    for path in ("text_encoder", "unet", "vae_decoder"):
        assert (fp32_bundle / path / "openvino_model.xml").is_file()
        assert (fp32_bundle / path / "openvino_model.bin").is_file()
    manifest = read_manifest(fp32_bundle)
    assert manifest.components["unet"].spec.inputs[0].shape == (1, 4, 16, 16)  # static batch 1
    session = load_session(fp32_bundle)
    assert (session.executed_on, session.inference_precision) == ("CPU", "f32")


@pytest.mark.slow
def test_fp16_dynamic_batch_fused_export(
    pipeline, exporter, fp32_bundle, inputs, reference, tmp_path
):
    options = {"dynamic_batch": True, "fused": True}
    bundle = exporter.export(pipeline, tmp_path / "fp16", "fp16", options)
    manifest = read_manifest(bundle)
    assert manifest.precision == "fp16"
    assert manifest.components["unet"].spec.inputs[0].shape == ("batch", 4, 16, 16)
    size = (bundle / "unet" / "openvino_model.bin").stat().st_size
    assert size < 0.6 * (fp32_bundle / "unet" / "openvino_model.bin").stat().st_size
    psnr = component_psnr(load_session(bundle), reference[0])  # batch 3 in one call
    assert min(psnr.values()) >= 35, psnr
    fused = load_session(bundle).generate(inputs[0].numpy(), inputs[1].numpy())
    three = load_session(bundle, fused=False).generate(inputs[0].numpy(), inputs[1].numpy())
    assert fused.dtype == np.uint8 and fused.shape == (3, 64, 64, 3)
    assert image_psnr(three, fused) >= 40
    assert image_psnr(reference[1], fused) >= 35


@pytest.mark.slow
def test_int4_weights_are_refused_where_they_break_the_image(exporter, fp32_bundle, tmp_path):
    # the embedded default's narrow layers lose too much to 4 bits: 13 dB images on the check
    # prompts (one of them alone gave 22.5 dB, which a lowered gate let through)
    with pytest.raises(GateFailed, match="int4-weights bundle missed its parity gates"):
        exporter.quantize(fp32_bundle, tmp_path / "int4", "int4-weights")
    assert not (tmp_path / "int4").exists()
    gates_off = {"min_image_psnr_db": None, "min_unet_cosine": None}
    bundle = exporter.quantize(
        fp32_bundle, tmp_path / "int4", "int4-weights", gate_overrides=gates_off
    )
    import openvino as ov

    unet = ov.Core().read_model(bundle / "unet" / "openvino_model.xml")
    constants = [op for op in unet.get_ops() if op.get_type_name() == "Constant"]
    assert ov.Type.u4 in {op.get_element_type() for op in constants}
    assert read_manifest(bundle).details["parity"]["gates"]["min_image_psnr_db"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hybrid", "hybrid-vae", "int8-full"])
def test_calibrated_methods_quantize_the_activations_their_recipe_names(
    fp32_bundle, quantized, inputs, reference, method
):
    from instaflow_edge.export.openvino import CALIBRATED_RECIPES

    assert "generator" in read_manifest(fp32_bundle).components  # quantized from a fused export
    bundle = quantized("openvino", method)
    manifest = read_manifest(bundle)
    assert sorted(manifest.components) == ["text_encoder", "unet", "vae_decoder"]  # no generator
    for name, recipe in CALIBRATED_RECIPES[method].items():
        graph = (bundle / name / "openvino_model.xml").read_text()
        # activations are quantized (FakeQuantize) where the recipe says, else weights only
        assert ("FakeQuantize" in graph) == (recipe != "weights"), (name, recipe)
    # int8-full was at 19 dB on one of these prompts while it rounded the UNet's input noise
    assert end_to_end_psnr(bundle, inputs, reference) >= 25


def _resident_kib(path: Path) -> int:
    """How much of `path` this process's mappings hold resident (Linux's smaps), in KiB."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


@pytest.mark.parametrize("method", ["hybrid", "int8-full"])
def test_quantization_statistics_models_hold_only_what_they_need(
    fp32_bundle, calibration, method, monkeypatch, tmp_path
):
    """OpenVINO's CPU plugin runs a graph in the order of its outputs. NNCF's statistics models
    list the component's own output first, which ran the whole graph before any statistic and
    kept every activation alive (sd15's VAE decoder: 8.3 GiB to quantize, 1.8 GiB with its own
    output last). And the IR's mapped weights that NNCF read stayed resident beside the copy each
    compiled model makes (sd15's UNet int8-full: 9.0 GiB, 7.3 GiB without them). Every model
    compiled while quantizing lists the component's outputs last and starts with none of the
    weights file resident, and the quantized graph is the one NNCF makes without either."""
    import contextlib

    import openvino as ov

    from instaflow_edge.export import openvino as openvino_target
    from instaflow_edge.export.openvino import CALIBRATED_RECIPES, MODEL_FILE, nncf_quantize

    compiled = []  # per compile: the graph's outputs' names, and the weights' resident KiB
    compile_model = ov.Core.compile_model

    def spy(core, model, *args, **kwargs):
        results = [result.input_value(0).get_names() for result in model.get_results()]
        compiled.append((results, _resident_kib(weights)))
        return compile_model(core, model, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    manifest = read_manifest(fp32_bundle)
    calibrated = [name for name, how in CALIBRATED_RECIPES[method].items() if how != "weights"]
    for name in calibrated:
        spec = manifest.components[name].spec
        own = [tensor.name for tensor in spec.outputs]
        compiled.clear()
        weights = fp32_bundle / name / MODEL_FILE.replace(".xml", ".bin")
        model = ov.Core().read_model(fp32_bundle / name / MODEL_FILE)
        quantized = nncf_quantize(
            model, spec, method, load_calibration(calibration), weights=weights
        )
        # the graphs NNCF runs for statistics: the component's with outputs added
        statistics = [
            (results, resident)
            for results, resident in compiled
            if len(results) > len(own) and any(own[0] in names for names in results)
        ]
        assert statistics, name
        for results, resident in statistics:
            last = results[-len(own) :]
            assert all(o in names for o, names in zip(own, last, strict=True)), (name, last)
            assert resident == 0, (name, resident)
        ov.save_model(quantized, tmp_path / "lean.xml", compress_to_fp16=False)
        with monkeypatch.context() as default:
            default.setattr(
                openvino_target, "_statistics_models_lean", lambda *_: contextlib.nullcontext()
            )
            model = ov.Core().read_model(fp32_bundle / name / MODEL_FILE)
            quantized = nncf_quantize(model, spec, method, load_calibration(calibration))
        ov.save_model(quantized, tmp_path / "default.xml", compress_to_fp16=False)
        # the same constants: weights and quantization ranges (the graphs' texts differ in the
        # names OpenVINO numbers as it makes nodes)
        assert (tmp_path / "lean.bin").read_bytes() == (tmp_path / "default.bin").read_bytes()


def test_a_loaded_bundle_holds_none_of_its_weights_files_and_runs_the_same(fp32_bundle, inputs):
    """A compiled model computes from its CPU plugin's copy of the weights; the pages of the
    mapped weights files that compiling read are handed back (sd15's fp32 UNet: 3.3 GiB)."""
    from instaflow_edge.export.openvino import MODEL_FILE

    session = load_session(fp32_bundle)
    weights = [fp32_bundle / name / MODEL_FILE.replace(".xml", ".bin") for name in session.loaded]
    assert weights and all(_resident_kib(path) == 0 for path in weights)
    ids, noise = (tensor.numpy() for tensor in inputs)
    first = session.generate(ids, noise)
    again = session.generate(ids, noise)  # after running once, from the plugin's copy alone
    np.testing.assert_array_equal(first, again)
    # running reads back only the few constants the plugin uses in place (sd15's UNet: 10 MiB
    # of 3.3 GiB; this tiny model's small layers are more of its whole: 4 of 17 MiB)
    files_kib = sum(path.stat().st_size for path in weights) / 1024
    assert sum(_resident_kib(path) for path in weights) < files_kib / 2


def test_devices_and_options(fp32_bundle, tmp_path):
    with pytest.raises(RuntimeUnavailable, match="NPU is not present here; available: CPU"):
        load_session(fp32_bundle, "npu")
    with pytest.raises(UserError, match="unknown OpenVINO device 'cuda'"):
        load_session(fp32_bundle, "cuda")
    with pytest.raises(UserError, match="unknown performance_hint 'fastest'"):
        load_session(fp32_bundle, performance_hint="fastest")
    session = load_session(
        fp32_bundle,
        "AUTO",
        performance_hint="THROUGHPUT",
        threads=1,
        cache_dir=str(tmp_path / "cache"),
    )
    assert session.executed_on == "CPU" and session.threads == 1
    assert any((tmp_path / "cache").iterdir())
    default = load_session(fp32_bundle, inference_precision="default")
    assert default.inference_precision in ("f32", "bf16", "f16")


@pytest.mark.slow
def test_cli_export_and_quantize(tmp_path):
    bundle = tmp_path / "tiny-openvino"
    done = run_cli("export", "--target", "openvino", "--out", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "parity vs PyTorch on CPU" in done.stdout
    unet_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("unet"))
    assert float(unet_line.split("tensor PSNR ")[1].split(" dB")[0]) >= 60
    done = run_cli("quantize", "--bundle", str(bundle), "--method", "int8-weights")
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "tiny-openvino-int8-weights").quantization == "int8-weights"
    assert "parity vs source bundle" in done.stdout
    done = run_cli("quantize", "--bundle", str(bundle), "--method", "hybrid")
    assert_one_line_error(done, "hybrid needs --calibration")
    done = run_cli("quantize", "--bundle", str(bundle), "--method", "hybrid", "--target-psnr", "3")
    assert_one_line_error(done, "--target-psnr does not apply to target openvino")


def test_validate_runs_openvino_in_bf16_when_asked_and_records_it(fp32_bundle, tmp_path):
    report = tmp_path / "report"
    done = run_cli(
        "validate",
        "--bundle",
        str(fp32_bundle),
        "--runtime-option",
        "inference_precision=bf16",
        "--limit",
        "1",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--report",
        str(report),
    )
    data = json.loads((report / "report.json").read_text())
    runtime = data["environment"]["runtime"]
    assert runtime["inference_precision"] == "bf16" and runtime["runtime"] == "openvino"
    # what ran: bf16 where the CPU has it (then the fp32 gates fail: exit 1), else f32
    assert runtime["executed_precision"] in ("bf16", "f32")
    assert done.returncode == (1 if runtime["executed_precision"] == "bf16" else 0), done.stdout
    bad = run_cli("validate", "--bundle", str(fp32_bundle), "--runtime-option", "precision=bf16")
    assert_one_line_error(bad, "unknown option 'precision'", "inference_precision")


def test_the_fastest_cpu_preset_is_recorded_in_the_manifest_and_every_load_applies_it(
    tmp_path, capsys
):
    bundle = tmp_path / "fast"
    status = main(["export", "--target", "openvino", "--preset", "fastest-cpu", "-o", str(bundle)])
    assert status == 0
    assert "runtime options (recorded, applied at every load): inference_precision=bf16" in (
        capsys.readouterr().out
    )
    manifest = read_manifest(bundle)
    assert manifest.runtime_options == {"inference_precision": "bf16"}
    assert (manifest.precision, manifest.quantization) == ("fp32", None)
    assert manifest.details["preset"] == "fastest-cpu"
    # checked as it runs, in bf16 (on CPUs without bf16 OpenVINO runs f32), by fp16's gates
    assert manifest.details["parity"]["gates"]["basis"] == "fp16"
    session = load_session(bundle)
    assert session.options.inference_precision == "bf16"
    assert session.settings()["executed_precision"] in ("bf16", "f32")
    assert load_session(bundle, inference_precision="f32").inference_precision == "f32"
