"""Training-core units: flow math, straightness, config merging, and resume of the shared loop."""

from __future__ import annotations

import json

import pytest
import torch

from instaflow_edge.errors import UserError
from instaflow_edge.flow import (
    PSEUDO_HUBER_C,
    distillation_loss,
    euler_times,
    interpolate,
    straightness,
)
from instaflow_edge.train.config import TrainConfig, make_config
from instaflow_edge.train.distributed import World
from instaflow_edge.train.loop import fit, read_held_out, read_loss_csv


def test_interpolate_goes_from_noise_to_data():
    noise, data = torch.zeros(2, 3), torch.ones(2, 3)
    mixed = interpolate(noise, data, torch.tensor([0.0, 0.25]))
    assert torch.equal(mixed[0], noise[0]) and torch.allclose(mixed[1], torch.full((3,), 0.25))


def test_straightness_is_zero_on_a_line_and_positive_on_a_bend():
    times = euler_times(4)
    z0, z1 = torch.zeros(1, 2), torch.ones(1, 2)
    line = [z0 + float(t) * (z1 - z0) for t in times]
    assert float(straightness(line, times)) == pytest.approx(0.0, abs=1e-12)
    bend = [line[0], torch.tensor([[1.0, 0.0]]), line[2], line[3], line[4]]
    assert float(straightness(bend, times)) > 0.1


def test_the_pseudo_huber_distillation_loss_is_l1_like_for_large_errors_and_l2_for_small():
    target = torch.zeros(4)
    large, small = torch.full((4,), 1.0), torch.full((4,), PSEUDO_HUBER_C / 10)
    assert float(distillation_loss(large, target, "l2")) == pytest.approx(1.0)
    # sqrt(1 + c^2) - c: just above |d| - c, so large errors weigh linearly
    huber = float(distillation_loss(large, target, "pseudo-huber"))
    assert 1.0 - PSEUDO_HUBER_C < huber < 1.0 - PSEUDO_HUBER_C / 2
    # d^2 / (2c) near zero
    expected = (PSEUDO_HUBER_C / 10) ** 2 / (2 * PSEUDO_HUBER_C)
    assert float(distillation_loss(small, target, "pseudo-huber")) == pytest.approx(
        expected, rel=1e-2
    )
    with pytest.raises(ValueError, match="pseudo-huber"):
        distillation_loss(large, target, "l1")


def test_config_file_then_flags_override_defaults(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"steps": 7, "lr": 1, "guidance": 2.0}))
    config = make_config(TrainConfig(), file, {"steps": 9, "batch_size": None})
    assert (config.steps, config.lr, config.guidance, config.batch_size) == (9, 1.0, 2.0, 64)
    file.write_text(json.dumps({"stpes": 7}))
    with pytest.raises(UserError, match="stpes"):
        make_config(TrainConfig(), file)
    with pytest.raises(UserError, match="steps"):
        make_config(TrainConfig(), None, {"steps": 0})


def _regression(seed: int = 0):
    torch.manual_seed(100)
    target = torch.nn.Linear(4, 1)  # the same task in every run
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)

    def loss_fn(batch):
        x = torch.randn(16, 4, generator=batch.generator)
        with torch.no_grad():
            y = target(x)
        return torch.nn.functional.mse_loss(model(x), y)

    held_out = torch.randn(64, 4, generator=torch.Generator().manual_seed(7))

    def probe():
        return torch.nn.functional.mse_loss(model(held_out), target(held_out))

    return model, loss_fn, probe


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_an_interrupted_fit_resumes_to_the_same_weights_and_losses(tmp_path, ema_decay):
    config = TrainConfig(steps=8, checkpoint_every=3, lr=0.05, warmup=1, ema_decay=ema_decay)
    model, loss_fn, probe = _regression()
    expected = fit({"m": model}, loss_fn, config, tmp_path / "a", World(), "unit", probe)
    expected_weights = [p.detach().clone() for p in model.parameters()]

    model, loss_fn, probe = _regression()
    calls = []

    def interrupted(batch):
        calls.append(1)
        if len(calls) == 5:  # dies in step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return loss_fn(batch)

    with pytest.raises(KeyboardInterrupt):
        fit({"m": model}, interrupted, config, tmp_path / "b", World(), "unit", probe)
    model, loss_fn, probe = _regression(seed=1)  # a fresh process: weights from the checkpoint
    resumed = fit({"m": model}, loss_fn, config, tmp_path / "b", World(), "unit", probe)
    assert resumed == pytest.approx(expected, rel=1e-6)
    for weight, expected_weight in zip(model.parameters(), expected_weights, strict=True):
        torch.testing.assert_close(weight.detach(), expected_weight)
    assert read_loss_csv(tmp_path / "b" / "loss.csv") == pytest.approx(expected, abs=1e-6)
    assert expected[-1] < expected[0]
    # the held-out loss before training survives the interruption, and training lowered it
    held_out = read_held_out(tmp_path / "b")
    assert held_out == pytest.approx(read_held_out(tmp_path / "a"), rel=1e-6)
    assert held_out["after"] < held_out["before"]


def test_with_ema_decay_a_stage_ends_with_the_moving_average_of_its_weights(tmp_path):
    steps, decay = 30, 0.9
    model, loss_fn, _ = _regression()
    before_each_step = []

    def recording(batch):
        before_each_step.append([p.detach().clone() for p in model.parameters()])
        return loss_fn(batch)

    config = TrainConfig(steps=steps, checkpoint_every=steps, lr=0.05, warmup=1)
    fit({"m": model}, recording, config, tmp_path / "plain", World(), "unit")
    after_each_step = before_each_step[1:] + [[p.detach().clone() for p in model.parameters()]]
    average = [p.clone() for p in _regression()[0].parameters()]
    for updates, weights in enumerate(after_each_step, start=1):
        rate = 1.0 - min(decay, (1 + updates) / (10 + updates))
        average = [a + rate * (w - a) for a, w in zip(average, weights, strict=True)]

    model, loss_fn, _ = _regression()
    config = TrainConfig(steps=steps, checkpoint_every=steps, lr=0.05, warmup=1, ema_decay=decay)
    fit({"m": model}, loss_fn, config, tmp_path / "ema", World(), "unit")
    for weight, expected, last in zip(
        model.parameters(), average, after_each_step[-1], strict=True
    ):
        torch.testing.assert_close(weight.detach(), expected)
        assert not torch.allclose(weight.detach(), last)  # not the last step's weights
    with pytest.raises(UserError, match="ema_decay"):
        make_config(TrainConfig(), None, {"ema_decay": 1.0})
    with pytest.raises(UserError, match="no moving average"):  # a checkpoint made without one
        fit({"m": model}, loss_fn, config, tmp_path / "plain", World(), "unit")


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from instaflow_edge.errors import NonFiniteError

    config = TrainConfig(steps=8, checkpoint_every=2, lr=0.05, warmup=1)
    model, loss_fn, _ = _regression()
    calls = []

    def diverging(batch):
        calls.append(1)
        return loss_fn(batch) * (float("nan") if len(calls) >= 4 else 1.0)

    with pytest.raises(
        NonFiniteError, match="loss .* at step 4 is not finite.*checkpoint of step 2"
    ):
        fit({"m": model}, diverging, config, tmp_path / "run", World(), "unit")
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert len(state["losses"]) == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_training_stops_when_a_step_makes_a_weight_non_finite(tmp_path):
    from instaflow_edge.errors import NonFiniteError

    model = torch.nn.Linear(2, 2)
    config = TrainConfig(steps=40, checkpoint_every=1, lr=3e37, warmup=1)

    def one_weight(batch):  # finite until the weight is; Adam's steps of ~lr overflow it
        return model.weight[0, 0] * 1.0

    with pytest.raises(NonFiniteError, match=r"a weight at step \d+ is not finite") as stopped:
        fit({"m": model}, one_weight, config, tmp_path / "run", World(), "unit")
    step = int(str(stopped.value).split("at step ")[1].split()[0])
    assert f"checkpoint of step {step - 1} " in str(stopped.value)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert len(state["losses"]) == step - 1


def test_bf16_mixed_precision_autocasts_and_keeps_fp32_master_weights(tmp_path):
    config = TrainConfig(steps=8, checkpoint_every=8, lr=0.05, warmup=1, mixed_precision="bf16")
    model, loss_fn, _ = _regression()
    seen = []

    def autocast_loss(batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return loss_fn(batch)

    losses = fit({"m": model}, autocast_loss, config, tmp_path / "bf16", World(), "unit")
    assert seen == [torch.bfloat16] * 8
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]


def test_fp16_mixed_precision_needs_cuda():
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        make_config(TrainConfig(), None, {"mixed_precision": "fp16"})
    with pytest.raises(UserError, match="mixed_precision must be one of no, bf16, fp16"):
        make_config(TrainConfig(), None, {"mixed_precision": "int8"})


def test_gradient_checkpointing_trains_the_same_weights_with_less_kept(pipeline, tmp_path):
    import copy

    def train(checkpointing: bool):
        unet = copy.deepcopy(pipeline.unet).train()
        config = TrainConfig(steps=2, checkpoint_every=2, lr=1e-3, warmup=1,
                             gradient_checkpointing=checkpointing)  # fmt: skip

        def loss_fn(batch):
            latents = torch.randn(2, 4, 16, 16, generator=batch.generator)
            states = torch.randn(2, 32, 64, generator=batch.generator)
            out = unet(latents, torch.full((2,), 500.0), encoder_hidden_states=states).sample
            return out.pow(2).mean()

        losses = fit({"unet": unet}, loss_fn, config, tmp_path / str(checkpointing), World(), "u")
        return unet, losses

    plain, plain_losses = train(False)
    checkpointed, losses = train(True)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_every_step_logs_loss_lr_and_throughput_to_csv_and_tensorboard(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(steps=6, checkpoint_every=3, lr=0.05, warmup=2, batch_size=4)
    model, loss_fn, _ = _regression()
    losses = fit({"m": model}, loss_fn, config, tmp_path / "run", World(), "unit")
    with (tmp_path / "run" / "loss.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(row["loss"]) for row in rows] == pytest.approx(losses, rel=1e-6)
    # the schedule's rate at each step: linear decay to a tenth over 6 steps (warm-up: 1 step)
    assert [float(row["lr"]) for row in rows] == pytest.approx(
        [0.05 * (1 - 0.9 * step / 6) for step in range(6)]
    )
    assert all(float(row["samples_per_s"]) > 0 for row in rows)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"unit/loss", "unit/lr", "unit/samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("unit/loss")] == pytest.approx(losses, rel=1e-5)
