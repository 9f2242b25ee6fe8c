"""The synthetic benchmark: captions, renderer, checker and Fréchet distance."""

from __future__ import annotations

import random

import numpy as np
import pytest

from instaflow_edge.synthetic.captions import (
    is_held_out,
    parse_caption,
    sample_caption,
    sample_split,
)
from instaflow_edge.synthetic.checker import check_image, prompt_accuracy
from instaflow_edge.synthetic.features import (
    _border_background,
    features,
    frechet_distance,
    train_feature_net,
)
from instaflow_edge.synthetic.render import RGB, render
from instaflow_edge.train.data import render_batch


def test_parse_caption_reads_relations_counts_and_backgrounds():
    scene = parse_caption("a red circle above a blue square on a gray background")
    assert scene.kind == "relation" and scene.relation == "above"
    assert scene.colours == ("red", "blue") and scene.shapes == ("circle", "square")
    assert scene.background == "gray"
    scene = parse_caption("three small green triangles")
    assert (scene.count, scene.size, scene.shapes, scene.background) == (
        3,
        "small",
        ("triangle",),
        None,
    )
    for text in ("a red dog", "a pink circle above a blue square", "hello"):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_every_sampled_caption_parses_and_the_split_is_disjoint():
    rng = random.Random(0)
    for _ in range(500):
        parse_caption(sample_caption(rng))
    train = {sample_split(rng, held_out=False)[0] for _ in range(300)}
    held = {sample_split(rng, held_out=True)[0] for _ in range(300)}
    assert not train & held
    assert all(is_held_out(caption) for caption in held)


def test_checker_accepts_rendered_images_and_rejects_wrong_ones():
    captions, images = render_batch(random.Random(1), 200, held_out=True)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8
    assert prompt_accuracy(images, captions)["accuracy"] >= 0.97
    shuffled = images[np.random.RandomState(0).permutation(len(images))]
    assert prompt_accuracy(shuffled, captions)["accuracy"] < 0.15
    noise = np.random.RandomState(0).randint(0, 256, images.shape, dtype=np.uint8)
    assert prompt_accuracy(noise, captions)["accuracy"] == 0.0


def test_checker_catches_a_swapped_relation_and_a_wrong_count():
    rng = random.Random(2)
    image = render(parse_caption("a red circle above a blue square"), rng)
    assert all(check_image(image, parse_caption("a red circle above a blue square")).values())
    assert not check_image(image, parse_caption("a red circle below a blue square"))["position"]
    two = render(parse_caption("two large yellow squares"), rng)
    assert not check_image(two, parse_caption("three large yellow squares"))["count"]


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift(tmp_path):
    net = train_feature_net(tmp_path / "f.safetensors", steps=3, batch_size=8)
    _, images = render_batch(random.Random(3), 64)
    a = features(net, images)
    assert a.shape == (64, 64)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) == pytest.approx(64.0, rel=1e-6)


def test_feature_labels_read_the_background_even_under_a_shape_in_the_corner():
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = RGB["gray"]
    image[:10, :10] = RGB["red"]  # a shape over the top-left corner
    assert _border_background(image) == "gray"
