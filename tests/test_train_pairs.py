"""Reflow pairs: 2 gloo processes match 1, a killed run resumes exactly, epsilon teachers work."""

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
