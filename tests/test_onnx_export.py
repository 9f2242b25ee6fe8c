"""What is ONNX's own in export: graph names and axes, fp16 I/O, CPU-optimised graphs, the CLI.

The promises every target keeps (parity, manifest, tamper refusal, atomicity) are in test_targets.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from instaflow_edge.export import get_exporter
from instaflow_edge.manifest import read_manifest
from tests.conftest import assert_one_line_error, run_cli


def test_graphs_have_the_spec_names_a_dynamic_batch_and_timestep_1000(onnx_bundle):
    unet = onnx.load(str(onnx_bundle / "unet" / "model.onnx"))
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in unet.graph.input
    }
    assert inputs == {
        "sample": ["batch", 4, 16, 16],
        "timestep": ["batch"],
        "encoder_hidden_states": ["batch", 32, 64],
    }
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["sampling"]["timestep"] == 1000.0
    assert manifest["components"]["generator"]["outputs"][0]["dtype"] == "uint8"


def test_fp16_export_keeps_fp32_io_and_passes_the_onnx_checker(pipeline, tmp_path):
    bundle = get_exporter("onnx").export(pipeline, tmp_path / "fp16", "fp16")
    unet = onnx.load(str(bundle / "unet" / "model.onnx"))
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet.graph.initializer)
    for component in ("text_encoder", "unet", "vae_decoder"):  # nodes in topological order
        onnx.checker.check_model(str(bundle / component / "model.onnx"), full_check=True)


def test_cpu_optimised_graphs_run_on_cpu_and_keep_parity(pipeline, tmp_path):
    bundle = get_exporter("onnx").export(pipeline, tmp_path / "opt", "fp32", {"device": "cpu"})
    unet = onnx.load(str(bundle / "unet" / "model.onnx"))
    ops = {node.op_type for node in unet.graph.node}
    assert "MultiHeadAttention" in ops and "NhwcConv" not in ops  # fused, CPU-safe
    assert read_manifest(bundle).details["parity"]["components"]["unet"]["psnr_db"] >= 60


def test_cli_refuses_a_tampered_bundle_in_one_line(onnx_bundle, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "tampered")
    model = bundle / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    result = run_cli(
        "generate", "--bundle", str(bundle), "-p", "a red circle", "--out", str(tmp_path / "x.png")
    )
    assert_one_line_error(result, "unet/model.onnx")
    assert not (tmp_path / "x.png").exists()


def test_cli_export_overwrite_never_deletes_a_folder_that_is_not_a_bundle(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = run_cli("export", "--out", str(folder), "--overwrite")
    assert_one_line_error(result, "not a folder this toolkit wrote", "manifest.json")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_cli_export_that_misses_a_gate_exits_1_and_writes_nothing(tmp_path):
    result = run_cli("export", "--out", str(tmp_path / "b"), "--min-tensor-psnr", "200")
    assert result.returncode == 1
    assert_one_line_error(result, "missed its parity gates", "< 200.00 dB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target", "tflite"], ["unknown target 'tflite'", "onnx"]),
        (["--precision", "int3"], ["invalid choice: 'int3'", "fp16"]),
        (["--compute-units", "ALL"], ["--compute-units does not apply to target onnx"]),
        (["--device", "tpu"], ["invalid choice: 'tpu'", "cuda"]),
    ],
)
def test_cli_export_mistakes_are_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli("export", *args, "--out", str(tmp_path / "b")), *words)
    assert not (tmp_path / "b").exists()
