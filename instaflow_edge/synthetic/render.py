"""Procedural 64x64 renderer: draws the coloured shapes, counts, sizes and positions a caption asks for."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from instaflow_edge.synthetic.captions import BACKGROUNDS, Scene

IMAGE_SIZE = 64
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# Half the side of an object's bounding box, in pixels.
RADIUS = {"small": 6, "large": 11}
RELATION_RADIUS = (7, 10)
GAP = 3  # pixels kept free between objects


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place_apart(rng: random.Random, radius: int, count: int) -> list[tuple[int, int]]:
    """`count` centres whose boxes do not touch (rejection sampling; the sizes always fit)."""
    while True:
        centres = [
            (rng.randint(radius, IMAGE_SIZE - radius), rng.randint(radius, IMAGE_SIZE - radius))
            for _ in range(count)
        ]
        apart = all(
            max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 * radius + GAP
            for i, a in enumerate(centres)
            for b in centres[i + 1 :]
        )
        if apart:
            return centres


def _place_related(rng: random.Random, relation: str, r1: int, r2: int) -> list[tuple[int, int]]:
    """Centres of the first and second object so that "first RELATION second" holds clearly."""
    half = IMAGE_SIZE // 2
    # along the relation's axis the first object sits in one half and the second in the other
    near = rng.randint(r1, half - GAP), rng.randint(half + GAP, IMAGE_SIZE - r2)
    across = rng.randint(r1 + 4, IMAGE_SIZE - r1 - 4)
    across2 = min(max(across + rng.randint(-8, 8), r2), IMAGE_SIZE - r2)
    first_low = relation in ("below", "right of")
    a_axis, b_axis = (near[1], near[0]) if first_low else near
    if first_low:  # the first object is in the high half, so shift it by its own radius
        a_axis = min(max(a_axis, half + GAP + r1 - r2), IMAGE_SIZE - r1)
        b_axis = max(min(b_axis, half - GAP - r2 + r1), r2)
    else:
        a_axis = max(min(a_axis, half - GAP), r1)
        b_axis = min(max(b_axis, half + GAP), IMAGE_SIZE - r2)
    if relation in ("above", "below"):
        return [(across, a_axis), (across2, b_axis)]
    return [(a_axis, across), (b_axis, across2)]


def render(scene: Scene, rng: random.Random) -> np.ndarray:
    """A 64x64 RGB uint8 image of the scene; layout, sizes of related objects and an unspecified
    background come from `rng`."""
    background = scene.background or rng.choice(
        [name for name in BACKGROUNDS if name not in scene.colours]
    )
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), RGB[background])
    draw = ImageDraw.Draw(image)
    if scene.kind == "count":
        radius = RADIUS[scene.size]
        for cx, cy in _place_apart(rng, radius, scene.count):
            draw_shape(draw, scene.shapes[0], cx, cy, radius, RGB[scene.colours[0]])
    else:
        radii = [rng.randint(*RELATION_RADIUS) for _ in range(2)]
        centres = _place_related(rng, scene.relation, *radii)
        for shape, colour, (cx, cy), radius in zip(
            scene.shapes, scene.colours, centres, radii, strict=True
        ):
            draw_shape(draw, shape, cx, cy, radius, RGB[colour])
    return np.asarray(image)
