"""Rectified-flow math shared by sampling and training: time grids, timestep mapping, Euler steps."""

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
