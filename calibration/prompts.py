"""Prompt sets: resolve a set name ("general", "synthetic") or a file to a list of prompts.

A file is text (one prompt per line), JSON Lines or CSV (a caption column; images too, where a
column names image files: Hugging Face's imagefolder `metadata.jsonl` is such a file)."""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaflow_edge.errors import UserError

PROMPTS_DIR = Path(__file__).parent / "prompts"
PROMPT_SETS = {
    "general": "diverse prompts written by the project for real (SD-1.5-class) models",
    "synthetic": "captions of the embedded model's synthetic shapes language",
}
SYNTHETIC_COUNT = 256
SYNTHETIC_SEED = 0
TABLE_SUFFIXES = (".jsonl", ".csv")  # files of records; any other file is one prompt per line
CAPTION_COLUMNS = ("caption", "prompt", "text")  # looked for in this order without --column
IMAGE_COLUMNS = ("file_name", "image")  # image files, relative to the records file's folder


@dataclass(frozen=True)
class Captions:
    """A file's captions, and the image file of each where the file has an image column."""

    captions: list[str]
    images: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, rows: slice) -> Captions:
        """The records `rows` (a slice), captions and image files alike."""
        images = self.images[rows] if self.images is not None else None
        return Captions(self.captions[rows], images)


def load_prompts(
    name_or_path: str | Path, limit: int | None = None, column: str | None = None
) -> list[str]:
    """The prompts of a named set or of a file (text: one per line, blank lines skipped; JSON
    Lines or CSV: the `column`, by default the first of CAPTION_COLUMNS the file has)."""
    return load_captions(name_or_path, limit, column).captions


def load_captions(
    name_or_path: str | Path, limit: int | None = None, column: str | None = None
) -> Captions:
    """`load_prompts`, with the image file of each caption where a records file names them."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    name = str(name_or_path)
    path = PROMPTS_DIR / f"{name}.txt" if name in PROMPT_SETS else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(PROMPT_SETS)
        raise UserError(f"prompts {name!r} is neither a prompt set ({known}) nor a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a BOM
    except UnicodeDecodeError as error:
        raise UserError(f"prompts file {path} is not UTF-8 text: {error}") from error
    if "\x00" in text:
        raise UserError(f"prompts file {path} is a binary file, not text (one prompt per line)")
    if path.suffix.lower() in TABLE_SUFFIXES:
        captions = _from_records(path, _records(path, text), column)
    elif column is not None:
        raise UserError(f"a caption column needs a .jsonl or .csv file, not {path}")
    else:
        captions = Captions([line.strip() for line in text.splitlines() if line.strip()])
    if not captions.captions:
        raise UserError(f"prompts file {path} has no prompts (one per line)")
    return captions[:limit]


def _records(path: Path, text: str) -> list[dict]:
    """The rows of a JSON Lines or CSV file, as dictionaries."""
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as error:
            raise UserError(f"prompts file {path} is not valid CSV: {error}") from error
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON: {error}") from error
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def _from_records(path: Path, rows: list[dict], column: str | None) -> Captions:
    if not rows:
        return Captions([])
    columns = list(rows[0])
    if column is None:
        column = next((name for name in CAPTION_COLUMNS if name in columns), None)
        if column is None:
            raise UserError(
                f"{path} has no caption column ({', '.join(CAPTION_COLUMNS)}); its columns are "
                f"{', '.join(map(str, columns))}: name one with --prompts-column"
            )
    image_column = next((name for name in IMAGE_COLUMNS if name in columns), None)
    captions, images = [], []
    for number, row in enumerate(rows, start=1):
        caption = row.get(column)
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"{path} row {number} has no {column!r} text")
        captions.append(caption.strip())
        if image_column is not None:
            image = row.get(image_column)
            if not isinstance(image, str) or not image:
                raise UserError(f"{path} row {number} has no {image_column!r} file name")
            images.append(path.parent / image)
    return Captions(captions, images if image_column is not None else None)


def model_prompt_set(pipeline: Any) -> str:
    """The prompt set a model is calibrated on by default: the synthetic language for the
    embedded default (the only one it was trained on), the general set for SD-class models."""
    return "synthetic" if pipeline.source.startswith("embedded:") else "general"


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
