"""The OpenVINO target: IR export and NNCF quantization of the embedded model, parity, runtime options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from instaflow_edge.calibration.builder import build_calibration
from instaflow_edge.calibration.prompts import load_prompts
from instaflow_edge.errors import UserError
from instaflow_edge.export import get_exporter
from instaflow_edge.manifest import BundleError, read_manifest
from instaflow_edge.metrics import image_psnr, tensor_metrics
from instaflow_edge.runtimes import RuntimeUnavailable, load_session
from tests.conftest import assert_one_line_error, run_cli

pytest.importorskip("openvino")
pytest.importorskip("nncf")

OUTPUTS = {"text_encoder": "last_hidden_state", "unet": "out_sample", "vae_decoder": "sample"}


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
def fp32_bundle(pipeline, exporter, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "fp32"
    return exporter.export(pipeline, out, "fp32")


@pytest.fixture(scope="module")
def calibration(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "set"
    return build_calibration(pipeline, load_prompts("synthetic", limit=8), out)


def component_psnr(session, io) -> dict[str, float]:
    psnr = {}
    for component, output in OUTPUTS.items():
        feeds = {name: value for name, value in io[component].items() if name != output}
        got = session.run(component, feeds)[output]
        psnr[component] = tensor_metrics(io[component][output], got)["psnr_db"]
    return psnr


def end_to_end_psnr(bundle, inputs, reference) -> float:
    session = load_session(bundle)
    return image_psnr(reference[1], session.generate(inputs[0].numpy(), inputs[1].numpy()))


def test_fp32_export_matches_pytorch_per_component(fp32_bundle, inputs, reference):
    for path in ("text_encoder", "unet", "vae_decoder"):
        assert (fp32_bundle / path / "openvino_model.xml").is_file()
        assert (fp32_bundle / path / "openvino_model.bin").is_file()
    assert (fp32_bundle / "tokenizer" / "tokenizer.json").is_file()
    manifest = read_manifest(fp32_bundle)
    assert (manifest.target, manifest.precision, manifest.quantization) == (
        "openvino",
        "fp32",
        None,
    )
    assert manifest.components["unet"].spec.inputs[0].shape == (1, 4, 16, 16)  # static batch 1
    session = load_session(fp32_bundle)
    assert (session.executed_on, session.inference_precision) == ("CPU", "f32")
    psnr = component_psnr(session, reference[0])
    assert min(psnr.values()) >= 60, psnr
    ids = session.tokenize(load_prompts("synthetic")[200:203])
    np.testing.assert_array_equal(ids, inputs[0].numpy())


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


def test_int8_weights_image_psnr(exporter, fp32_bundle, inputs, reference, tmp_path):
    bundle = exporter.quantize(fp32_bundle, tmp_path / "int8", "int8-weights")
    manifest = read_manifest(bundle)
    assert manifest.quantization == "int8-weights"
    size = (bundle / "unet" / "openvino_model.bin").stat().st_size
    assert size < 0.35 * (fp32_bundle / "unet" / "openvino_model.bin").stat().st_size
    assert end_to_end_psnr(bundle, inputs, reference) >= 30


def test_int4_weights_image_psnr(exporter, fp32_bundle, inputs, reference, tmp_path):
    bundle = exporter.quantize(fp32_bundle, tmp_path / "int4", "int4-weights")
    # the trained default loses more to 4 bits on these 3 prompts (22.5 dB) than on the bench's 8
    # held-out prompts (30.1 dB): int4 can miss the 25 dB gate, and validate then says so
    assert end_to_end_psnr(bundle, inputs, reference) >= 20


def test_hybrid_image_psnr(exporter, fp32_bundle, calibration, inputs, reference, tmp_path):
    bundle = exporter.quantize(fp32_bundle, tmp_path / "hybrid", "hybrid", calibration)
    manifest = read_manifest(bundle)
    assert manifest.quantization == "hybrid"
    assert sorted(manifest.components) == ["text_encoder", "unet", "vae_decoder"]
    unet = (bundle / "unet" / "openvino_model.xml").read_text()
    assert "FakeQuantize" in unet  # activations are quantized, not just weights
    assert end_to_end_psnr(bundle, inputs, reference) >= 25


def test_quantize_refuses_bad_requests(exporter, fp32_bundle, tmp_path):
    with pytest.raises(UserError, match="need --calibration"):
        exporter.quantize(fp32_bundle, tmp_path / "q", "int8-full")
    with pytest.raises(UserError, match="unknown openvino quantization"):
        exporter.quantize(fp32_bundle, tmp_path / "q", "int2")
    with pytest.raises(UserError, match="not a calibration set"):
        exporter.quantize(fp32_bundle, tmp_path / "q", "hybrid", tmp_path)
    assert not (tmp_path / "q").exists()


def test_devices_and_options(fp32_bundle, tmp_path):
    with pytest.raises(RuntimeUnavailable, match="NPU is not present here; available: CPU"):
        load_session(fp32_bundle, "npu")
    with pytest.raises(UserError, match="unknown OpenVINO device 'cuda'"):
        load_session(fp32_bundle, "cuda")
    with pytest.raises(UserError, match="unknown performance hint"):
        load_session(fp32_bundle, performance_hint="fastest")
    session = load_session(
        fp32_bundle,
        "AUTO",
        performance_hint="throughput",
        num_threads=1,
        cache_dir=tmp_path / "cache",
    )
    assert session.executed_on == "CPU" and session.threads == 1
    assert any((tmp_path / "cache").iterdir())
    default = load_session(fp32_bundle, inference_precision="default")
    assert default.inference_precision in ("f32", "bf16", "f16")


def test_tampered_bundle_is_refused(fp32_bundle, tmp_path):
    bundle = shutil.copytree(fp32_bundle, tmp_path / "tampered")
    weights = bundle / "unet" / "openvino_model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet/openvino_model.bin does not match"):
        load_session(bundle)


def test_runtime_runs_with_torch_blocked(fp32_bundle, inputs, reference, tmp_path):
    np.save(tmp_path / "noise.npy", inputs[1].numpy())
    prompts = load_prompts("synthetic")[200:203]
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

        session = load_session({str(fp32_bundle)!r})
        ids = session.tokenize({prompts!r})
        image = session.generate(ids, np.load({str(tmp_path / "noise.npy")!r}))
        np.save({str(tmp_path / "image.npy")!r}, image)
        blocked = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        print(json.dumps({{"executed_on": session.executed_on, "loaded": blocked}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"executed_on": "CPU", "loaded": []}
    assert image_psnr(reference[1], np.load(tmp_path / "image.npy")) >= 40


def test_cli_export_and_quantize(tmp_path):
    bundle = tmp_path / "tiny-openvino"
    done = run_cli("export", "--target", "openvino", "--out", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "parity vs PyTorch fp32 on CPU (f32)" in done.stdout
    unet_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("unet"))
    assert float(unet_line.split("tensor PSNR ")[1].split(" dB")[0]) >= 60
    done = run_cli("quantize", "--bundle", str(bundle), "--method", "int8-weights")
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "tiny-openvino-int8-weights").quantization == "int8-weights"
    assert "parity vs fp32 bundle" in done.stdout
    done = run_cli("quantize", "--bundle", str(bundle), "--method", "hybrid")
    assert_one_line_error(done, "need --calibration")
