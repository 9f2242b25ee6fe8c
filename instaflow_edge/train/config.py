"""Training configuration: defaults, a JSON config file, then command-line flags, in that order."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from instaflow_edge.errors import UserError
from instaflow_edge.flow import DISTILL_LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of every stage; each stage reads the ones it needs."""

    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads per process; 0 leaves torch's default
    steps: int = 1000  # optimizer steps of a training stage
    batch_size: int = 64  # per process
    lr: float = 5e-4
    warmup: int = 100
    checkpoint_every: int = 200
    ema_decay: float = 0.0  # training stages end with this moving average of the weights; 0: off
    num_images: int = 20000  # synthetic training images (vae and flow stages)
    kl_weight: float = 1e-6  # vae stage
    train_text_encoder: bool = True  # flow stage: train the text encoder with the UNet
    caption_dropout: float = 0.1  # flow stage: share of empty captions, for guidance
    num_pairs: int = 4096  # pairs stage
    shard_size: int = 256  # pairs per safetensors shard
    sample_steps: int = 25  # Euler (or DPM-Solver) steps of a teacher
    guidance: float = 1.5  # classifier-free guidance of a teacher (off if <= 1)
    distill_loss: str = "l2"  # distill stage: "l2" or "pseudo-huber" (closer to L1), in latents
    eval_prompts: int = 256  # held-out prompts scored by the eval stage
    feature_steps: int = 400  # training steps of the Fréchet feature network
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (CUDA): autocast of training and teachers
    gradient_checkpointing: bool = False  # recompute activations in the backward pass

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


FIELDS = {field.name: field for field in fields(TrainConfig)}
MIXED_PRECISIONS = ("no", "bf16", "fp16")


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a JSON object whose keys are TrainConfig fields."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} is not valid JSON: {error}") from error
    if not isinstance(settings, dict):
        raise UserError(f"config file {path} must hold a JSON object")
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise UserError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return settings


def make_config(
    base: TrainConfig, file: Path | None = None, flags: dict[str, Any] | None = None
) -> TrainConfig:
    """`base`, overridden by the config file, overridden by the flags that were given (not None)."""
    settings = read_config_file(file) if file is not None else {}
    settings.update({key: value for key, value in (flags or {}).items() if value is not None})
    for key, value in settings.items():
        kind = type(getattr(base, key))
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"setting {key} must be a {kind.__name__}, got {value!r}")
        settings[key] = value
    config = replace(base, **settings)
    positive = ("steps", "batch_size", "num_images", "num_pairs", "shard_size", "sample_steps")
    for key in (*positive, "eval_prompts", "checkpoint_every"):
        if getattr(config, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.distill_loss not in DISTILL_LOSSES:
        raise UserError(
            f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got {config.distill_loss!r}"
        )
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.mixed_precision not in MIXED_PRECISIONS:
        raise UserError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, "
            f"got {config.mixed_precision!r}"
        )
    if config.mixed_precision == "fp16" and not config.device.startswith("cuda"):
        raise UserError("mixed_precision fp16 needs CUDA (a gradient scaler); use bf16 on the CPU")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise UserError(f"lr must be a positive number, got {config.lr}")
    return config
