"""Rectified-flow math shared by sampling and training: time grids, timesteps, interpolation, loss, straightness."""

from __future__ import annotations

import torch

# The UNet's timestep input is (1 - t) * 1000: pure noise (t = 0) is timestep 1000,
# the one-step model's only operating point.
ONE_STEP_TIMESTEP = 1000.0


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
