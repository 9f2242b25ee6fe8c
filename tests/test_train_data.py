"""Real data in: every training stage takes --prompts FILE (text, JSON Lines or CSV; image files
where the file names them), an epsilon model starts a flow model, and a stage trained on a
caption file of our own resumes after SIGKILL and writes a model that export takes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from instaflow_edge.calibration.prompts import load_captions, load_prompts
from instaflow_edge.cli import main as cli_main
from instaflow_edge.errors import UserError
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.train.data import (
    encode_images,
    load_image,
    load_pipeline,
    teacher_kind,
    to_flow,
)
from instaflow_edge.train.loop import read_loss_csv
from tests.conftest import assert_one_line_error, run_cli

# captions of the synthetic language, written for these tests (not drawn from its sampler)
CAPTIONS = [
    "a red circle above a blue square",
    "two small green triangles on a white background",
    "a yellow square left of a red circle",
    "three large blue circles",
]
FLOW = ["train", "flow", "--init", "initial", "--batch-size", "4"]


@pytest.fixture
def captions_txt(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture
def image_folder(tmp_path):
    """A Hugging Face imagefolder: PNGs of other sizes and shapes, and its metadata.jsonl."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index, size in enumerate([(40, 30), (64, 64), (90, 120)] * 3):
        name = f"photo-{index}.png"
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file_name": name, "text": f"photo number {index}", "score": index})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


def test_captions_come_from_text_json_lines_or_csv_columns(tmp_path, captions_txt):
    assert load_prompts(captions_txt) == CAPTIONS
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "caption": c}) for i, c in enumerate(CAPTIONS)))
    assert load_prompts(jsonl) == CAPTIONS
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text(
        "\ufeffid,alt,prompt\n"
        + "".join(f'{i},"x, {i}","{c}"\n' for i, c in enumerate(CAPTIONS))  # quoted commas, BOM
    )
    assert load_prompts(csv_file) == CAPTIONS
    assert load_prompts(csv_file, column="alt") == [f"x, {i}" for i in range(4)]
    assert load_prompts(csv_file, limit=2) == CAPTIONS[:2]
    assert load_captions(csv_file).images is None


def test_an_imagefolder_metadata_file_gives_captions_and_image_files(image_folder):
    captions = load_captions(image_folder / "metadata.jsonl")
    assert captions.captions == [f"photo number {i}" for i in range(9)]
    assert captions.images == [image_folder / f"photo-{i}.png" for i in range(9)]
    image = load_image(captions.images[2], 32)  # 90x120: centre-cropped, then resized
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("bad.jsonl", '{"caption": "a"}\nnot json\n', ["line 2", "not JSON"]),
        ("list.jsonl", '["a red circle"]\n', ["line 1", "not a JSON object"]),
        ("cols.csv", "id,alt\n1,a\n", ["no caption column", "id, alt", "--prompts-column"]),
        ("empty.csv", "caption\nred\n\n,\n", ["row 2", "no 'caption' text"]),
        ("image.jsonl", '{"text": "a", "image": ""}\n', ["row 1", "no 'image' file name"]),
    ],
)
def test_a_malformed_captions_file_is_one_line_naming_where(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        load_prompts(path)
    assert all(word in str(refused.value) for word in words), refused.value
    assert "\n" not in str(refused.value)


def test_the_cli_refuses_captions_a_stage_cannot_use(tmp_path, captions_txt):
    cat = tmp_path / "cat.txt"
    cat.write_text("a cat on a sofa\n")
    out = str(tmp_path / "out")
    assert_one_line_error(
        run_cli(*FLOW, "--prompts", str(cat), "--out", out), "not of the synthetic language"
    )
    assert_one_line_error(
        run_cli(*FLOW, "--prompts", str(captions_txt), "--prompts-column", "x", "--out", out),
        ".jsonl or .csv",
    )
    reflow = ["train", "reflow", "--init", "initial", "--out", out]
    assert_one_line_error(run_cli(*reflow), "--pairs DIR", "--prompts FILE")
    evaluate = ["train", "eval", "--model", out, "--prompts", str(cat), "--out", out]
    assert_one_line_error(run_cli(*evaluate), "cat")
    assert not (tmp_path / "out").exists()


def test_the_flow_stage_trains_on_image_files_named_by_a_metadata_file(tmp_path, image_folder):
    out = tmp_path / "flow"
    args = [*FLOW, "--prompts", str(image_folder / "metadata.jsonl"), "--steps", "2"]
    assert cli_main([*args, "--out", str(out)]) == 0
    data = load_file(str(out / "data.safetensors"))
    # each file once (not --num-images renderings), less a quarter held out for the probe
    assert len(data["latents"]) == 7
    assert set(json.loads((out / "held_out_loss.json").read_text())) == {"before", "after"}
    pipe = OneStepPipeline.from_pretrained(out / "model")
    # the latents are the starting VAE's encodings of the files (the flow stage does not train it)
    first = np.stack([load_image(image_folder / "photo-0.png", pipe.image_size)])
    torch.testing.assert_close(data["latents"][:1], encode_images(pipe, first), atol=1e-5, rtol=0)
    assert pipe.tokenize(["photo number 0"]).tolist()[0] == data["input_ids"][0].tolist()
    assert len(read_loss_csv(out / "loss.csv")) == 2


def test_reflow_from_prompts_makes_its_pairs_first(tmp_path, captions_txt):
    out = tmp_path / "reflow"
    settings = ["--num-pairs", "8", "--shard-size", "4", "--sample-steps", "2", "--steps", "2"]
    args = ["train", "reflow", "--init", "initial", "--prompts", str(captions_txt), *settings]
    assert cli_main([*args, "--out", str(out)]) == 0
    pairs = json.loads((out / "pairs" / "pairs.json").read_text())
    assert pairs["num_pairs"] == 4  # one pair per caption of the file
    assert (out / "model" / "model_index.json").is_file()


def test_an_epsilon_model_starts_a_flow_model_with_its_output_negated(tmp_path):
    model = tmp_path / "eps-model"
    OneStepPipeline.from_pretrained().save_pretrained(model)
    DDPMScheduler(prediction_type="epsilon").save_config(model / "scheduler")
    epsilon = load_pipeline(model, seed=0, device="cpu")  # the UNet as it is stored
    flow = to_flow(load_pipeline(model, seed=0, device="cpu"), model)
    latents = torch.randn(1, *flow.latent_shape, generator=torch.Generator().manual_seed(0))
    text = flow.encode_prompt(flow.tokenize(["a red circle"]))
    with torch.no_grad():
        torch.testing.assert_close(
            flow.velocity(latents, 1000, text), -epsilon.velocity(latents, 1000, text)
        )
    out = tmp_path / "flow"
    args = ["train", "flow", "--init", str(model), "--num-images", "80", "--steps", "1"]
    assert cli_main([*args, "--batch-size", "2", "--lr", "1e-12", "--out", str(out)]) == 0
    scheduler = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "flow_prediction"
    assert len(load_file(str(out / "data.safetensors"))["latents"]) == 2  # what 1 step can draw
    assert (teacher_kind(model), teacher_kind(out / "model")) == ("epsilon", "flow")
    # diffusers' flow prediction is noise - data: stored, the UNet is the epsilon model's again
    before = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(after["conv_out.weight"], before["conv_out.weight"])


@pytest.mark.slow
def test_a_stage_on_our_captions_resumes_after_sigkill_and_its_model_exports(
    tmp_path, captions_txt
):
    settings = ["--prompts", str(captions_txt), "--num-images", "64", "--steps", "40"]
    args = [*FLOW, *settings, "--checkpoint-every", "4"]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "instaflow_edge", *args, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint" / "state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(json.loads((out / "checkpoint" / "state.json").read_text())["losses"])
    assert 0 < done < 40, "the run was not killed in the middle"
    assert not (out / "model").exists()
    assert_one_line_error(run_cli(*args, "--out", str(out)), "--resume")
    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = read_loss_csv(tmp_path / "whole" / "loss.csv")
    assert read_loss_csv(out / "loss.csv") == pytest.approx(whole, rel=1e-5)
    assert whole[-1] < whole[0]
    bundle = tmp_path / "bundle"
    exported = run_cli(
        "export", "--model", str(out / "model"), "--target", "onnx", "--out", str(bundle)
    )
    assert exported.returncode == 0, exported.stderr
    assert (bundle / "manifest.json").is_file()
