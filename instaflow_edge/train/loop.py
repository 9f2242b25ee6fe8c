"""The training loop every stage shares: AdamW, data parallelism through PyTorch's
DistributedDataParallel, mixed precision, an optional exponential moving average of the weights,
per-step metrics (CSV and TensorBoard), held-out loss, resume."""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from instaflow_edge.atomic import atomic_directory, atomic_file
from instaflow_edge.errors import NonFiniteError, UserError
from instaflow_edge.train.config import TrainConfig
from instaflow_edge.train.distributed import World

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(config: TrainConfig) -> str:
    return "cuda" if config.device.startswith("cuda") else "cpu"


def autocast(config: TrainConfig) -> torch.autocast:
    """config.mixed_precision as torch.autocast (off for "no"); weights stay as they are."""
    precision = AUTOCAST[config.mixed_precision]
    return torch.autocast(_device_type(config), dtype=precision, enabled=precision is not None)


EMA_FILE = "ema.safetensors"  # in a checkpoint: the moving average, one tensor per parameter
LOSS_CSV = "loss.csv"  # per step: loss, lr, samples/s (and GPU memory on CUDA)
TENSORBOARD = "tensorboard"  # the same per-step metrics as TensorBoard events
HELD_OUT = "held_out_loss.json"


@dataclass(frozen=True)
class Share:
    """One step's global batch and this process's share of it.

    `generator` is seeded by (seed, step) alone, so every process draws the same global batch
    (indices, noise, t: all `size` of them, in the same order) and keeps `part`. N processes
    with batch B therefore train on exactly what one process with batch N*B does, and a resumed
    run sees exactly the batches the interrupted one would have seen.
    """

    generator: torch.Generator
    size: int  # samples in the global batch (all processes)
    part: slice  # this process's rows of it


# The loss of one step on this process's part of the global batch.
LossFn = Callable[[Share], torch.Tensor]
# The loss on one fixed held-out batch (same data, noise and t at every call): measured before
# the first step and after the last, it says whether the stage learned, free of batch noise.
ProbeFn = Callable[[], torch.Tensor]


def share(seed: int, step: int, batch_size: int, world: World) -> Share:
    """Step `step`'s global batch (batch_size per process) and this process's part of it."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009) % 2**63)
    first = world.rank * batch_size
    return Share(generator, batch_size * world.size, slice(first, first + batch_size))


class _Trainee(torch.nn.ModuleDict):
    """The trained modules as one module, so that one DistributedDataParallel instance averages
    all their gradients: its forward runs a stage's loss function, which calls the modules."""

    def forward(self, loss_fn: LossFn, batch: Share) -> torch.Tensor:
        return loss_fn(batch)


def _data_parallel(trainee: _Trainee, world: World, device: str) -> torch.nn.Module:
    """PyTorch's DistributedDataParallel over the trainee when several processes run (it
    broadcasts rank 0's weights, then all-reduces the gradients in buckets during backward);
    the trainee itself with one process."""
    if world.size == 1:
        return trainee
    from torch.nn.parallel import DistributedDataParallel

    devices = [torch.device(device)] if device.startswith("cuda") else None
    return DistributedDataParallel(trainee, device_ids=devices)


def moving_average(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """diffusers' EMAModel of `parameters`, its decay warming up as min(decay, (1+n)/(10+n)) after
    n updates so that the first steps' weights, far from trained, fade out quickly.
    update_after_step=-1 is what makes n the number of updates: by default EMAModel counts one
    behind (decay 0 at the first update, dropping the initial weights at once, then n/(9+n)).
    foreach=True: one fused update for all the tensors per step."""
    return EMAModel(parameters, decay=decay, update_after_step=-1, foreach=True)


def _save_average(average: EMAModel, path: Path) -> None:
    """The shadow weights, one tensor per parameter, and the update count as metadata."""
    tensors = {str(i): t.detach().contiguous() for i, t in enumerate(average.shadow_params)}
    save_file(tensors, str(path), metadata={"updates": str(average.optimization_step)})


def _load_average(average: EMAModel, path: Path, updates: int) -> None:
    """Restore `_save_average`'s file (`updates`: the count for a file that has none)."""
    with safe_open(str(path), framework="pt") as handle:
        updates = int((handle.metadata() or {}).get("updates", updates))
        shadow = [
            handle.get_tensor(str(i)).to(current.device)
            for i, current in enumerate(average.shadow_params)
        ]
    average.load_state_dict({"shadow_params": shadow, "optimization_step": updates})


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach()  # no copy: safetensors writes from the tensors
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def fit(
    modules: dict[str, torch.nn.Module],
    loss_fn: LossFn,
    config: TrainConfig,
    out_dir: Path,
    world: World,
    desc: str,
    probe: ProbeFn | None = None,
) -> list[float]:
    """Train the parameters of `modules` for config.steps steps; returns the loss of every step.

    Checkpoints go to OUT/checkpoint every config.checkpoint_every steps; if one is there the run
    continues from it (the caller has checked --resume), else it starts from the modules as given.
    With config.ema_decay > 0 the modules end holding the moving average of their weights instead
    of the last step's. With a probe, OUT/held_out_loss.json records its value before and after
    training (after: of the weights the modules end with).
    """
    parameters = [p for module in modules.values() for p in module.parameters()]
    trainee = _Trainee(modules)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    if config.gradient_checkpointing:
        _checkpoint_activations(modules, desc)
    on_cuda = _device_type(config) == "cuda"
    # autocast over fp32 weights and optimizer state; fp16 also scales the loss
    scaler = torch.amp.GradScaler(_device_type(config), enabled=config.mixed_precision == "fp16")
    warmup = max(1, min(config.warmup, config.steps // 10))

    def factor(step: int) -> float:  # linear warm-up, then linear decay to a tenth
        return min(1.0, (step + 1) / warmup) * (1.0 - 0.9 * step / config.steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    average = moving_average(parameters, config.ema_decay) if config.ema_decay > 0 else None
    history: list[dict[str, float]] = []  # per step: loss, lr, samples/s (and GPU memory)
    before = None
    checkpoint = out_dir / CHECKPOINT
    if (checkpoint / "state.json").is_file():
        state = json.loads((checkpoint / "state.json").read_text())
        if state["stage"] != desc:
            raise UserError(f"{checkpoint} is a checkpoint of stage {state['stage']}, not {desc}")
        weights = load_file(str(checkpoint / "weights.safetensors"))
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            )
        _load_optimizer(optimizer, checkpoint)
        schedule.load_state_dict(state["schedule"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        before = state.get("held_out_before")
        history = state.get(
            "history", [{"step": i + 1, "loss": v} for i, v in enumerate(state["losses"])]
        )
        if average is not None:
            if not (checkpoint / EMA_FILE).is_file():
                raise UserError(f"{checkpoint} has no moving average: resume it with ema_decay 0")
            _load_average(average, checkpoint / EMA_FILE, updates=len(history))
        logger.info("%s: resuming at step %d of %d", desc, len(history), config.steps)
    elif probe is not None:
        before = _evaluate(probe, modules)
    for module in modules.values():
        module.train()
    bar = tqdm(
        range(len(history), config.steps),
        initial=len(history),
        total=config.steps,
        desc=desc,
        unit="step",
        disable=not world.is_main,
    )
    saved = len(history)  # the step of the checkpoint on disk (0: none)
    board = _tensorboard(out_dir / TENSORBOARD) if world.is_main else None
    model = _data_parallel(trainee, world, config.device)  # after a resume: rank 0's weights
    for step in bar:
        started = time.perf_counter()
        lr = schedule.get_last_lr()[0]
        with autocast(config):
            loss = model(loss_fn, share(config.seed, step, config.batch_size, world))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.float()).backward()  # DistributedDataParallel averages the gradients
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        mean_loss = float(world.mean(loss.detach().float()))  # every rank sees the same value
        stopped = functools.partial(
            _stop_unless_finite, step=step, desc=desc, checkpoint=checkpoint, saved=saved
        )
        stopped(f"the loss ({mean_loss})", math.isfinite(mean_loss))
        if not scaler.is_enabled():  # fp16's scaler skips an overflowing step and scales down
            stopped("the gradient norm", math.isfinite(float(norm)))
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        stopped("a weight", all(bool(torch.isfinite(p).all()) for p in parameters))
        if average is not None:
            average.step(parameters)
        done = step + 1
        row = {
            "step": done,
            "loss": mean_loss,
            "lr": lr,
            "samples_per_s": config.batch_size * world.size / (time.perf_counter() - started),
        }
        if on_cuda:
            row["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        history.append(row)
        if board is not None:
            for key, value in row.items():
                if key != "step":
                    board.add_scalar(f"{desc}/{key}", value, done)
        bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
        if done % config.checkpoint_every == 0 or done == config.steps:
            saved = done
            if world.is_main:
                state = {
                    "stage": desc,
                    "losses": [row["loss"] for row in history],
                    "history": history,
                    "held_out_before": before,
                }
                if scaler.is_enabled():
                    state["scaler"] = scaler.state_dict()
                _save_checkpoint(modules, optimizer, schedule, average, state, checkpoint)
                write_loss_csv(out_dir / LOSS_CSV, history)
                if board is not None:
                    board.flush()
            world.barrier()
    if board is not None:
        board.close()
    if average is not None:
        average.copy_to(parameters)
    for module in modules.values():
        module.eval()
    if probe is not None and before is not None and world.is_main:
        held_out = {"before": before, "after": _evaluate(probe, modules)}
        logger.info("%s: held-out loss %.5f -> %.5f", desc, held_out["before"], held_out["after"])
        with atomic_file(out_dir / HELD_OUT) as staging:
            staging.write_text(json.dumps(held_out) + "\n")
    world.barrier()
    return [row["loss"] for row in history]


@torch.no_grad()
def _tensorboard(folder: Path):
    """A TensorBoard writer into `folder`, or None (said once) where tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: per-step metrics go to the CSV only")
        return None
    return SummaryWriter(str(folder))


def _checkpoint_activations(modules: dict[str, torch.nn.Module], desc: str) -> None:
    """Turn on the libraries' own activation checkpointing (diffusers' and transformers')."""
    for name, module in modules.items():
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
            # non-reentrant, as diffusers': the reentrant kind breaks DistributedDataParallel
            module.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            logger.warning("%s: %s has no gradient checkpointing; it runs without", desc, name)


def _stop_unless_finite(
    what: str, finite: bool, *, step: int, desc: str, checkpoint: Path, saved: int
) -> None:
    """Stop training at the first non-finite number, before it reaches the weights on disk."""
    if finite:
        return
    kept = f"the checkpoint of step {saved} in {checkpoint} is kept" if saved else "no checkpoint"
    raise NonFiniteError(
        f"{desc}: {what} at step {step + 1} is not finite: training stopped ({kept}); "
        "lower --lr or check the data"
    )


def _evaluate(probe: ProbeFn, modules: dict[str, torch.nn.Module]) -> float:
    for module in modules.values():
        module.eval()
    with torch.no_grad():  # a measurement: no graph kept
        return float(probe())


def _save_checkpoint(modules, optimizer, schedule, average, state: dict, folder: Path) -> None:
    weights = {
        f"{name}.{key}": value.detach().contiguous()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    tensors, groups = _optimizer_tensors(optimizer)
    with atomic_directory(folder, overwrite=True) as staging:
        save_file(weights, str(staging / "weights.safetensors"))
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "optimizer.json").write_text(json.dumps(groups))
        if average is not None:
            _save_average(average, staging / EMA_FILE)
        state = {**state, "schedule": schedule.state_dict()}
        (staging / "state.json").write_text(json.dumps(state))


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """Per step: loss, learning rate, samples/s (all processes) and, on CUDA, peak GPU memory."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    with atomic_file(path) as staging, staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(
            {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}
            for row in history
        )


def read_loss_csv(path: Path) -> list[float]:
    with path.open(newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def read_held_out(out_dir: Path) -> dict[str, float]:
    """A finished stage's held-out loss, {"before": ..., "after": ...}."""
    return json.loads((out_dir / HELD_OUT).read_text())
