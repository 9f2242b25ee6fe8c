"""Rectified-flow math shared by sampling and training: time grids, timesteps, interpolation, loss, straightness."""

from __future__ import annotations

import torch

from instaflow_edge.recipe import ONE_STEP_TIMESTEP


def unet_timestep(t: torch.Tensor | float) -> torch.Tensor | float:
    """Map flow time t in [0, 1] (0 = noise, 1 = data) to the UNet's timestep input."""
    return (1.0 - t) * ONE_STEP_TIMESTEP


def euler_times(num_steps: int) -> torch.Tensor:
    """The num_steps + 1 flow times of a uniform Euler grid from noise (0) to data (1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """X_t = t X1 + (1 - t) X0, with one t per sample (X0 noise, X1 data)."""
    t = t.view(-1, *([1] * (noise.ndim - 1)))
    return t * data + (1 - t) * noise


def rectified_flow_loss(
    velocity: torch.Tensor, noise: torch.Tensor, data: torch.Tensor
) -> torch.Tensor:
    """Mean of ||(X1 - X0) - v||^2 over elements: the rectified-flow (and reflow) objective."""
    return torch.nn.functional.mse_loss(velocity, data - noise)


# Losses a one-step student can be distilled with, on (Z0 + s(Z0), Z1) in latent space.
DISTILL_LOSSES = ("l2", "pseudo-huber")
# Pseudo-Huber width, in latent units (latents have unit std): students' errors are ~0.1-0.4 per
# element, so the loss is close to L1 there and quadratic only near zero.
PSEUDO_HUBER_C = 0.05


def distillation_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over elements of the squared error ("l2") or of sqrt(d^2 + c^2) - c ("pseudo-huber")."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(prediction, target)
    if kind == "pseudo-huber":
        squared = (prediction - target) ** 2
        return (torch.sqrt(squared + PSEUDO_HUBER_C**2) - PSEUDO_HUBER_C).mean()
    raise ValueError(
        f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_LOSSES)}"
    )


def straightness(trajectory: list[torch.Tensor], times: torch.Tensor) -> torch.Tensor:
    """S = E_t ||(Z1 - Z0) - v(Z_t, t)||^2 along an Euler path, per sample (mean over elements).

    `trajectory` holds the states Z_0 .. Z_N at `times` t_0 = 0 .. t_N = 1; the velocity used on
    step k is (Z_{k+1} - Z_k) / (t_{k+1} - t_k). A perfectly straight flow gives 0.
    """
    if len(trajectory) != len(times) or len(trajectory) < 2:
        raise ValueError(f"{len(trajectory)} states for {len(times)} times")
    chord = trajectory[-1] - trajectory[0]
    total = torch.zeros(chord.shape[0], dtype=torch.float64)
    for k in range(len(trajectory) - 1):
        v = (trajectory[k + 1] - trajectory[k]) / float(times[k + 1] - times[k])
        error = ((chord - v).double() ** 2).flatten(1).mean(1)
        total += error * float(times[k + 1] - times[k])  # E_t with t uniform: weight by step length
    return total
