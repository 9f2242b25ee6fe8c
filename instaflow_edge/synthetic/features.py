"""Fréchet Shape Distance: Fréchet distance on pooled features of a CNN trained on rendered scenes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from instaflow_edge.atomic import atomic_file
from instaflow_edge.synthetic.captions import BACKGROUNDS, COLOURS, SHAPES, sample_split
from instaflow_edge.synthetic.render import RGB, render

FEATURES = 64
# labels: which (colour, shape) pairs are present (multi-label), and the background colour
PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]


class ShapeFeatures(nn.Module):
    """Four strided convolutions and a global average pool: 64x64 RGB to a 64-d feature."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 64, FEATURES):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width)]
            layers += [nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURES, len(PAIRS) + len(BACKGROUNDS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of NCHW float images in [0, 1]."""
        return self.body(images * 2 - 1)


def to_float(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 to NCHW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _labelled_batch(
    rng: random.Random, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, present, backgrounds = [], torch.zeros(size, len(PAIRS)), []
    for index in range(size):
        _, scene = sample_split(rng, held_out=False)
        image = render(scene, rng)
        images.append(image)
        for colour, shape in zip(scene.colours, scene.shapes, strict=True):
            present[index, PAIRS.index((colour, shape))] = 1
        backgrounds.append(BACKGROUNDS.index(_border_background(image)))
    return to_float(np.stack(images)), present, torch.tensor(backgrounds)


def _border_background(image: np.ndarray) -> str:
    """The commonest background colour on the image's border (a shape may cover a corner)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    counts = {name: int((border == RGB[name]).all(-1).sum()) for name in BACKGROUNDS}
    name = max(counts, key=counts.__getitem__)
    if not counts[name]:
        raise ValueError("no background colour on the image border")
    return name


def train_feature_net(
    path: Path, steps: int = 400, batch_size: int = 64, seed: int = 0
) -> ShapeFeatures:
    """Train the feature network on rendered training-split scenes and save it (safetensors)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = ShapeFeatures()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc="feature net", unit="step"):
        images, present, background = _labelled_batch(rng, batch_size)
        logits = net.head(net(images))
        loss = nn.functional.binary_cross_entropy_with_logits(logits[:, : len(PAIRS)], present)
        loss = loss + nn.functional.cross_entropy(logits[:, len(PAIRS) :], background)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with atomic_file(path) as staging:
        save_file(net.state_dict(), str(staging))
    return net


def load_feature_net(path: Path) -> ShapeFeatures:
    net = ShapeFeatures()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def features(net: ShapeFeatures, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, 64) float64 features of NHWC uint8 images."""
    chunks = [net(to_float(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two (N, D) feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric, PSD)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
