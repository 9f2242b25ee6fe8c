"""validate and bench: parity from text, gates, reports, latency, on copies of the ONNX bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_edge.gates import gate_basis
from instaflow_edge.manifest import (
    read_manifest,
    write_manifest,
)
from instaflow_edge.report import render_html
from instaflow_edge.validate import REPORT_SCHEMA_VERSION, bundle_gates
from tests.conftest import assert_one_line_error, run_cli

FAST = ["--limit", "2", "--runs", "1", "--warmup", "0"]
REPORT_KEYS = {
    "schema_version",
    "tool",
    "toolkit_version",
    "created",
    "status",
    "summary",
    "reason",
    "failures",
    "bundle",
    "reference",
    "inputs",
    "gates",
    "tokenizer",
    "components",
    "end_to_end",
    "latency",
    "environment",
}


def bundle_copy(source, out, damage_unet=False, manifest_change=None, tokenizer_change=None):
    """A copy of an ONNX bundle: its UNet's output layer scaled by 1.5 (`damage_unet`), its
    manifest's fields or its tokenizer changed, and re-signed, so that the sha256 check lets it
    through and the gates must catch what is wrong."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from instaflow_edge.manifest import sha256_file

    copy = Path(shutil.copytree(source, out))
    manifest = read_manifest(copy)
    if damage_unet:
        path = copy / "unet" / "model.onnx"
        model = onnx.load(str(path))
        last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]
        weight = next(t for t in model.graph.initializer if t.name == last_conv.input[1])
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
        onnx.save(model, str(path))
        manifest.components["unet"].files["unet/model.onnx"] = sha256_file(path)
    if tokenizer_change is not None:
        path = copy / "tokenizer" / "tokenizer.json"
        data = json.loads(path.read_text())
        tokenizer_change(data["model"]["vocab"])
        path.write_text(json.dumps(data))
        manifest.assets["tokenizer/tokenizer.json"] = sha256_file(path)
    if manifest_change is not None:
        manifest_change(manifest)
    write_manifest(copy, manifest)
    return copy


@pytest.fixture(scope="module")
def bundle(onnx_bundle, tmp_path_factory):
    return bundle_copy(onnx_bundle, tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def damaged(onnx_bundle, tmp_path_factory):
    return bundle_copy(onnx_bundle, tmp_path_factory.mktemp("d") / "damaged", damage_unet=True)


def validate(bundle, *args, report=None):
    report = report or bundle.with_name(f"{bundle.name}-report")
    result = run_cli("validate", "--bundle", str(bundle), "--reference", "tiny", *FAST, *args)
    data = json.loads((report / "report.json").read_text()) if report.exists() else None
    return result, data


@pytest.fixture(scope="module")
def passed(bundle):
    result, report = validate(bundle)
    html = (bundle.with_name(f"{bundle.name}-report") / "report.html").read_text()
    return result, report, html


def test_matching_bundle_passes_and_writes_both_reports(passed):
    result, report, _ = passed
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(report) == REPORT_KEYS and report["schema_version"] == REPORT_SCHEMA_VERSION
    assert report["status"] == "passed" and report["failures"] == []
    assert report["reference"]["matches_bundle_source"] is True
    assert report["gates"]["basis"] == "fp32" and report["gates"]["min_tensor_psnr_db"] == 60.0
    for name in ("text_encoder", "unet", "vae_decoder"):
        component = report["components"][name]
        assert component["compared"] and all(check["passed"] for check in component["checks"])
    assert report["inputs"]["prompts"] == [
        "two small black squares",
        "two large yellow triangles",
    ]  # the first of the synthetic set, the default for the embedded model
    assert report["inputs"]["seeds"] == [0, 1] and report["inputs"]["timestep"] == 1000.0
    rows = report["latency"]["rows"]
    assert set(rows) == {"text_encoder", "unet", "vae_decoder", "generator", "end_to_end"}
    assert all(row["bundle"]["p50_ms"] > 0 and row["ratio_p50"] > 0 for row in rows.values())
    environment = report["environment"]
    assert environment["device"] == "cpu"
    assert environment["bundle_executed_on"] == "CPUExecutionProvider"  # what ran, as ORT says
    assert environment["runtime"]["runtime"] == "onnxruntime" and environment["runtime"]["fused"]
    assert environment["threads"]["torch"] == torch.get_num_threads()
    assert {"torch", "instaflow-edge"} <= set(environment["library_versions"])
    assert "passed" in result.stdout
    assert re.search(r"report: \S+report\.html", result.stdout)


def test_damaged_unet_fails_with_exit_1_naming_the_component(damaged):
    result, report = validate(damaged)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(summary) == 1 and "unet" in summary[0] and "tensor PSNR" in summary[0]
    assert "text_encoder" not in summary[0]  # only what failed is named
    assert report["status"] == "failed"
    assert {failure["where"] for failure in report["failures"]} >= {"unet"}
    unet = report["components"]["unet"]["outputs"]["out_sample"]
    assert unet["psnr_db"] < 60 and report["components"]["text_encoder"]["checks"][1]["passed"]


def test_gates_are_overridable_and_recorded(damaged, tmp_path, capsys):
    from instaflow_edge.cli import main

    args = ["--min-tensor-psnr", "off", "--min-image-psnr", "3", "--report", str(tmp_path / "r")]
    status = main(["validate", "--bundle", str(damaged), "--reference", "tiny", *FAST, *args])
    assert status == 0, capsys.readouterr()
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    gates = report["gates"]
    assert gates["min_tensor_psnr_db"] is None and gates["min_image_psnr_db"] == 3.0
    assert sorted(gates["overridden"]) == ["min_image_psnr_db", "min_tensor_psnr_db"]
    assert [c["gate"] for c in report["end_to_end"]["checks"]] == [
        "finite (no NaN/Inf)",
        "image PSNR",
    ]
    assert "overridden" in (tmp_path / "r" / "report.html").read_text()


def test_tampered_file_is_refused_before_running(onnx_bundle, tmp_path):
    bundle = bundle_copy(onnx_bundle, tmp_path / "bundle")
    path = bundle / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result, report = validate(bundle)
    assert_one_line_error(result, "unet/model.onnx", "sha256")
    assert result.returncode == 2 and report is None  # nothing ran, no report


def test_the_pytorch_reference_posing_as_a_bundle_is_refused(onnx_bundle, tmp_path):
    def pose(manifest):
        manifest.runtime = "torch_ref"

    bundle = bundle_copy(onnx_bundle, tmp_path / "bundle", manifest_change=pose)
    result, report = validate(bundle)
    assert_one_line_error(result, "names the PyTorch reference as its runtime")
    assert result.returncode == 2 and report is None


def test_reference_that_differs_from_the_source_is_flagged(onnx_bundle, tmp_path, caplog):
    from instaflow_edge.validate import validate_bundle

    bundle = bundle_copy(onnx_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source_model"]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level("WARNING", logger="instaflow_edge")
    validation = validate_bundle(bundle, ["a red circle"], reference_model="tiny", runs=1, warmup=0)
    assert "not the model this bundle was exported from" in caplog.text
    assert validation.report["reference"]["matches_bundle_source"] is False


def test_html_report_is_self_contained(passed):
    html = passed[2]
    assert "http://" not in html and "https://" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<svg" in html and "end_to_end" in html and "unet" in html


def test_html_key_value_tables_have_no_empty_header_row(passed):
    html = passed[2]
    assert "<th></th>" not in html
    assert "<tr><th>bundle</th><td>" in html


def test_default_gates_follow_the_bundle_kind(onnx_bundle, tmp_path):
    cases = {("fp32", None): "fp32", ("fp16", None): "fp16", ("fp32", "int8-static"): "quantized"}
    for index, ((precision, quantization), basis) in enumerate(cases.items()):

        def change(manifest, precision=precision, quantization=quantization):
            manifest.precision, manifest.quantization = precision, quantization

        manifest = read_manifest(
            bundle_copy(onnx_bundle, tmp_path / str(index), manifest_change=change)
        )
        assert gate_basis(manifest.precision, manifest.quantization) == basis
    gates = bundle_gates(manifest, {"min_unet_cosine": 0.99})
    assert (gates.min_image_psnr_db, gates.min_unet_cosine) == (25.0, 0.99)
    assert gates.min_tensor_psnr_db is None and gates.overridden == ["min_unet_cosine"]


def test_nan_output_fails_the_finite_gate(bundle, monkeypatch):
    from instaflow_edge.runtimes.onnxruntime import OnnxSession
    from instaflow_edge.validate import validate_bundle

    original = OnnxSession.infer

    def nan_vae(self, component, inputs):
        outputs = original(self, component, inputs)
        if component == "vae_decoder":
            outputs["sample"] = np.full_like(outputs["sample"], np.nan)
        return outputs

    monkeypatch.setattr(OnnxSession, "infer", nan_vae)
    validation = validate_bundle(bundle, ["a red circle"], reference_model="tiny", runs=1, warmup=0)
    failures = validation.report["failures"]
    assert [(f["where"], f["gate"]) for f in failures] == [
        ("vae_decoder", "sample finite (no NaN/Inf)"),
        ("end_to_end", "finite (no NaN/Inf)"),  # the images too
        ("end_to_end", "image PSNR"),
    ]
    assert "vae_decoder: sample finite (no NaN/Inf) failed" in validation.report["summary"]
    assert render_html(validation.report).count('class="failed"') >= 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--bundle", "nowhere"], ["nowhere", "does not exist"]),
        (["--runs", "0"], ["--runs"]),
        (["--prompts", "no-such-set"], ["no-such-set", "general", "synthetic"]),
    ],
)
def test_validate_mistakes_are_one_line(bundle, args, words):
    base = ["--bundle", str(bundle)] if args[0] != "--bundle" else []
    assert_one_line_error(run_cli("validate", *base, *args), *words)


def test_a_runtime_that_cannot_run_here_is_reported_skipped_never_passed(
    bundle, tmp_path, monkeypatch, capsys
):
    import instaflow_edge.validate as validate_module
    from instaflow_edge.cli import main
    from instaflow_edge.runtimes import RuntimeUnavailable

    def unavailable(*args, **kwargs):
        raise RuntimeUnavailable("Core ML runs only on macOS")

    monkeypatch.setattr(validate_module, "load_session", unavailable)
    status = main(["validate", "--bundle", str(bundle), "--report", str(tmp_path / "r")])
    assert status == 3
    assert "skipped: Core ML runs only on macOS" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["status"] == "skipped" and report["reason"] == "Core ML runs only on macOS"
    assert "skipped" in (tmp_path / "r" / "report.html").read_text()


def swap_red_and_blue(vocab):
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]


def scale(factor):
    def change(manifest):
        manifest.sampling.vae_scaling_factor *= factor

    return change


@pytest.mark.parametrize(
    ("manifest_change", "tokenizer_change", "words"),
    [
        (None, swap_red_and_blue, "tokenizer: token ids identical to the reference's failed"),
        (scale(2.0), None, "end_to_end: image PSNR"),
        (scale(0.0), None, "end_to_end: finite (no NaN/Inf) failed"),
    ],
    ids=["tokenizer", "scaling-factor", "nan-images"],
)
def test_an_altered_bundle_fails_validate_naming_what_is_wrong(
    onnx_bundle, tmp_path, manifest_change, tokenizer_change, words
):
    bundle = bundle_copy(onnx_bundle, tmp_path / "b", False, manifest_change, tokenizer_change)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle above a blue square\n")
    result, report = validate(
        bundle, "--prompts", str(prompts), "--report", str(tmp_path / "r"), report=tmp_path / "r"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(summary) == 1 and words in summary[0], summary
    assert report["status"] == "failed"
