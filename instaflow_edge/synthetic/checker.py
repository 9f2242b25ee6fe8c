"""Deterministic prompt checker: does a 64x64 image show what its caption asks for?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from instaflow_edge.synthetic.captions import Scene, parse_caption
from instaflow_edge.synthetic.render import RADIUS, RGB

# A pixel belongs to the nearest reference colour if it is within this RGB distance of it.
COLOUR_TOLERANCE = 90.0
MIN_AREA = 12  # connected regions smaller than this (in pixels) are edge noise, not objects
SIZE_SPLIT = RADIUS["small"] + RADIUS["large"]  # bounding-box side between small and large
# fill ratio (area / bounding-box area): square about 1, circle about 0.79, triangle about 0.5
SQUARE_FILL, TRIANGLE_FILL = 0.89, 0.65


@dataclass(frozen=True)
class Blob:
    """One connected region of a colour: its pixel area, bounding box and centre."""

    area: int
    width: int
    height: int
    cx: float
    cy: float

    @property
    def shape(self) -> str:
        fill = self.area / (self.width * self.height)
        if fill >= SQUARE_FILL:
            return "square"
        return "circle" if fill >= TRIANGLE_FILL else "triangle"

    @property
    def size(self) -> str:
        return "large" if max(self.width, self.height) >= SIZE_SPLIT else "small"


def colour_labels(image: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each pixel's nearest reference colour (index into the returned names), -1 if none is near."""
    names = list(RGB)
    palette = np.array([RGB[name] for name in names], dtype=np.float32)
    distance = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > COLOUR_TOLERANCE] = -1
    return labels, names


def blobs(mask: np.ndarray) -> list[Blob]:
    """4-connected regions of a boolean mask with at least MIN_AREA pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pixels) >= MIN_AREA:
            ys, xs = np.array(pixels).T
            found.append(
                Blob(
                    area=len(pixels),
                    width=int(xs.max() - xs.min() + 1),
                    height=int(ys.max() - ys.min() + 1),
                    cx=float(xs.mean()),
                    cy=float(ys.mean()),
                )
            )
    return found


def background_of(labels: np.ndarray, names: list[str]) -> str | None:
    """The most common reference colour on the image border."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    if border.size == 0:
        return None
    return names[int(np.bincount(border).argmax())]


def check_image(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Per-criterion verdicts for one HxWx3 uint8 image; the image matches if all are True."""
    labels, names = colour_labels(image)
    background = background_of(labels, names)
    verdicts = {}
    if scene.background is not None:
        verdicts["background"] = background == scene.background
    found = {
        colour: blobs(labels == names.index(colour))
        for colour in set(scene.colours)
        if colour != background
    }
    if scene.kind == "count":
        objects = found.get(scene.colours[0], [])
        verdicts["colour"] = bool(objects)
        verdicts["count"] = len(objects) == scene.count
        verdicts["shape"] = bool(objects) and all(b.shape == scene.shapes[0] for b in objects)
        verdicts["size"] = bool(objects) and all(b.size == scene.size for b in objects)
        return verdicts
    first, second = (found.get(colour, []) for colour in scene.colours)
    verdicts["colour"] = bool(first) and bool(second)
    verdicts["count"] = len(first) == 1 and len(second) == 1
    if not verdicts["count"]:
        verdicts["shape"] = verdicts["position"] = False
        return verdicts
    a, b = first[0], second[0]
    verdicts["shape"] = a.shape == scene.shapes[0] and b.shape == scene.shapes[1]
    verdicts["position"] = {
        "above": a.cy < b.cy,
        "below": a.cy > b.cy,
        "left of": a.cx < b.cx,
        "right of": a.cx > b.cx,
    }[scene.relation]
    return verdicts


def prompt_accuracy(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Share of images (NHWC uint8) that match their caption on every criterion ("accuracy"),
    and the share that pass each criterion, over the images the criterion applies to."""
    if len(images) != len(captions) or not len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    passed, totals, matched = {}, {}, 0
    for image, caption in zip(images, captions, strict=True):
        verdicts = check_image(image, parse_caption(caption))
        matched += all(verdicts.values())
        for name, ok in verdicts.items():
            passed[name] = passed.get(name, 0) + ok
            totals[name] = totals.get(name, 0) + 1
    scores = {"accuracy": matched / len(captions)}
    scores.update({name: passed[name] / totals[name] for name in sorted(totals)})
    return scores
