"""Prompt sets: resolve a set name ("general", "synthetic") or a text file to a list of prompts."""

from __future__ import annotations

import random
from pathlib import Path

from instaflow_edge.errors import UserError

PROMPTS_DIR = Path(__file__).parent / "prompts"
PROMPT_SETS = {
    "general": "diverse prompts written by the project for real (SD-1.5-class) models",
    "synthetic": "captions of the embedded model's synthetic shapes language",
}
SYNTHETIC_COUNT = 256
SYNTHETIC_SEED = 0


def load_prompts(name_or_path: str | Path, limit: int | None = None) -> list[str]:
    """The prompts of a named set or of a file (one prompt per line, blank lines skipped)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    name = str(name_or_path)
    path = PROMPTS_DIR / f"{name}.txt" if name in PROMPT_SETS else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(PROMPT_SETS)
        raise UserError(f"prompts {name!r} is neither a prompt set ({known}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"prompts file {path} is not UTF-8 text: {error}") from error
    if "\x00" in text:
        raise UserError(f"prompts file {path} is a binary file, not text (one prompt per line)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts (one per line)")
    return prompts[:limit]


def synthetic_prompts(count: int = SYNTHETIC_COUNT, seed: int = SYNTHETIC_SEED) -> list[str]:
    """`count` distinct captions from the synthetic language's sampler, fixed by `seed`."""
    from instaflow_edge.synthetic.captions import sample_caption

    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        prompts.setdefault(sample_caption(rng))
    return list(prompts)


def write_synthetic_prompts(path: Path = PROMPTS_DIR / "synthetic.txt") -> Path:
    """(Re)write the shipped `synthetic.txt` from the sampler; run this module to do so."""
    from instaflow_edge.atomic import atomic_file

    with atomic_file(Path(path)) as staging:
        staging.write_text("\n".join(synthetic_prompts()) + "\n", encoding="utf-8")
    return Path(path)


if __name__ == "__main__":
    print(f"wrote {write_synthetic_prompts()}")
