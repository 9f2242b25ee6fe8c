"""What is ONNX's own in quantization: fp16's overflow fallback, which ops int8 quantizes, QDQ.

The promises every method keeps (gates, manifest, parity against the source) are in test_targets.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from instaflow_edge.atomic import unfinished
from instaflow_edge.calibration.builder import build_calibration
from instaflow_edge.components import ComponentSpec, TensorSpec
from instaflow_edge.export import get_exporter
from instaflow_edge.export.onnx import convert_to_fp16
from instaflow_edge.manifest import verify_bundle
from instaflow_edge.metrics import image_psnr
from instaflow_edge.runtimes.onnxruntime import OnnxRuntime
from tests.conftest import assert_one_line_error, run_cli

PROMPT = "a red circle above a blue square"
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
CALIBRATION_PROMPTS = [
    f"a {c} {s} above a {d} square" for c in COLOURS for s in SHAPES for d in COLOURS[:1]
]


@pytest.fixture(scope="module")
def calibration(pipeline, tmp_path_factory):
    return build_calibration(pipeline, CALIBRATION_PROMPTS, tmp_path_factory.mktemp("cal") / "set")


def end_to_end_psnr(bundle, pipeline) -> float:
    """8-bit image PSNR of the bundle's three graphs against PyTorch, same ids and noise."""
    session = OnnxRuntime().load(bundle, "cpu", fused=False)
    ids, noise = (
        pipeline.tokenize([PROMPT, "two small green triangles"]),
        pipeline.make_noise([7, 8]),
    )
    reference = pipeline(input_ids=ids, noise=noise, output_type="np")
    return image_psnr(reference, session.generate(ids.numpy(), noise.numpy()))


def op_types(bundle, component: str) -> set[str]:
    return {node.op_type for node in onnx.load(str(bundle / component / "model.onnx")).graph.node}


def test_fp16_overflow_keeps_the_overflowing_ops_in_fp32(tmp_path, caplog):
    # y = (x * 1000 * 1000) * 1e-6: the middle value leaves fp16's range (65504) and becomes Inf
    nodes = [
        helper.make_node("Mul", ["x", "k1000"], ["a"], name="scale_up_1"),
        helper.make_node("Mul", ["a", "k1000"], ["b"], name="scale_up_2"),
        helper.make_node("Mul", ["b", "k1e-6"], ["y"], name="scale_down"),
        helper.make_node("Add", ["y", "x"], ["z"], name="harmless"),
    ]
    graph = helper.make_graph(
        nodes,
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])],
        initializer=[
            helper.make_tensor("k1000", TensorProto.FLOAT, [], [1000.0]),
            helper.make_tensor("k1e-6", TensorProto.FLOAT, [], [1e-6]),
        ],
    )
    source = tmp_path / "fp32.onnx"
    # IR version 8 as torch's exporter writes at opset 17 (onnx's default IR is newer than ORT 1.31's)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, source)
    x = np.linspace(1, 8, 8, dtype=np.float32).reshape(1, 8)
    spec = ComponentSpec(
        "toy", (TensorSpec("x", (1, 8), "float32"),), (TensorSpec("z", (1, 8), "float32"),)
    )
    kept = convert_to_fp16(source, tmp_path / "fp16.onnx", {"x": x}, spec)
    assert kept == ["scale_up_2", "scale_down"]
    assert "toy: fp16 would overflow (Inf) in 2 ops: kept them in fp32" in caplog.text
    import onnxruntime as ort

    out = ort.InferenceSession(str(tmp_path / "fp16.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, 2 * x, rtol=1e-2)


@pytest.mark.parametrize(
    ("method", "integer_conv"), [("int8-dynamic", False), ("int8-dynamic-all", True)]
)
def test_int8_dynamic_matmul_only_or_all_ops(onnx_bundle, pipeline, tmp_path, method, integer_conv):
    bundle = get_exporter("onnx").quantize(onnx_bundle, tmp_path / method, method)
    assert verify_bundle(bundle).quantization == method
    ops = op_types(bundle, "unet")
    assert "MatMulInteger" in ops
    assert ("ConvInteger" in ops) is integer_conv


@pytest.mark.slow  # the fast tier quantizes int8-static in test_targets
@pytest.mark.parametrize("calibration_method", ["minmax", "percentile"])
def test_int8_static_qdq_per_channel_from_a_calibration_set(
    onnx_bundle, pipeline, calibration, tmp_path, calibration_method
):
    options = {"calibration_method": calibration_method}
    bundle = get_exporter("onnx").quantize(
        onnx_bundle, tmp_path / "static", "int8-static", calibration, options
    )
    manifest = verify_bundle(bundle)
    assert manifest.quantization == "int8-static"
    assert manifest.details["calibration"]["samples"] == len(CALIBRATION_PROMPTS)
    assert manifest.details["options"]["calibration_method"] == calibration_method
    unet = onnx.load(str(bundle / "unet" / "model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in unet.graph.node}
    per_channel = [
        n
        for n in unet.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]
    assert per_channel  # weights are quantized per output channel
    assert end_to_end_psnr(bundle, pipeline) >= 25


def test_calibration_holds_only_what_it_needs_and_finds_the_same_ranges(
    onnx_bundle, calibration, tmp_path, monkeypatch
):
    """ONNX Runtime's calibrator adds a ReduceMin and a ReduceMax after every tensor it
    calibrates. In ONNX Runtime's default order they ran after the rest of the graph, which kept
    every activation alive (sd15's VAE decoder: 5.6 GiB for one calibration run, 2.9 GiB in
    priority order). And calibrating inside `quantize_static` held the model three times: its
    own copy to quantize, loaded first, the calibrator's, and the calibration session's (sd15's
    UNet: 12.0 GiB to quantize). The calibration graph runs in priority order, the calibrator
    holds no copy while it collects, the model to quantize is loaded once calibration is done,
    and the ranges are those of the default order."""
    import contextlib
    import importlib

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from instaflow_edge.calibration.dataset import load_calibration
    from instaflow_edge.export import onnx as onnx_target
    from instaflow_edge.manifest import read_manifest

    # the module, which the package's function of the same name hides
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    spec = read_manifest(onnx_bundle).components["unet"].spec
    events = []  # in order: what opened, loaded or collected, and what the calibrator held then
    open_session, collect = ort.InferenceSession.__init__, MinMaxCalibrater.collect_data
    load_model = ort_quantize.load_model_with_shape_infer

    def session_spy(session, path, sess_options=None, *args, **kwargs):
        if "augmented" in str(path):  # the calibrator's graph
            events.append(("calibration session", sess_options.execution_order))
        open_session(session, path, sess_options, *args, **kwargs)

    def collect_spy(calibrator, reader):
        events.append(("collect", calibrator.model))
        return collect(calibrator, reader)

    def load_spy(path):
        events.append(("load the model to quantize", None))
        return load_model(path)

    def quantize(dest):
        feeds = onnx_target.calibration_feeds(load_calibration(calibration), spec)
        source = onnx_bundle / "unet" / "model.onnx"
        onnx_target.quantize_static_qdq(source, dest, feeds, onnx_target.OnnxQuantizeOptions())
        return onnx.load(dest).graph.initializer

    monkeypatch.setattr(ort.InferenceSession, "__init__", session_spy)
    monkeypatch.setattr(MinMaxCalibrater, "collect_data", collect_spy)
    monkeypatch.setattr(ort_quantize, "load_model_with_shape_infer", load_spy)
    lean = quantize(tmp_path / "lean.onnx")
    assert events == [
        ("calibration session", ort.ExecutionOrder.PRIORITY_BASED),
        ("collect", None),
        ("load the model to quantize", None),
    ]
    assert not list(tmp_path.glob(".*"))  # the prepared graph and the ranges are gone
    events.clear()
    monkeypatch.setattr(onnx_target, "_calibration_session", contextlib.nullcontext)
    default = quantize(tmp_path / "default.onnx")
    assert events[0] == ("calibration session", ort.ExecutionOrder.DEFAULT)
    assert lean == default  # the same scales and zero points, the same weights


def test_pre_processing_infers_shapes_without_the_weights_and_prepares_what_onnxruntime_does(
    onnx_bundle, tmp_path, monkeypatch
):
    """ONNX Runtime's `quant_pre_process` held up to three copies of the weights (sd15's UNet:
    10.1 GiB). Ours runs its symbolic shape inference on the graph without its weights, and
    writes the same prepared graph, weights included."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from instaflow_edge.export import onnx as onnx_target

    # the UNet with its weights in a file beside it, as a graph over 2 GB has them
    source = tmp_path / "unet" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(onnx_bundle / "unet" / "model.onnx"), source,
                    save_as_external_data=True, location="model.onnx_data")  # fmt: skip
    infer_shapes = SymbolicShapeInference.infer_shapes
    given = []

    def spy(model, *args, **kwargs):
        given.append([tensor.HasField("raw_data") for tensor in model.graph.initializer])
        return infer_shapes(model, *args, **kwargs)

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(spy))
    ours = tmp_path / "ours" / "model.onnx"
    ours.parent.mkdir()
    onnx_target._pre_process(source, ours, external=True)
    (loaded,) = given  # what it inferred on: the small tensors only, the weights left in their file
    assert any(loaded) and not all(loaded)
    theirs = tmp_path / "theirs" / "model.onnx"
    theirs.parent.mkdir()
    quant_pre_process(source, theirs, auto_merge=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location="model.onnx.data")  # fmt: skip
    assert onnx.load(ours).SerializeToString() == onnx.load(theirs).SerializeToString()
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx", "model.onnx_data"]


def test_cli_quantize_prints_bundle_and_parity(onnx_bundle, tmp_path):
    result = run_cli(
        "quantize",
        "--bundle",
        str(onnx_bundle),
        "--method",
        "int8-dynamic",
        "--out",
        str(tmp_path / "q"),
    )
    assert result.returncode == 0, result.stderr
    assert f"bundle: {tmp_path / 'q'} (onnx, int8-dynamic, 4 graphs)" in result.stdout
    assert "parity vs source bundle" in result.stdout
    assert (
        json.loads((tmp_path / "q" / "manifest.json").read_text())["quantization"] == "int8-dynamic"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "int4"], ["unknown method 'int4'", "int8-static"]),
        (["--method", "int8-static"], ["int8-static needs --calibration"]),
        (["--method", "int8-static", "--calibration", "/nonexistent"], ["not a calibration set"]),
        (
            [
                "--method",
                "int8-static",
                "--calibration",
                "/nonexistent",
                "--calibration-method",
                "mse",
            ],
            ["invalid choice: 'mse'", "percentile"],
        ),
    ],
)
def test_cli_quantize_mistakes_are_one_line(onnx_bundle, tmp_path, args, words):
    result = run_cli("quantize", "--bundle", str(onnx_bundle), *args, "--out", str(tmp_path / "q"))
    assert_one_line_error(result, *words)
    assert not (tmp_path / "q").exists()


def test_cli_quantize_refuses_an_existing_out_and_a_non_bundle(onnx_bundle, tmp_path):
    (tmp_path / "q").mkdir()
    args = ["--method", "fp16", "--out", str(tmp_path / "q")]
    assert_one_line_error(
        run_cli("quantize", "--bundle", str(onnx_bundle), *args), "already exists"
    )
    assert_one_line_error(run_cli("quantize", "--bundle", str(tmp_path), *args), "no manifest.json")


def test_the_fastest_cpu_preset_quantizes_its_export_and_keeps_no_source(pipeline, tmp_path):
    # a killed preset run's source export: refused by readers, removed by the next run
    killed = tmp_path / ".fast.partial-source-x1y2"
    (killed / "source").mkdir(parents=True)
    (killed / "source" / "manifest.json").write_text("{}")
    assert unfinished(killed)
    bundle = get_exporter("onnx").export_preset(pipeline, tmp_path / "fast", "fastest-cpu")
    manifest = verify_bundle(bundle)
    assert (manifest.precision, manifest.quantization) == ("fp32", "int8-dynamic")
    assert manifest.details["preset"] == "fastest-cpu" and manifest.runtime_options == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast"]  # its source export is gone


def test_cli_quantize_prints_our_lines_only(onnx_bundle, tmp_path):
    result = run_cli("quantize", "--bundle", str(onnx_bundle), "--method", "int8-dynamic",
                     "--out", str(tmp_path / "q"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "parity vs source bundle" in result.stdout
    # ONNX Runtime's quantizer advises through the root logger ("WARNING:root:Please consider...")
    assert "WARNING:root" not in result.stderr
