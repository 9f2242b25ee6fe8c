"""The caption language of the synthetic domain: its vocabulary and a seeded caption sampler."""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("above", "below", "left of", "right of")
BACKGROUNDS = ("black", "white", "gray")


def plural(shape: str) -> str:
    return shape + "s"


def sample_caption(rng: random.Random) -> str:
    """One caption such as "a red circle above a blue square" or "two small green triangles"."""
    kind = rng.choice(("single", "count", "relation"))
    if kind == "relation":
        first, second = rng.sample(COLOURS, 2)
        shape_a, shape_b = rng.choice(SHAPES), rng.choice(SHAPES)
        text = f"a {first} {shape_a} {rng.choice(RELATIONS)} a {second} {shape_b}"
    else:
        count = rng.choice(list(COUNTS)) if kind == "count" else 1
        size = rng.choice(SIZES)
        shape = SHAPES[rng.randrange(len(SHAPES))]
        noun = plural(shape) if count > 1 else shape
        text = f"{COUNTS[count]} {size} {rng.choice(COLOURS)} {noun}"
    if rng.random() < 0.3:
        text += f" on a {rng.choice(BACKGROUNDS)} background"
    return text


def vocabulary_corpus() -> list[str]:
    """Every word of the caption language, in sentences, for training the tokenizer."""
    rng = random.Random(0)
    words = [*COLOURS, *SHAPES, *map(plural, SHAPES), *SIZES, *COUNTS.values(), *BACKGROUNDS]
    words += [word for relation in RELATIONS for word in relation.split()] + ["on", "background"]
    return [" ".join(words)] + [sample_caption(rng) for _ in range(2000)]


# -- scenes: what a caption asks for, so the renderer can draw it and the checker can score it --
@dataclass(frozen=True)
class Scene:
    """The content of one caption: objects (colour, shape, size), count, relation, background."""

    kind: str  # "count" (one colour and shape, 1 to 3 of them) or "relation" (two objects)
    colours: tuple[str, ...]  # one colour for "count", (first, second) for "relation"
    shapes: tuple[str, ...]
    count: int = 1
    size: str | None = None  # "small" | "large" for "count"; None for "relation"
    relation: str | None = None  # one of RELATIONS, for "relation"
    background: str | None = None  # None: not specified


_BACKGROUND = r"(?: on a (?P<background>\w+) background)?"
_RELATION_RE = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+) (?P<rel>above|below|left of|right of) a (?P<c2>\w+) (?P<s2>\w+)"
    + _BACKGROUND
    + "$"
)
_COUNT_RE = re.compile(
    r"^(?P<count>a|two|three) (?P<size>\w+) (?P<colour>\w+) (?P<noun>\w+)" + _BACKGROUND + "$"
)
_COUNT_WORDS = {word: count for count, word in COUNTS.items()}


def parse_caption(text: str) -> Scene:
    """The scene a caption of the synthetic language describes; ValueError for anything else."""
    text = " ".join(text.lower().split())
    match = _RELATION_RE.match(text)
    if match:
        scene = Scene(
            kind="relation",
            colours=(match["c1"], match["c2"]),
            shapes=(match["s1"], match["s2"]),
            relation=match["rel"],
            background=match["background"],
        )
    elif match := _COUNT_RE.match(text):
        count = _COUNT_WORDS[match["count"]]
        noun = match["noun"]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        scene = Scene(
            kind="count",
            colours=(match["colour"],),
            shapes=(shape,),
            count=count,
            size=match["size"],
            background=match["background"],
        )
    else:
        raise ValueError(f"not a caption of the synthetic language: {text!r}")
    words_ok = (
        set(scene.colours) <= set(COLOURS)
        and set(scene.shapes) <= set(SHAPES)
        and scene.size in (None, *SIZES)
        and scene.background in (None, *BACKGROUNDS)
    )
    if not words_ok:
        raise ValueError(f"unknown word in caption {text!r}")
    return scene


def is_drawable(scene: Scene) -> bool:
    """False when an object would be invisible: its colour is the background's."""
    return scene.background not in scene.colours


def is_held_out(caption: str) -> bool:
    """The held-out prompt split: about one caption in ten, fixed by a hash of its text.

    Held-out captions never appear in training data; evaluation prompts come only from them.
    """
    return zlib.crc32(caption.encode()) % 10 == 0


def sample_split(rng: random.Random, held_out: bool) -> tuple[str, Scene]:
    """A drawable caption (and its scene) from the training split, or from the held-out split."""
    while True:
        caption = sample_caption(rng)
        scene = parse_caption(caption)
        if is_drawable(scene) and is_held_out(caption) == held_out:
            return caption, scene
