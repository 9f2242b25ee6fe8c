"""The caption language of the synthetic domain: its vocabulary and a seeded caption sampler."""

from __future__ import annotations

import random

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
