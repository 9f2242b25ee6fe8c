"""Hostile and mistaken inputs end with one line, a documented exit code and nothing changed.

The start of the bad-input suite (issue 14): each case runs the command in this process (fast),
asserts the exit code, exactly one error line naming the problem, no traceback, and that what was
on disk before is still there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instaflow_edge.cli import main
from instaflow_edge.errors import UserError


def run(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: its exit status and stderr."""
    try:
        status = main(list(args))
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_line(status: int, err: str, code: int, *words: str) -> None:
    assert status == code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "1e23"], ["expected a whole number", "1e23"]),
        (["--seed", str(2**64)], ["a seed is from 0 to"]),
        (["--seed", "-1"], ["a seed is from 0 to"]),
        (["--runtime-option", "threads=2"], ["--runtime-option", "needs --bundle"]),
    ],
)
def test_generate_mistakes(capsys, tmp_path, args, words):
    status, err = run(
        capsys, "generate", "-p", "a red circle", "--out", str(tmp_path / "x.png"), *args
    )
    assert_one_line(status, err, 2, *words)
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_local_model_path_is_not_taken_for_a_hub_id(capsys, tmp_path):
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "my-modle"
    status, err = run(capsys, "inspect", str(model))
    assert_one_line(status, err, 2, "my-modle", "not found", "not a hub id")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--runtime-option", "threads"], ["expected KEY=VALUE"]),
        (["--runtime-option", "threads=many"], ["threads expects int", "many"]),
        (["--runtime-option", "graph_optimization=max"], ["unknown graph_optimization 'max'"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
    ],
)
def test_runtime_option_mistakes(capsys, onnx_bundle, tmp_path, args, words):
    report = tmp_path / "report"
    status, err = run(
        capsys, "validate", "--bundle", str(onnx_bundle), "--report", str(report), *args
    )
    assert_one_line(status, err, 2, *words)
    assert not report.exists()


def test_export_onto_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "bundle"
    target.write_text("a file of mine")
    status, err = run(capsys, "export", "--out", str(target), "--overwrite")
    assert_one_line(status, err, 2, "not a folder this toolkit wrote")
    assert target.read_text() == "a file of mine"


def test_train_with_a_non_finite_learning_rate_is_refused(capsys, tmp_path):
    status, err = run(capsys, "train", "vae", "--out", str(tmp_path / "vae"), "--lr", "inf")
    assert_one_line(status, err, 2, "lr must be a positive number", "inf")
    assert list(tmp_path.iterdir()) == []


def test_python_api_mistakes_are_user_errors(onnx_bundle):
    import torch

    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.runtimes import load_session

    session = load_session(onnx_bundle)
    assert session.tokenize("a red circle").shape == (1, 32)  # one prompt as a string
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            OneStepPipeline.from_pretrained(device="cuda")


def test_export_for_cuda_without_cuda_is_refused_before_any_work(capsys, tmp_path):
    from instaflow_edge.runtimes.onnxruntime import cuda_available

    if cuda_available():
        pytest.skip("CUDA runs here: the refusal is for machines without it")
    status, err = run(capsys, "export", "--device", "cuda", "--out", str(tmp_path / "b"))
    assert_one_line(status, err, 2, "--device cuda", "not available here", "--device cpu")
    assert list(tmp_path.iterdir()) == []
    assert "export onnx" not in err  # no graph was converted


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A model directory whose UNet's last bias is NaN: every image it makes is NaN."""
    import torch

    from instaflow_edge.pipeline import OneStepPipeline

    pipeline = OneStepPipeline.from_pretrained()
    with torch.no_grad():
        pipeline.unet.conv_out.bias.fill_(float("nan"))
    return pipeline.save_pretrained(tmp_path_factory.mktemp("nan") / "model")


def test_generate_refuses_a_nan_image_instead_of_writing_a_black_one(capsys, nan_model, tmp_path):
    out = tmp_path / "x.png"
    status, err = run(
        capsys, "generate", "-p", "a red circle", "--model", str(nan_model), "-o", str(out)
    )
    assert_one_line(status, err, 2, "NaN or Inf", "nothing was written")
    assert not out.exists()


def test_export_refuses_a_model_that_outputs_nan_before_any_work(capsys, nan_model, tmp_path):
    out = tmp_path / "bundle"
    status, err = run(capsys, "export", "--model", str(nan_model), "--out", str(out))
    assert_one_line(status, err, 2, "unet.out_sample", "NaN or Inf")
    assert list(tmp_path.iterdir()) == []


def test_a_session_refuses_nan_noise(onnx_bundle):
    import numpy as np

    from instaflow_edge.errors import NonFiniteError
    from instaflow_edge.runtimes import load_session

    session = load_session(onnx_bundle)
    noise = np.full((1, *session.recipe.latent_shape), np.nan, dtype=np.float32)
    for fused in (True, False):
        with pytest.raises(NonFiniteError, match="the noise has NaN or Inf"):
            load_session(onnx_bundle, fused=fused).generate(session.tokenize("a cat"), noise)


def test_an_interrupt_after_the_bundle_is_complete_keeps_it_and_exits_0(
    capsys, tmp_path, monkeypatch
):
    from instaflow_edge import tables
    from instaflow_edge.manifest import verify_bundle

    def interrupted(bundle):  # Ctrl-C while the summary prints, after the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "parity_summary", interrupted)
    out = tmp_path / "bundle"
    status, err = run(capsys, "export", "--out", str(out))
    assert status == 0 and "interrupted after" in err and "it is kept" in err
    verify_bundle(out)


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import errno
    import os

    from instaflow_edge.export.onnx import OnnxExporter

    def disk_full(self, model, path, job):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(OnnxExporter, "save", disk_full)
    status, err = run(capsys, "export", "--out", str(tmp_path / "bundle"))
    assert_one_line(status, err, 2, "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


# -- the table: one row per mistake, each run in this process against files of its own ----------
# A row's setup gets (tmp_path, ctx) and returns the command line; ctx holds the shared ONNX
# bundle, a calibration set for it, and the embedded model's folder. The test asserts the exit
# code, one error line with the row's words, no traceback, and that no file changed.


def copy_bundle(tmp, ctx, change=None):
    bundle = shutil.copytree(ctx["bundle"], tmp / "bundle")
    if change is not None:
        data = json.loads((bundle / "manifest.json").read_text())
        change(data)
        (bundle / "manifest.json").write_text(json.dumps(data))
    return bundle


def validate(change):
    return lambda tmp, ctx: [
        "validate", "--bundle", str(copy_bundle(tmp, ctx, change)), "--report", str(tmp / "r")
    ]  # fmt: skip


def unet(data):
    return data["components"]["unet"]


def flip_unet_byte(tmp, ctx):
    bundle = copy_bundle(tmp, ctx)
    path = bundle / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return ["generate", "-p", "a cat", "--bundle", str(bundle), "-o", str(tmp / "x.png")]


def unet_links_outside(tmp, ctx):
    bundle = copy_bundle(tmp, ctx)
    outside = tmp / "outside.onnx"
    (bundle / "unet" / "model.onnx").rename(outside)
    (bundle / "unet" / "model.onnx").symlink_to(outside)
    return ["inspect", "--verify", str(bundle)]


def staging_folder(tmp, ctx):
    staging = shutil.copytree(ctx["bundle"], tmp / ".bundle.partial-k1ll3d")
    return ["inspect", str(staging)]


def graph_disagrees(data):
    for tensor in (unet(data)["inputs"][0], unet(data)["outputs"][0]):
        tensor["dtype"] = "float16"


def model_copy(tmp, ctx, change):
    model = shutil.copytree(ctx["model"], tmp / "model")
    change(model)
    return ["generate", "-p", "a cat", "--model", str(model), "-o", str(tmp / "x.png")]


def drop_tensor(model):
    from safetensors.numpy import load_file, save_file

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_out.bias"]
    save_file(tensors, weights)


def pickled_only(model):
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


def calibration_copy(tmp, ctx, change, method="int8-static"):
    calibration = shutil.copytree(ctx["calibration"], tmp / "calibration")
    change(calibration)
    return [
        "quantize", "--bundle", str(ctx["bundle"]), "--method", method,
        "--calibration", str(calibration), "--out", str(tmp / "q"),
    ]  # fmt: skip


def shard(calibration):
    return calibration / "shard-00000.safetensors"


def truncate_shard(calibration):
    data = shard(calibration).read_bytes()
    shard(calibration).write_bytes(data[: len(data) // 2])


def smaller_latents(calibration):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(shard(calibration))
    for key in ("unet/sample", "vae_decoder/latent_sample"):
        tensors[key] = np.ascontiguousarray(tensors[key][:, :, :8, :8])
    save_file(tensors, shard(calibration))


def edit_index(change):
    def edit(calibration):
        data = json.loads((calibration / "calibration.json").read_text())
        change(data)
        (calibration / "calibration.json").write_text(json.dumps(data))

    return edit


def write(name: str, content: bytes):
    def setup(tmp, ctx):
        (tmp / name).write_bytes(content)
        return tmp / name

    return setup


CASES = {
    # generate
    "prompt not UTF-8": (lambda t, c: ["generate", "-p", "a\udcffcat", "-o", str(t / "x.png")],
                         2, ["not valid UTF-8"]),
    "prompts file binary": (lambda t, c: ["generate", "--prompts", str(write("p.txt", b"a\x00b")(t, c)),
                                          "-o", str(t / "x.png")], 2, ["binary file"]),
    "prompts file not UTF-8": (lambda t, c: ["generate", "--prompts", str(write("p.txt", b"a\xffb")(t, c)),
                                             "-o", str(t / "x.png")], 2, ["not UTF-8 text"]),
    "prompts file missing": (lambda t, c: ["generate", "--prompts", str(t / "none.txt"), "-o", str(t / "x.png")],
                             2, ["does not exist"]),
    "prompts file a folder": (lambda t, c: ["generate", "--prompts", str(t), "-o", str(t / "x.png")],
                              2, ["is a folder"]),
    "png exists": (lambda t, c: ["generate", "-p", "a cat", "-o", str(write("x.png", b"mine")(t, c))],
                   2, ["already exists", "--overwrite"]),
    "out not a png": (lambda t, c: ["generate", "-p", "a cat", "-o", str(t)], 2, ["must be a .png"]),
    "out folder missing": (lambda t, c: ["generate", "-p", "a cat", "-o", str(t / "no" / "x.png")],
                           2, ["does not exist"]),
    "steps 0": (lambda t, c: ["generate", "-p", "a cat", "--steps", "0", "-o", str(t / "x.png")],
                2, ["at least 1"]),
    "bundle with steps": (lambda t, c: ["generate", "-p", "a cat", "--bundle", str(c["bundle"]), "--steps", "4",
                                        "-o", str(t / "x.png")], 2, ["one-step recipe"]),
    "empty prompt": (lambda t, c: ["generate", "-p", "  ", "-o", str(t / "x.png")], 2, ["empty prompt"]),
    "model missing a tensor": (lambda t, c: model_copy(t, c, drop_tensor), 2, ["missing tensor", "conv_out.bias"]),
    "model pickled weights": (lambda t, c: model_copy(t, c, pickled_only), 2, ["pickled weights are never loaded"]),
    "model is a file": (lambda t, c: ["inspect", str(write("model.bin", b"x")(t, c))], 2, ["is a file"]),
    # bundles: the manifest is a closed world, checked against the graphs
    "tampered graph": (flip_unet_byte, 2, ["unet/model.onnx does not match"]),
    "component links outside": (unet_links_outside, 2, ["links outside the bundle"]),
    "staging folder": (staging_folder, 2, ["staging folder of an unfinished"]),
    "components a list": (validate(lambda d: d.update(components=list(d["components"].values()))),
                          2, ["malformed"]),
    "component missing": (validate(lambda d: d["components"].pop("unet")), 2, ["no unet component"]),
    "bogus dtype": (validate(lambda d: unet(d)["inputs"][0].update(dtype="float7")), 2, ["dtype 'float7'"]),
    "renamed output": (validate(lambda d: unet(d)["outputs"][0].update(name="noise_pred")),
                       2, ["'noise_pred' should be 'out_sample'"]),
    "file outside": (validate(lambda d: unet(d).update(file="../outside.onnx")), 2, ["not a path inside"]),
    "absolute file": (validate(lambda d: unet(d).update(file="/etc/passwd")), 2, ["not a path inside"]),
    "empty files list": (validate(lambda d: unet(d).update(files={})), 2, ["lists no files"]),
    "schema too new": (validate(lambda d: d.update(schema_version=99)), 2, ["schema version 99"]),
    "graph disagrees": (validate(graph_disagrees), 2, ["float16 in the manifest but float32"]),
    "runtime unknown": (validate(lambda d: d.update(runtime="nosuch")), 2, ["nosuch"]),
    "tokenizer unlisted": (validate(lambda d: d["assets"].pop("tokenizer/tokenizer.json")),
                           2, ["does not list tokenizer/tokenizer.json"]),
    "manifest not JSON": (lambda t, c: ["inspect", "--verify", str(write_manifest_garbage(t, c))],
                          2, ["not valid JSON"]),
    "verify a non-bundle": (lambda t, c: ["inspect", "--verify", str(t)], 2, ["not a bundle"]),
    # quantize and calibration sets
    "unknown method": (lambda t, c: ["quantize", "--bundle", str(c["bundle"]), "--method", "int3",
                                     "--out", str(t / "q")], 2, ["unknown method 'int3'"]),
    "calibration needed": (lambda t, c: ["quantize", "--bundle", str(c["bundle"]), "--method", "int8-static",
                                         "--out", str(t / "q")], 2, ["needs --calibration"]),
    "shard garbage": (lambda t, c: calibration_copy(t, c, lambda s: shard(s).write_bytes(b"garbage" * 9)),
                      2, ["not a readable safetensors file"]),
    "shard truncated": (lambda t, c: calibration_copy(t, c, truncate_shard),
                        2, ["not a readable safetensors file", "incomplete"]),
    "shard of other shapes": (lambda t, c: calibration_copy(t, c, smaller_latents),
                              2, ["made for another model"]),
    "shard outside the set": (lambda t, c: calibration_copy(t, c, edit_index(lambda d: d.update(shards=["../x"]))),
                              2, ["not files of the set"]),
    "calibration index garbage": (lambda t, c: calibration_copy(
        t, c, lambda s: (s / "calibration.json").write_bytes(b"\xff\x00")), 2, ["malformed"]),
    "calibration not a set": (lambda t, c: ["quantize", "--bundle", str(c["bundle"]), "--method", "int8-static",
                                            "--calibration", str(t), "--out", str(t / "q")],
                              2, ["not a calibration set"]),
    "calibrate limit 0": (lambda t, c: ["calibrate", "--prompts", "synthetic", "--limit", "0",
                                        "--out", str(t / "cal")], 2, ["--limit must be at least 1"]),
    "calibrate unknown prompts": (lambda t, c: ["calibrate", "--prompts", "nosuch", "--out", str(t / "cal")],
                                  2, ["neither a prompt set"]),
    # export
    "unknown target": (lambda t, c: ["export", "--target", "tflite", "--out", str(t / "b")],
                       2, ["unknown target 'tflite'"]),
    "option of another target": (lambda t, c: ["export", "--compute-units", "ALL", "--out", str(t / "b")],
                                 2, ["does not apply to target onnx"]),
    "overwrite a foreign folder": (lambda t, c: ["export", "--overwrite", "--out",
                                                 str(write("mine.txt", b"x")(t, c).parent)],
                                   2, ["not a folder this toolkit wrote"]),
    "bundle exists": (lambda t, c: ["export", "--out", str(copy_bundle(t, c))], 2, ["already exists"]),
    "gate not a number": (lambda t, c: ["export", "--min-tensor-psnr", "lots", "--out", str(t / "b")],
                          2, ["lots"]),
    "unknown preset": (lambda t, c: ["export", "--target", "coreml", "--preset", "fastest-cpu", "--out",
                                     str(t / "b")], 2, ["target coreml has no preset 'fastest-cpu'"]),
    "preset and precision": (lambda t, c: ["export", "--preset", "fastest-cpu", "--precision", "fp16",
                                           "--out", str(t / "b")], 2, ["leave out --precision"]),
    "calibration, uncalibrated preset": (lambda t, c: ["export", "--target", "openvino", "--preset",
                                                       "fastest-cpu", "--calibration", str(t), "--out",
                                                       str(t / "b")], 2, ["fastest-cpu-int8"]),
    "calibration set missing": (lambda t, c: ["export", "--target", "openvino", "--preset",
                                              "fastest-cpu-int8", "--calibration", str(t / "none"),
                                              "--out", str(t / "b")], 2, ["calibration"]),
    # train
    "train without out": (lambda t, c: ["train", "vae"], 2, ["needs --out"]),
    "reflow without pairs": (lambda t, c: ["train", "reflow", "--out", str(t / "r"), "--init", "tiny"],
                             2, ["needs --pairs"]),
    "train config not UTF-8": (lambda t, c: ["train", "vae", "--out", str(t / "r"), "--config",
                                             str(write("c.json", b"\xff")(t, c))], 2, ["not valid JSON"]),
    "train config wrong type": (lambda t, c: ["train", "vae", "--out", str(t / "r"), "--config",
                                              str(write("c.json", b'{"steps": "many"}')(t, c))],
                                2, ["steps must be a int"]),
    "train steps 0": (lambda t, c: ["train", "vae", "--out", str(t / "r"), "--steps", "0"],
                      2, ["steps must be at least 1"]),
    "train out with the recipe": (lambda t, c: ["train", "--recipe", "synthetic", "--out", str(t / "r")],
                                  2, ["--out does not apply to --recipe"]),
    "train workdir with a stage": (lambda t, c: ["train", "vae", "--out", str(t / "r"), "--workdir",
                                                 str(t / "w")], 2, ["--workdir does not apply to the vae stage"]),
    "train pairs with vae": (lambda t, c: ["train", "vae", "--out", str(t / "r"), "--pairs", str(t)],
                             2, ["--pairs does not apply to the vae stage", "reflow, distill"]),
    "train model with flow": (lambda t, c: ["train", "flow", "--init", "initial", "--out", str(t / "r"),
                                            "--model", str(t)], 2, ["--model does not apply"]),
    "train prompts with the recipe": (lambda t, c: ["train", "--recipe", "synthetic", "--prompts",
                                                    str(write("p.txt", b"a cat")(t, c))],
                                      2, ["--prompts does not apply to --recipe"]),
    # a reference of other sizes than the bundle's (its latents 8x8, the bundle's 16x16)
    "validate another model's sizes": (lambda t, c: ["validate", "--bundle", str(c["bundle"]), "--reference",
                                                     smaller_model(t, c), "--report", str(t / "r")],
                                       2, ["cannot be compared", "latents 4x8x8", "latents 4x16x16"]),
    "bench another model's sizes": (lambda t, c: ["bench", "--bundle", str(c["bundle"]), "--reference",
                                                  smaller_model(t, c), "--runs", "1"],
                                    2, ["cannot be compared", "latents 4x8x8"]),
    # bench and inspect
    "bench runs 0": (lambda t, c: ["bench", "--bundle", str(c["bundle"]), "--runs", "0"], 2, ["--runs"]),
    "bench missing bundle": (lambda t, c: ["bench", "--bundle", str(t / "none")], 2, ["does not exist"]),
    # outputs nobody can write, refused before any work: under a file, or where no file can be made
    **{
        f"{name} {where}": (lambda t, c, a=args, w=where: a(c, out_path(t, c, w)),
                            2, ["cannot write into", f"choose another {args({'bundle': ''}, '')[-2]}"])
        for name, args in {
            "export out": lambda c, o: ["export", "--out", o],
            "quantize out": lambda c, o: ["quantize", "--bundle", str(c["bundle"]), "--method",
                                          "int8-dynamic", "--out", o],
            "calibrate out": lambda c, o: ["calibrate", "--prompts", "synthetic", "--out", o],
            "validate report": lambda c, o: ["validate", "--bundle", str(c["bundle"]), "--report", o],
            "bench out": lambda c, o: ["bench", "--bundle", str(c["bundle"]), "--out", o],
            "bench cache": lambda c, o: ["bench", "--targets", "onnx", "--cache", o],
            "train stage out": lambda c, o: ["train", "vae", "--out", o],
            "train recipe workdir": lambda c, o: ["train", "--recipe", "synthetic", "--workdir", o],
        }.items()
        for where in ("under a file", "in a kernel folder")
    },
    "generate under a file": (lambda t, c: ["generate", "--prompt", "a cat", "--out",
                                            out_path(t, c, "under a file") + ".png"],
                              2, ["does not exist"]),
    "generate in a kernel folder": (lambda t, c: ["generate", "--prompt", "a cat", "--out", "/proc/x.png"],
                                    2, ["cannot write into /proc", "choose another --out"]),
}  # fmt: skip


def smaller_model(tmp, ctx) -> str:
    """The embedded model sampling 8x8 latents instead of 16x16 (its UNet is convolutional: it
    runs at either size)."""
    model = shutil.copytree(ctx["model"], tmp / "smaller")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 8}))
    return str(model)


def out_path(tmp, ctx, where: str) -> str:
    """An output path no command can write: below a file, or in /proc (where no file can be made,
    not even by root)."""
    if where == "under a file":
        return str(write("a-file", b"x")(tmp, ctx) / "out")
    return "/proc/instaflow-edge-test/out"


def write_manifest_garbage(tmp, ctx):
    bundle = copy_bundle(tmp, ctx)
    (bundle / "manifest.json").write_bytes(b"{not json")
    return bundle


@pytest.fixture(scope="module")
def calibration_set(onnx_bundle, tmp_path_factory):
    from instaflow_edge.calibration.builder import build_calibration
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.pipeline import OneStepPipeline

    out = tmp_path_factory.mktemp("calibration") / "set"
    return build_calibration(OneStepPipeline.from_pretrained(), load_prompts("synthetic", 4), out)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_changes_nothing(
    capsys, tmp_path, onnx_bundle, calibration_set, case
):
    from instaflow_edge.models import EMBEDDED_MODEL_DIR

    setup, code, words = CASES[case]
    ctx = {"bundle": onnx_bundle, "calibration": calibration_set, "model": EMBEDDED_MODEL_DIR}
    args = setup(tmp_path, ctx)
    before, shared = snapshot(tmp_path), snapshot(onnx_bundle)
    status, err = run(capsys, *args)
    assert_one_line(status, err, code, *words)
    assert snapshot(tmp_path) == before
    assert snapshot(onnx_bundle) == shared
