"""Write the embedded default's deterministic initial weights and tokenizer into the package.

Run from the repository root: `python scripts/make_embedded_default.py`. The training core later
replaces these weights with trained ones in the same format (`OneStepPipeline.save_pretrained`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from instaflow_edge.models import EMBEDDED_MODEL_DIR, LoadedModel
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.presets import TINY, build_modules
from instaflow_edge.tokenizer import build_tokenizer

SEED = 0
MODEL_CARD = """# Embedded default: tiny InstaFlow-architecture model

CLIP text encoder, UNet2DConditionModel (velocity prediction, called once at timestep 1000) and
AutoencoderKL, sized for 64x64 images of the synthetic captioned-shapes domain; tokenizer trained
by the project on that domain's captions (`instaflow_edge/tokenizer.py`).

These are **deterministic initial weights** (seed {seed}), made by `scripts/make_embedded_default.py`:
not trained yet. The training core replaces them with a distilled one-step model in the same format.
"""


def main() -> None:
    config = TINY["text_encoder"]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(
            Path(scratch) / "tokenizer", config["vocab_size"], config["max_position_embeddings"]
        )
        modules = build_modules("tiny", seed=SEED)
        model = LoadedModel(tokenizer=tokenizer, source="embedded:tiny", **modules)
        OneStepPipeline(model).save_pretrained(EMBEDDED_MODEL_DIR, overwrite=True)
    (EMBEDDED_MODEL_DIR / "README.md").write_text(MODEL_CARD.format(seed=SEED))
    print(f"wrote {EMBEDDED_MODEL_DIR}")


if __name__ == "__main__":
    main()
