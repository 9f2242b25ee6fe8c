"""`instaflow-edge bench` over a model and over one bundle: what it writes and that every number
is an honest one (finite, positive, in its place). No test asserts a speed: timings are the
machine's."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
from PIL import Image

from instaflow_edge.benchmark import CSV_FIELDS, PARTS, REFERENCE
from instaflow_edge.cli import main
from instaflow_edge.client_peers import CLIENT_PEERS, client_python
from instaflow_edge.runtimes.torch_ref import PEERS
from tests.test_bad_inputs import assert_one_line


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: its exit status, stdout and stderr."""
    try:
        status = main(list(args))
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_honest(result: dict, parts: list[str], batches: list[int]) -> None:
    """One row per bundle, part and batch, each with positive finite timings and rates, the
    reference's PSNR left out and every bundle's present."""
    names = [entry["name"] for entry in result["bundles"]]
    assert names[0] == REFERENCE
    found = {(r["bundle"], r["part"], r["batch"]) for r in result["rows"]}
    assert found == {(n, p, b) for n in names for p in parts for b in batches}
    for row in result["rows"]:
        assert len(row["times_ms"]) == result["settings"]["runs"]
        for key in ("p50_ms", "p90_ms", "speedup_p50", "gflop", "gflop_per_s", "images_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        reference, peer = row["bundle"] == REFERENCE, row["bundle"] in PEERS
        assert (row["psnr_db"] is None) == reference
        assert (row["size_mib"] is None) == (reference or peer)  # PyTorch peers have no files
        if not reference:
            assert peer or row["size_mib"] > 0
            # "inf": identical; unrelated images score 7-9 dB (tiny's int8 ones about 20)
            assert row["psnr_db"] == "inf" or row["psnr_db"] > 15, row
    for entry in result["bundles"]:
        assert entry["peak_rss_mib"] is None or entry["peak_rss_mib"] >= 0
        assert entry["runtime"]["executed_on"]
    assert result["flops_per_sample"]["unet"] > 0
    environment = result["environment"]
    assert environment["cpu"]["model"] and isinstance(environment["cpu"]["flags"], list)
    assert environment["threads"]["cpu_count"] >= 1 and environment["threads"]["torch"] >= 1
    assert "torch" in environment["library_versions"]


def test_bench_over_the_model_writes_json_csv_png_and_markdown(capsys, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["bench", "--targets", "onnx,coreml", "--precisions", "fp32", "--methods"]
    args += ["int8-dynamic", "--presets", "none", "--batch", "1,2", "--runs", "2"]
    args += ["--warmup", "1", "--cache", str(cache), "--out", str(out)]
    status, printed, _ = cli(capsys, *args)
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.csv",
        "bench.json",
        "bench.md",
        "bench.png",
    ]
    result = json.loads((out / "bench.json").read_text())
    assert [e["name"] for e in result["bundles"]] == [
        REFERENCE,
        "onnx-fp32",
        "onnx-fp32-int8-dynamic",
    ]
    assert result["bundles"][2]["quantization"] == "int8-dynamic"
    assert_honest(result, list(PARTS), [1, 2])
    [skipped] = result["skipped"]  # Core ML predicts only on macOS: said, not timed
    assert skipped["bundle"] == "coreml" and "macOS" in skipped["reason"]
    assert "skipped coreml" in printed and "onnx-fp32-int8-dynamic" in printed
    assert result["command"].startswith("instaflow-edge bench --model tiny --targets onnx,coreml")

    with open(out / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 3 * len(PARTS) * 2
    ran = {row["executed_on"] for row in rows if row["bundle"] != REFERENCE}
    assert ran == {"CPUExecutionProvider"}
    image = Image.open(out / "bench.png")
    assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
    markdown = (out / "bench.md").read_text()
    assert result["command"] in markdown and "| onnx-fp32-int8-dynamic |" in markdown

    # a second bench reuses the cached bundles: nothing is exported again
    manifests = {p: p.stat().st_mtime_ns for p in cache.rglob("manifest.json")}
    again = ["bench", "--targets", "onnx", "--precisions", "fp32", "--methods", "none"]
    again += ["--presets", "none", "--components", "unet", "--runs", "1", "--warmup", "0"]
    status, printed, _ = cli(capsys, *again, "--cache", str(cache))
    assert status == 0 and "onnx-fp32 " in printed
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("manifest.json")} == manifests


def test_bench_of_one_bundle_times_it_beside_its_source_model(capsys, onnx_bundle, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--bundle", str(onnx_bundle), "--runs", "2", "--warmup", "1"]
    status, printed, _ = cli(capsys, *args, "--out", str(out))
    assert status == 0 and onnx_bundle.name in printed
    result = json.loads((out / "bench.json").read_text())
    assert [e["name"] for e in result["bundles"]] == [REFERENCE, onnx_bundle.name]
    assert result["model"]["id"] == "embedded:tiny"
    assert_honest(result, list(PARTS), [1])
    status, _, _ = cli(capsys, *args, "--components", "unet", "--out", str(out), "--overwrite")
    assert status == 0
    assert {r["part"] for r in json.loads((out / "bench.json").read_text())["rows"]} == {"unet"}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--targets", "tflite"], ["unknown target 'tflite'"]),
        (["--precisions", "fp8"], ["unknown precision 'fp8'"]),
        (["--targets", "onnx", "--methods", "int4-weights"], ["unknown method 'int4-weights'"]),
        (["--presets", "slowest"], ["unknown preset 'slowest'"]),
        (["--components", "unet,clip"], ["unknown component 'clip'"]),
        (["--batch", "1,x"], ["batch sizes", "'1,x'"]),
        (["--batch", "0"], ["batch sizes"]),
        (["--runs", "0"], ["--runs"]),
        (["--runtime-option", "warp=9"], ["unknown runtime option 'warp'"]),
        (["--targets", "onnx", "--runtime-option", "openvino:threads=2"], ["not benchmarked"]),
        (["--runtime-option", "threads=many"], ["threads expects int"]),
        (["--reference", "tiny"], ["--reference applies to --bundle"]),
    ],
)
def test_bench_mistakes_are_one_line(capsys, tmp_path, args, words):
    status, _, err = cli(capsys, "bench", "--cache", str(tmp_path / "cache"), *args)
    assert_one_line(status, err, 2, *words)
    assert list(tmp_path.iterdir()) == []


def test_bench_out_and_bundle_mistakes_are_one_line(capsys, onnx_bundle, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(tmp_path / "mine")], ["already exists", "--overwrite"]),
        (["--out", str(tmp_path / "mine"), "--overwrite"], ["not a folder this toolkit wrote"]),
        (["--bundle", str(onnx_bundle), "--targets", "onnx"], ["--targets applies to a bench"]),
        (["--bundle", str(tmp_path / "none")], ["does not exist"]),
    ]
    for args, words in cases:
        status, _, err = cli(capsys, "bench", *args)
        assert_one_line(status, err, 2, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_the_readmes_performance_tables_are_generated_from_the_committed_results():
    from bench.readme_table import README, render

    readme = README.read_text()
    assert "<!-- bench:bench_tiny -->" in readme
    assert render(readme) == readme, "run python bench/readme_table.py"


def test_pytorch_peers_are_timed_beside_the_bundles(capsys, tmp_path):
    args = ["bench", "--targets", "onnx", "--precisions", "fp32", "--methods", "none"]
    args += ["--presets", "none", "--peers", "pytorch-bf16", "--components", "unet,end_to_end"]
    args += ["--runs", "2", "--warmup", "1", "--cache", str(tmp_path / "cache")]
    status, printed, _ = cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert status == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [e["name"] for e in result["bundles"]] == [REFERENCE, "pytorch-bf16", "onnx-fp32"]
    assert_honest(result, ["unet", "end_to_end"], [1])
    [unet] = [r for r in result["rows"] if r["bundle"] == "pytorch-bf16" and r["part"] == "unet"]
    assert 30 < unet["psnr_db"] < 100  # it did run in bf16: close to fp32, not equal
    assert "--peers pytorch-bf16" in result["command"] and "pytorch-bf16" in printed
    status, _, error = cli(capsys, "bench", "--peers", "onnxruntime")
    assert status == 2 and "unknown peer 'onnxruntime'" in error


def test_a_client_peer_without_its_venv_is_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("INSTAFLOW_CLIENT_VENVS", str(tmp_path / "venvs"))
    cache = tmp_path / "cache"
    status, _, error = cli(capsys, "bench", "--peers", "optimum-intel", "--cache", str(cache))
    assert_one_line(status, error, 2, "peer optimum-intel needs the optimum-intel venv")
    assert not cache.exists()  # nothing was made


@pytest.mark.slow
def test_the_clients_own_exports_are_timed_beside_the_bundles(capsys, tmp_path):
    venvs = {peer.client for peer in CLIENT_PEERS.values()}
    missing = sorted(venv for venv in venvs if client_python(venv) is None)
    if missing:
        message = f"no {missing[0]} venv: build it with clients/build_venvs.sh (make clients)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    peers = ["optimum-onnx", "optimum-intel", "optimum-intel-hybrid"]
    args = ["bench", "--targets", "openvino", "--precisions", "fp32", "--methods", "none"]
    args += ["--presets", "none", "--peers", ",".join(peers), "--runs", "2", "--warmup", "1"]
    args += ["--components", "text_encoder,unet,end_to_end", "--cache", str(tmp_path / "cache")]
    status, printed, _ = cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert status == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [e["name"] for e in result["bundles"]] == [REFERENCE, *peers, "openvino-fp32"]
    assert_honest(result, ["text_encoder", "unet", "end_to_end"], [1])
    psnr = {(r["bundle"], r["part"]): r["psnr_db"] for r in result["rows"]}
    size = {(r["bundle"], r["part"]): r["size_mib"] for r in result["rows"]}
    # optimum-onnx's own fp32 export of our saved model computes what PyTorch does: its text
    # encoder too (transformers 4.57 left it randomly initialized, 9 dB, before our saved
    # weights took the `text_model.` names)
    assert (
        psnr["optimum-onnx", "text_encoder"] == "inf" or psnr["optimum-onnx", "text_encoder"] > 100
    )
    assert psnr["optimum-onnx", "end_to_end"] == "inf" or psnr["optimum-onnx", "end_to_end"] > 60
    # OpenVINO's default precision: bf16 where the CPU has it (about 47 dB), else f32 (identical)
    assert psnr["optimum-intel", "end_to_end"] == "inf" or psnr["optimum-intel", "end_to_end"] > 30
    assert size["optimum-intel-hybrid", "unet"] < size["optimum-intel", "unet"] / 2  # int8
    info = {e["name"]: e for e in result["bundles"]}
    for peer in peers:
        assert info[peer]["peer"] == CLIENT_PEERS[peer].description and peer in printed
        assert info[peer]["runtime"]["client_version"] and info[peer]["peak_rss_mib"] > 0
        assert info[peer]["runtime"]["export_seconds"] > 0  # made by the client in this run
    assert info["optimum-intel"]["runtime"]["inference_precision"]


def test_the_torch_compile_peer_shares_the_references_weights_and_leaves_it_eager(pipeline):
    import torch

    from instaflow_edge.runtimes.torch_ref import compiled

    peer = compiled(pipeline)
    assert (
        peer.unet._orig_mod is pipeline.unet and peer.vae.decoder._orig_mod is pipeline.vae.decoder
    )
    assert peer.vae.post_quant_conv is pipeline.vae.post_quant_conv
    assert peer.text_encoder is pipeline.text_encoder
    for module in (pipeline.unet, pipeline.vae, pipeline.vae.decoder):  # the reference: eager
        assert not isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
        assert module._compiled_call_impl is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor compiles C++: no compiler here")
def test_the_torch_compile_peer_runs_the_compiled_model(capsys, tmp_path):
    args = ["bench", "--targets", "onnx", "--precisions", "fp32", "--methods", "none"]
    args += ["--presets", "none", "--peers", "torch-compile", "--components", "unet,vae_decoder"]
    args += ["--runs", "2", "--warmup", "1", "--cache", str(tmp_path / "cache")]
    from torch._dynamo.utils import counters

    counters.clear()
    status, _, _ = cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert status == 0
    assert counters["stats"]["unique_graphs"] >= 2  # inductor did compile the UNet and decoder
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [e["name"] for e in result["bundles"]] == [REFERENCE, "torch-compile", "onnx-fp32"]
    assert_honest(result, ["unet", "vae_decoder"], [1])
    for row in result["rows"]:
        if row["bundle"] == "torch-compile":  # the same fp32 math, fused by inductor
            assert row["psnr_db"] == "inf" or row["psnr_db"] > 60, row
