"""Install the synthetic recipe's model (d), 2-RF distilled, as the embedded default, with its model card.

Run from the repository root after the recipe: `python scripts/make_embedded_default.py
[--workdir runs/synthetic]`. The weights are copied from WORKDIR/distill_2rf/model; the tokenizer
is rebuilt by the project's deterministic builder (the recipe trained with that same tokenizer);
the card records the recipe's settings, seed and the measured table from WORKDIR/summary.json;
docs/embedded_default_one_step.png shows the model's one-step images under rendered references.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from instaflow_edge.models import EMBEDDED_MODEL_DIR, LoadedModel, load_model
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.presets import TINY, count_parameters
from instaflow_edge.synthetic.captions import parse_caption
from instaflow_edge.synthetic.checker import check_image
from instaflow_edge.synthetic.render import render
from instaflow_edge.tokenizer import build_tokenizer
from instaflow_edge.train.evaluate import held_out_prompts, markdown_table
from instaflow_edge.train.recipe import SCALES

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "embedded_default_one_step.png"
CHOSEN = "(d) 2-RF distilled"
TEACHER = "1-RF teacher"
CEILING = "VAE round trip of rendered images"
CHECKS = ("colour", "shape", "count", "position")
MODEL_CARD = """# Embedded default: tiny InstaFlow-architecture model, one step

CLIP text encoder, UNet2DConditionModel (velocity prediction, called once at timestep 1000:
`latents = noise + v`) and AutoencoderKL (scaling factor {scaling_factor}), {parameters:.2f} M
parameters, for 64x64 images of the synthetic captioned-shapes domain ("a red circle above a
blue square", counts, sizes, backgrounds). Architecture: `presets.TINY`. Tokenizer: the
project's BPE trained on that caption language (`instaflow_edge/tokenizer.py`).

## How it was made

Model {chosen} of the synthetic recipe, seed {seed}, scale `{scale}`:
`python bench/synthetic_recipe.py --scale {scale}` (equivalently
`instaflow-edge train --recipe synthetic --scale {scale}`), then
`python scripts/make_embedded_default.py`. Stages and settings (`train/recipe.py`):

{settings}

Wall time per stage (seconds, 2 CPU threads; `timings.json` of the recipe): {seconds};
{minutes:.0f} min in all.{seconds_note}

## Measured on {prompts} held-out prompts

The deterministic checker scores colours, shapes, sizes, counts, positions and backgrounds; an
image passes ("prompt accuracy") when every check passes. FSD is the Fréchet distance in the
features of a small CNN the project trains on rendered scenes (lower is better).

{table}

This model's one-step prompt accuracy is {accuracy:.3f}, {ratio:.2f} of the 25-step 1-RF teacher's
({teacher:.3f}); the VAE's own round trip caps any model at {ceiling:.3f}. Per check, in one step:
{checks}.
"""


def _settings(scale: str) -> str:
    lines = []
    for stage, values in SCALES[scale].items():
        text = ", ".join(f"{key} {value}" for key, value in values.items())
        lines.append(f"- `{stage}`: {text}")
    return "\n".join(lines)


def write_samples(pipe: OneStepPipeline, path: Path, count: int = 8) -> int:
    """Rendered references (top row) over the model's one-step images, seeds 0.. (bottom row),
    for the first `count` distinct held-out prompts; returns how many pass the checker."""
    prompts = list(dict.fromkeys(held_out_prompts(64, seed=0)))[:count]
    images = pipe(prompts, seed=0, output_type="np")
    rng = random.Random(0)
    top = np.concatenate([render(parse_caption(prompt), rng) for prompt in prompts], 1)
    gap = np.full((4, top.shape[1], 3), 255, np.uint8)
    grid = np.concatenate([top, gap, np.concatenate(list(images), 1)], 0)
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    verdicts = [
        check_image(image, parse_caption(p)) for p, image in zip(prompts, images, strict=True)
    ]
    return sum(all(verdict.values()) for verdict in verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/synthetic"))
    parser.add_argument(
        "--seconds-note", default="", help="how the wall times were taken, if not in one run"
    )
    args = parser.parse_args()
    summary = json.loads((args.workdir / "summary.json").read_text())
    trained = load_model(str(args.workdir / "distill_2rf" / "model"))
    config = TINY["text_encoder"]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(
            Path(scratch) / "tokenizer", config["vocab_size"], config["max_position_embeddings"]
        )
        model = LoadedModel(
            tokenizer=tokenizer,
            source="embedded:tiny",
            text_encoder=trained.text_encoder,
            unet=trained.unet,
            vae=trained.vae,
        )
        pipe = OneStepPipeline(model)
        pipe.save_pretrained(EMBEDDED_MODEL_DIR, overwrite=True)
    parameters = sum(count_parameters(m) for m in (pipe.text_encoder, pipe.unet, pipe.vae))
    rows = {row["model"]: row for row in summary["rows"]}
    card = MODEL_CARD.format(
        scaling_factor=pipe.scaling_factor,
        parameters=parameters / 1e6,
        chosen=CHOSEN,
        seed=summary["seed"],
        scale=summary["scale"],
        settings=_settings(summary["scale"]),
        seconds=", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
        minutes=sum(summary["seconds"].values()) / 60,
        seconds_note=f" {args.seconds_note}" if args.seconds_note else "",
        prompts=summary["prompts"],
        table=markdown_table(summary["rows"], summary["prompts"]).split("\n\n", 1)[1].strip(),
        accuracy=rows[CHOSEN]["accuracy"],
        teacher=rows[TEACHER]["accuracy"],
        ratio=rows[CHOSEN]["accuracy"] / max(rows[TEACHER]["accuracy"], 1e-9),
        ceiling=rows[CEILING]["accuracy"],
        checks=", ".join(f"{key} {rows[CHOSEN][key]:.3f}" for key in CHECKS),
    )
    (EMBEDDED_MODEL_DIR / "README.md").write_text(card)
    print(f"wrote {EMBEDDED_MODEL_DIR} from {args.workdir / 'distill_2rf' / 'model'}")
    passed = write_samples(pipe, SAMPLES)
    print(f"wrote {SAMPLES}: {passed} of 8 one-step images pass the checker")


if __name__ == "__main__":
    main()
