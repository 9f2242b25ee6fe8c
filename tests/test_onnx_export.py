"""ONNX export of the embedded default: parity per graph, the fused generator, atomicity, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from instaflow_edge.export import get_exporter
from instaflow_edge.export import onnx as onnx_export
from instaflow_edge.manifest import BundleError
from instaflow_edge.metrics import image_psnr, tensor_metrics
from instaflow_edge.runtimes.onnxruntime import OnnxRuntime
from tests.conftest import assert_one_line_error, run_cli

PROMPTS = ["a red circle above a blue square", "two small green triangles"]
OUTPUTS = {"text_encoder": "last_hidden_state", "unet": "out_sample", "vae_decoder": "sample"}


def component_psnr(session, pipeline) -> dict[str, float]:
    """Each graph on PyTorch's exact inputs (batch 2: the batch axis is dynamic), tensor PSNR."""
    io = pipeline.component_io(pipeline.tokenize(PROMPTS), pipeline.make_noise([3, 4]))
    results = {}
    for name, output in OUTPUTS.items():
        feeds = {k: v for k, v in io[name].items() if k != output}
        produced = session.run(name, feeds)[output]
        results[name] = tensor_metrics(io[name][output], produced)["psnr_db"]
    return results


def test_fp32_export_matches_pytorch_on_every_graph(onnx_bundle, pipeline):
    assert sorted(p.name for p in onnx_bundle.iterdir()) == [
        "generator",
        "manifest.json",
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae_decoder",
    ]
    session = OnnxRuntime().load(onnx_bundle, "cpu")
    for name, psnr in component_psnr(session, pipeline).items():
        assert psnr >= 60, (name, psnr)


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


def test_fused_generator_matches_the_three_graphs_and_pytorch(onnx_bundle, pipeline):
    session = OnnxRuntime().load(onnx_bundle, "cpu", fused=False)
    ids = session.tokenize(PROMPTS)
    noise = pipeline.make_noise([5, 6]).numpy()
    fused = session.run("generator", {"input_ids": ids, "noise": noise})["image"]
    three_graphs = session.generate(ids, noise)
    reference = pipeline(
        input_ids=pipeline.tokenize(PROMPTS), noise=pipeline.make_noise([5, 6]), output_type="np"
    )
    assert fused.dtype == np.uint8 and fused.shape == (2, 64, 64, 3)
    assert image_psnr(three_graphs, fused) >= 60
    assert image_psnr(reference, fused) >= 60


def test_export_prints_parity_and_records_it(onnx_bundle):
    details = json.loads((onnx_bundle / "manifest.json").read_text())["details"]
    assert details["parity"]["against"] == "PyTorch"
    assert details["parity"]["unet"]["psnr_db"] >= 60


def test_fp16_export_keeps_fp32_io_and_35_db(pipeline, tmp_path):
    bundle = get_exporter("onnx").export(pipeline, tmp_path / "fp16", "fp16")
    unet = onnx.load(str(bundle / "unet" / "model.onnx"))
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet.graph.initializer)
    session = OnnxRuntime().load(bundle, "cpu")
    for name, psnr in component_psnr(session, pipeline).items():
        assert psnr >= 35, (name, psnr)


def test_cpu_optimised_graphs_run_on_cpu_and_keep_parity(pipeline, tmp_path):
    bundle = get_exporter("onnx").export(pipeline, tmp_path / "opt", "fp32", {"device": "cpu"})
    unet = onnx.load(str(bundle / "unet" / "model.onnx"))
    ops = {node.op_type for node in unet.graph.node}
    assert "MultiHeadAttention" in ops and "NhwcConv" not in ops  # fused, CPU-safe
    session = OnnxRuntime().load(bundle, "cpu")
    for name, psnr in component_psnr(session, pipeline).items():
        assert psnr >= 60, (name, psnr)


def test_interrupted_export_leaves_no_bundle(pipeline, tmp_path, monkeypatch):
    real_export_graph = onnx_export.export_graph

    def fail_at_the_unet(module, spec, path, inputs):
        if spec.name == "unet":
            raise RuntimeError("simulated crash mid-export")
        return real_export_graph(module, spec, path, inputs)

    monkeypatch.setattr(onnx_export, "export_graph", fail_at_the_unet)
    with pytest.raises(RuntimeError, match="simulated crash"):
        get_exporter("onnx").export(pipeline, tmp_path / "bundle", "fp32")
    assert list(tmp_path.iterdir()) == []


def test_tampered_bundle_is_refused_before_running(onnx_bundle, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "tampered")
    model = bundle / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet/model.onnx does not match"):
        OnnxRuntime().load(bundle, "cpu")
    result = run_cli(
        "generate", "--bundle", str(bundle), "-p", "a red circle", "--out", str(tmp_path / "x.png")
    )
    assert_one_line_error(result, "unet/model.onnx")
    assert not (tmp_path / "x.png").exists()


def test_cli_export_writes_a_bundle_and_prints_parity(tmp_path):
    result = run_cli("export", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert f"bundle: {tmp_path / 'b'} (onnx, fp32, 3 graphs)" in result.stdout
    assert "unet" in result.stdout and "tensor PSNR" in result.stdout
    again = run_cli("export", "--out", str(tmp_path / "b"))
    assert_one_line_error(again, "already exists", "--overwrite")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target", "tflite"], ["unknown target 'tflite'", "onnx"]),
        (["--precision", "int3"], ["unknown precision 'int3'", "fp16"]),
    ],
)
def test_cli_export_mistakes_are_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli("export", *args, "--out", str(tmp_path / "b")), *words)
    assert not (tmp_path / "b").exists()
