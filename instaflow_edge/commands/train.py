"""`instaflow-edge train`: the training stages and `--recipe synthetic`, on one process or torchrun."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from instaflow_edge.atomic import check_writable
from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)

STAGES = ("vae", "flow", "pairs", "reflow", "distill", "eval")
# the names of train.recipe.SCALES, repeated so that parsing the command line does not load torch
# (a test keeps them equal)
RECIPE_SCALES = ("full", "full-16k-huber", "ci")
RECIPE_WORKDIR = Path("runs/synthetic")
# the flags only some runs read ("recipe": --recipe), refused elsewhere rather than ignored
FLAG_RUNS = {
    "scale": ("recipe",),
    "workdir": ("recipe",),
    "out": STAGES,
    "prompts": STAGES,  # the recipe trains on its own data
    "init": ("vae", "flow", "pairs", "reflow", "distill"),
    "pairs": ("reflow", "distill"),
    "model": ("eval",),
    "eval_steps": ("eval",),
}
# flags that set TrainConfig fields of the same name (dashes for underscores)
CONFIG_FLAGS = {
    "seed": (int, "random seed (0)"),
    "steps": (int, "optimizer steps of a training stage (1000)"),
    "batch_size": (int, "batch size per process (64)"),
    "lr": (float, "AdamW learning rate (5e-4)"),
    "checkpoint_every": (int, "steps between resumable checkpoints (200)"),
    "ema_decay": (
        float,
        "a stage's model is this moving average of its weights, e.g. 0.999; the decay after n "
        "steps is at most (1+n)/(10+n), as in diffusers' EMAModel (0: off)",
    ),
    "num_images": (int, "synthetic training images of the vae and flow stages (20000)"),
    "num_pairs": (int, "pairs to generate (4096; synthetic prompts of the training split)"),
    "shard_size": (int, "pairs per safetensors shard (256)"),
    "sample_steps": (int, "ODE steps of a teacher: Euler, or DPM-Solver for an epsilon model (25)"),
    "guidance": (float, "classifier-free guidance of a teacher, off if <= 1 (1.5)"),
    "distill_loss": (str, "distill: l2 or pseudo-huber, in latent space (l2)"),
    "eval_prompts": (int, "held-out prompts scored by eval (256)"),
    "threads": (int, "torch CPU threads per process (torch's default)"),
    "mixed_precision": (
        str,
        "no, bf16 or fp16 (CUDA, with a gradient scaler): training stages autocast over fp32 "
        "master weights; pairs runs the teacher so and stores fp32 pairs (no)",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train, reflow and distill a one-step model (stages, or --recipe synthetic)",
        description=(
            "The training core. Stages: vae (autoencoder for the synthetic data), flow (1-RF), "
            "pairs (reflow pairs from a teacher's ODE), reflow (2-RF), distill (one-step "
            "student), eval (held-out prompt accuracy, Fréchet Shape Distance, straightness). "
            "`--recipe synthetic` runs them all. Settings: defaults, then --config FILE (JSON), "
            "then flags. Several processes: `torchrun --nproc-per-node N -m instaflow_edge train ...`."
        ),
    )
    parser.add_argument("stage", nargs="?", choices=STAGES, help="the stage to run")
    parser.add_argument("--recipe", choices=("synthetic",), help="run every stage of a recipe")
    parser.add_argument(
        "--scale",
        choices=RECIPE_SCALES,
        help="recipe size (full)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="recipe folder (runs/synthetic)",
    )
    parser.add_argument(
        "--init",
        help="starting model / teacher: 'initial' (the tiny preset's random weights, default for "
        "vae), a diffusers directory (an epsilon model with scheduler/ gets a DPM-Solver ODE) or a hub id",
    )
    parser.add_argument("--pairs", type=Path, help="pair directory (reflow, distill)")
    parser.add_argument(
        "--model", action="append", default=[], help="eval: a model to score (repeat)"
    )
    parser.add_argument(
        "--eval-steps", type=int, help="eval: sampling steps (1); > 1 adds straightness"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        help="captions: text (one per line), JSON Lines or CSV (a caption/prompt/text column, "
        "and file_name/image for image files). vae, flow: train on its images, or on its captions "
        "of the synthetic language rendered; pairs: the teacher's prompts; reflow, distill "
        "(instead of --pairs): pairs made from them first, in OUT/pairs; eval: the prompts "
        "scored (default: synthetic)",
    )
    parser.add_argument("--prompts-column", help="the caption column of a .jsonl/.csv --prompts")
    parser.add_argument("--out", type=Path, help="output folder of the stage")
    parser.add_argument("--config", type=Path, help="JSON file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--device", help="cpu (default) or cuda")
    for name, (kind, text) in CONFIG_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in the backward pass: less memory, more time",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.stage is None) == (args.recipe is None):
        raise UserError("give one stage (vae, flow, pairs, reflow, distill, eval) or --recipe")
    if args.stage and args.out is None:
        raise UserError(f"the {args.stage} stage needs --out DIR")
    run_name = f"the {args.stage} stage" if args.stage else "--recipe"
    for flag, runs in FLAG_RUNS.items():
        if getattr(args, flag) not in (None, []) and (args.stage or "recipe") not in runs:
            raise UserError(
                f"--{flag.replace('_', '-')} does not apply to {run_name}: it is for "
                + ", ".join("--recipe" if run == "recipe" else run for run in runs)
            )
    workdir = args.workdir or RECIPE_WORKDIR  # the recipe's folder
    if args.recipe:  # before any work
        check_writable(workdir, "--workdir")
    else:
        check_writable(args.out)
    if args.stage in ("reflow", "distill") and (args.pairs is None) == (args.prompts is None):
        raise UserError(
            f"the {args.stage} stage needs --pairs DIR (made by the pairs stage) or --prompts "
            "FILE (pairs made from them first), one of the two"
        )
    if args.prompts_column is not None and args.prompts is None:
        raise UserError("--prompts-column names a column of --prompts FILE: give the file too")
    if args.stage in ("flow", "pairs", "reflow", "distill") and args.init is None:
        raise UserError(f"the {args.stage} stage needs --init MODEL (its starting weights)")
    if args.stage == "eval" and not args.model:
        raise UserError("the eval stage needs --model DIR (repeat for several)")
    if args.stage == "pairs" and (args.out / "pairs.json").is_file() and not args.resume:
        raise UserError(f"{args.out} holds pairs already: add --resume, or use another --out")

    import torch

    from instaflow_edge.commands.generate import resolve_device
    from instaflow_edge.quiet import quiet_libraries
    from instaflow_edge.train.config import TrainConfig, make_config
    from instaflow_edge.train.distributed import init_world, local_device

    quiet_libraries()
    flags = {name: getattr(args, name) for name in (*CONFIG_FLAGS, "gradient_checkpointing")}
    if args.device is not None:
        flags["device"] = local_device(resolve_device(args.device))
    config = make_config(TrainConfig(), args.config, flags)
    if config.threads:
        torch.set_num_threads(config.threads)
    world = init_world(config.device)
    if args.recipe:
        from instaflow_edge.train.recipe import run_recipe

        summary = run_recipe(workdir, args.scale or "full", config, args.resume, world)
        if world.is_main:
            print((workdir / "eval" / "table.md").read_text(), end="")
            logger.info("recipe done in %.0f s: %s", sum(summary["seconds"].values()), workdir)
        return 0
    return _run_stage(args, config, world)


def _run_stage(args: argparse.Namespace, config, world) -> int:
    from instaflow_edge.train import stages
    from instaflow_edge.train.data import INITIAL, load_pipeline, to_flow, training_captions

    if args.stage == "eval":
        return _run_eval(args, config, world)
    init = args.init or INITIAL
    if args.stage == "pairs":
        _make_pairs(args, config, world, args.out)
        return 0
    source = None
    if args.prompts is not None and args.stage in ("vae", "flow"):
        source = training_captions(args.prompts, args.prompts_column)  # checked before any work
    if not stages.start_stage(args.out, args.resume, world):
        return 0
    pairs = args.pairs
    if pairs is None and args.stage in ("reflow", "distill"):  # from --prompts
        pairs = args.out / "pairs"
        teacher = _make_pairs(args, config, world, pairs)
        pipe = to_flow(teacher, init)  # the student starts from the teacher's weights
    else:
        pipe = to_flow(load_pipeline(init, config.seed, config.device), init)
    if args.stage == "vae":
        model = stages.train_vae(pipe, args.out, config, world, source)
    elif args.stage == "flow":
        model = stages.train_flow(pipe, args.out, config, world, source)
    elif args.stage == "reflow":
        model = stages.train_reflow(pipe, pairs, args.out, config, world)
    else:
        model = stages.train_distill(pipe, pairs, args.out, config, world)
    if world.is_main:
        logger.info("wrote %s (losses in %s)", model, args.out / "loss.csv")
    return 0


def _make_pairs(args: argparse.Namespace, config, world, out: Path):
    """Pairs from the --init teacher's ODE for --prompts (or synthetic prompts) into `out`;
    returns the teacher."""
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.train.data import load_pipeline, teacher_kind
    from instaflow_edge.train.pairs import generate_pairs, synthetic_prompts

    if args.prompts is not None:
        prompts = load_prompts(args.prompts, config.num_pairs, args.prompts_column)
    else:
        prompts = synthetic_prompts(config.num_pairs, config.seed)
    pipe = load_pipeline(args.init, config.seed, config.device)
    generate_pairs(pipe, teacher_kind(args.init), prompts, out, config, world, args.init)
    if world.is_main:
        logger.info("wrote %d pairs to %s", len(prompts), out)
    return pipe


def _run_eval(args: argparse.Namespace, config, world) -> int:
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.synthetic.features import train_feature_net
    from instaflow_edge.train.data import check_synthetic
    from instaflow_edge.train.evaluate import Entry, evaluate, held_out_prompts

    if args.prompts is not None:
        prompts = load_prompts(args.prompts, config.eval_prompts, args.prompts_column)
        check_synthetic(args.prompts, prompts, "(eval scores images with its checker)")
    else:
        prompts = held_out_prompts(config.eval_prompts, config.seed)
    features = args.out / "features.safetensors"
    if world.is_main and not features.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        train_feature_net(features, steps=config.feature_steps, seed=config.seed)
    world.barrier()
    steps = args.eval_steps or 1
    guidance = config.guidance if steps > 1 else 0.0  # a one-step model has guidance built in
    entries = [Entry(m, m, steps, guidance, steps > 1) for m in args.model]
    evaluate(entries, features, prompts, config.seed, args.out, world)
    if world.is_main:
        print((args.out / "table.md").read_text(), end="")
    return 0
