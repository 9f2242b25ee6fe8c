"""The synthetic recipe at CI size: each stage lowers its held-out loss; eval scores every model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instaflow_edge.commands.train import RECIPE_SCALES
from instaflow_edge.errors import UserError
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.train.config import TrainConfig
from instaflow_edge.train.distributed import World
from instaflow_edge.train.loop import read_held_out, read_loss_csv
from instaflow_edge.train.pairs import shard_indices
from instaflow_edge.train.recipe import SCALES, run_recipe

TRAINED = ("vae", "flow", "reflow", "distill_1rf", "distill_2rf")

pytestmark = pytest.mark.slow  # the CI-size recipe: every stage, trained for real


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy batches: one thread is as fast, and never oversubscribes
    try:
        workdir = tmp_path_factory.mktemp("recipe")
        summary = run_recipe(workdir, "ci", TrainConfig(), resume=False, world=World())
    finally:
        torch.set_num_threads(threads)
    return workdir, summary


@pytest.mark.parametrize("stage", TRAINED)
def test_each_stage_lowers_its_held_out_loss_and_writes_a_loadable_model(recipe, stage):
    workdir, _ = recipe
    losses = read_loss_csv(workdir / stage / "loss.csv")
    assert len(losses) == SCALES["ci"]["distill" if "distill" in stage else stage]["steps"]
    # the same held-out batch (same data, noise and t) before and after the stage's training
    held_out = read_held_out(workdir / stage)
    assert held_out["after"] < held_out["before"], held_out
    pipe = OneStepPipeline.from_pretrained(workdir / stage / "model")
    image = pipe(prompt="a red circle", output_type="np")
    assert image.shape == (1, 64, 64, 3)
    # a diffusers model: stock diffusers loads it and, one step from the same noise, agrees
    from diffusers import DiffusionPipeline

    stock = DiffusionPipeline.from_pretrained(workdir / stage / "model")
    noise = pipe.make_noise([0])
    out = stock("a red circle", latents=noise, num_inference_steps=1, guidance_scale=0.0)
    pixels = np.asarray(out.images[0])  # PIL, rounded as ours
    assert np.abs(pixels.astype(int) - image[0].astype(int)).max() <= 1


def test_pairs_are_complete_and_the_table_has_every_model(recipe):
    workdir, summary = recipe
    count = SCALES["ci"]["pairs_1rf"]["num_pairs"]
    assert sorted(shard_indices(workdir / "pairs_1rf")) == list(range(count))
    rows = {row["model"]: row for row in summary["rows"]}
    for name in (
        "(a) 1-RF",
        "(b) 2-RF",
        "(c) 1-RF distilled",
        "(d) 2-RF distilled",
        "1-RF teacher",
        "2-RF",
    ):
        assert 0.0 <= rows[name]["accuracy"] <= 1.0 and rows[name]["fsd"] >= 0.0
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["rows"] == summary["rows"]
    # straightness is measured on the multi-step flows only
    assert rows["1-RF teacher"]["straightness"] > 0 and rows["2-RF"]["straightness"] > 0
    assert rows["(a) 1-RF"]["straightness"] is None
    assert "| (d) 2-RF distilled |" in (workdir / "eval" / "table.md").read_text()


def test_the_recipe_records_the_wall_time_of_every_stage(recipe):
    workdir, summary = recipe
    stages = ["vae", "flow", "pairs_1rf", "reflow", "pairs_2rf", "distill_1rf", "distill_2rf"]
    assert list(summary["seconds"]) == [*stages, "eval"]
    assert all(seconds > 0 for seconds in summary["seconds"].values())
    assert json.loads((workdir / "timings.json").read_text()) == summary["seconds"]
    assert summary["prompts"] == SCALES["ci"]["eval"]["eval_prompts"]


def test_the_recipe_refuses_a_used_workdir_without_resume(recipe):
    workdir, _ = recipe
    with pytest.raises(UserError, match="--resume"):
        run_recipe(workdir, "ci", TrainConfig(), resume=False, world=World())


def test_the_command_line_offers_exactly_the_recipe_scales():
    assert RECIPE_SCALES == tuple(SCALES)
