"""Reflow pairs and data parallelism: 2 gloo processes make the same pairs and train the same
loss curve as 1 (DistributedDataParallel), a killed run resumes exactly, epsilon teachers work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DDPMScheduler

from instaflow_edge.cli import main as cli_main
from instaflow_edge.train.data import initial_pipeline
from instaflow_edge.train.pairs import load_pairs, shard_indices
from tests.conftest import assert_one_line_error, run_cli

PAIRS = ["train", "pairs", "--init", "initial", "--guidance", "1.5"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    return subprocess.run(
        [*command, "-m", "instaflow_edge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_two_gloo_processes_make_the_same_pairs_as_one(tmp_path):
    settings = ["--num-pairs", "10", "--shard-size", "3", "--sample-steps", "2"]
    assert cli_main([*PAIRS, *settings, "--out", str(tmp_path / "one")]) == 0  # in this process
    two = _torchrun(*PAIRS, *settings, "--threads", "1", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert sorted(shard_indices(tmp_path / "two")) == list(range(10))
    single, double = load_pairs(tmp_path / "one"), load_pairs(tmp_path / "two")
    assert torch.equal(single["index"], double["index"])
    assert torch.equal(single["z0"], double["z0"])
    assert torch.allclose(single["z1"], double["z1"], atol=1e-4)


@pytest.mark.slow
def test_two_gloo_processes_train_the_loss_curve_of_one_with_the_global_batch(tmp_path):
    from safetensors.torch import load_file

    from instaflow_edge.train.loop import read_loss_csv

    pairs = tmp_path / "pairs"
    made = ["--num-pairs", "12", "--shard-size", "6", "--sample-steps", "2"]
    assert cli_main([*PAIRS, *made, "--out", str(pairs)]) == 0
    reflow = ["train", "reflow", "--init", "initial", "--pairs", str(pairs), "--steps", "4"]
    one = run_cli(*reflow, "--threads", "1", "--batch-size", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _torchrun(*reflow, "--threads", "1", "--batch-size", "2", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    single = read_loss_csv(tmp_path / "one" / "loss.csv")
    double = read_loss_csv(tmp_path / "two" / "loss.csv")
    assert len(single) == 4 and len(set(single)) == 4  # four different batches
    assert double == pytest.approx(single, rel=1e-5)
    trained = [load_file(str(tmp_path / run / "model/unet/diffusion_pytorch_model.safetensors"))
               for run in ("one", "two")]  # fmt: skip
    initial = initial_pipeline(seed=0).unet.state_dict()
    moved = 0
    for name, weight in trained[0].items():
        # Adam divides by sqrt(v): a near-zero gradient's float noise can move a weight by up to
        # lr per step, so a rare element may differ by that; the rest agree to float precision
        difference = (trained[1][name] - weight).abs()
        assert float(difference.max()) <= 4 * 5e-4, name
        assert float((difference > 1e-5).float().mean()) < 1e-3, name
        moved += not torch.allclose(weight.abs(), initial[name].abs())
    assert moved > len(trained[0]) // 2  # both trained, from the same start


@pytest.mark.slow
def test_a_killed_pair_run_resumes_without_lost_or_repeated_pairs(tmp_path):
    out = tmp_path / "pairs"
    sizes = ["--num-pairs", "16", "--shard-size", "2", "--sample-steps", "8"]
    args = [*PAIRS, "--threads", "1", *sizes]
    command = [sys.executable, "-m", "instaflow_edge", *args, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("pairs-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(shard_indices(out))
    assert 0 < done_before < 16, "the run was not killed in the middle"
    assert_one_line_error(run_cli(*args, "--out", str(out)), "--resume")
    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    found = shard_indices(out)
    assert sorted(found) == list(range(16))  # none lost, none twice
    assert len(load_pairs(out)["z0"]) == 16


def test_an_epsilon_model_is_a_teacher_through_its_probability_flow_ode(tmp_path):
    model = tmp_path / "eps-model"
    initial_pipeline(seed=3).save_pretrained(model)
    DDPMScheduler(prediction_type="epsilon").save_config(model / "scheduler")
    out = tmp_path / "pairs"
    status = cli_main(
        ["train", "pairs", "--init", str(model), "--num-pairs", "4", "--sample-steps", "3",
         "--out", str(out)]
    )  # fmt: skip
    assert status == 0
    assert json.loads((out / "pairs.json").read_text())["teacher_kind"] == "epsilon"
    pairs = load_pairs(out)
    assert pairs["z1"].shape == (4, 4, 16, 16) and torch.isfinite(pairs["z1"]).all()
    assert not torch.allclose(pairs["z0"], pairs["z1"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["train"], ["stage"]),
        (["train", "reflow", "--init", "initial", "--out", "x"], ["--pairs"]),
        (["train", "flow", "--out", "x"], ["--init"]),
        (["train", "eval", "--out", "x"], ["--model"]),
        (["train", "vae", "--out", "x", "--distill-loss", "l1"], ["distill_loss", "pseudo-huber"]),
    ],
)
def test_train_mistakes_are_one_line_errors(args, words):
    assert_one_line_error(run_cli(*args), *words)


def test_pairs_with_a_bf16_teacher_are_close_to_fp32_and_stored_in_fp32(tmp_path):
    settings = ["--num-pairs", "4", "--shard-size", "4", "--sample-steps", "3"]
    assert cli_main([*PAIRS, *settings, "--out", str(tmp_path / "fp32")]) == 0
    bf16 = [*PAIRS, *settings, "--mixed-precision", "bf16", "--out", str(tmp_path / "bf16")]
    assert cli_main(bf16) == 0
    full, half = load_pairs(tmp_path / "fp32"), load_pairs(tmp_path / "bf16")
    assert half["z1"].dtype == torch.float32
    assert torch.equal(full["z0"], half["z0"])
    assert not torch.equal(full["z1"], half["z1"])  # the teacher did run in bf16
    error = (full["z1"] - half["z1"]).pow(2).mean() / full["z1"].pow(2).mean()
    assert float(error) < 1e-3
    settings = json.loads((tmp_path / "bf16" / "pairs.json").read_text())
    assert settings["mixed_precision"] == "bf16"
