"""The one-step recipe, written once: token ids and noise to an image through three components.

`latents = noise - out(noise, t=1000, text)`, where `out` is the UNet component's flow prediction
noise - data (diffusers' convention, the negative of InstaFlow's velocity; see
`diffusers_format`), then the VAE decodes `latents / scaling_factor`, then the image maps from
[-1, 1] to uint8 NHWC. The functions take numpy arrays or torch tensors alike
(they only use operators and methods both have), so the PyTorch pipeline, every runtime's session
and the fused generator graph all run this code. No torch import: edge runtimes use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# The UNet's timestep input is (1 - t) * 1000: pure noise (flow time t = 0) is timestep 1000,
# the one-step model's only operating point.
ONE_STEP_TIMESTEP = 1000.0
# what the UNet component outputs, in diffusers' words: out = noise - data (manifests record it)
PREDICTION = "flow_prediction"

Array = Any  # a numpy array or a torch tensor


def decoder_input(noise: Array, prediction: Array, scaling_factor: float) -> Array:
    """The VAE decoder's input after one Euler step over the whole flow, from sigma 1 to 0:
    (noise - prediction) / scaling, the prediction being noise - data."""
    return (noise - prediction) / scaling_factor


def require_finite(array: Array, what: str) -> Array:
    """`array` when every value is finite, else a NonFiniteError naming `what` (NaN pixels would
    otherwise be written as black ones). Eager only: the fused graph cannot raise."""
    from instaflow_edge.errors import NonFiniteError

    if not bool(((array - array) == 0).all()):  # x - x is 0 unless x is NaN or +-Inf
        raise NonFiniteError(f"{what} has NaN or Inf values: nothing was written")
    return array


def unit_interval(decoded: Array) -> Array:
    """The VAE decoder's output in [-1, 1] mapped to [0, 1], NCHW."""
    return (decoded / 2 + 0.5).clip(0, 1)


def to_uint8(decoded: Array) -> Array:
    """The VAE decoder's output (NCHW in [-1, 1]) to uint8 NHWC pixels, rounding half to even."""
    pixels = (unit_interval(decoded) * 255).round()
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.uint8).transpose(0, 2, 3, 1)
    import torch  # a tensor: the caller has torch

    return pixels.to(torch.uint8).permute(0, 2, 3, 1)


def one_step(
    encode: Callable[[Array], Array],
    predict: Callable[[Array, Array, Array], Array],
    decode: Callable[[Array], Array],
    input_ids: Array,
    noise: Array,
    timestep: Array,
    scaling_factor: float,
) -> dict[str, dict[str, Array]]:
    """Run the recipe through three callables; every component's inputs and outputs, by the
    tensor names of `components.COMPONENTS` (what parity compares and calibration records).

    encode(input_ids) -> text states; predict(sample, timestep, text states) -> noise - data;
    decode(latent_sample) -> image in [-1, 1]. `timestep` holds 1000 per sample.
    """
    states = encode(input_ids)
    prediction = predict(noise, timestep, states)
    latent_sample = decoder_input(noise, prediction, scaling_factor)
    decoded = decode(latent_sample)
    return {
        "text_encoder": {"input_ids": input_ids, "last_hidden_state": states},
        "unet": {
            "sample": noise,
            "timestep": timestep,
            "encoder_hidden_states": states,
            "out_sample": prediction,
        },
        "vae_decoder": {"latent_sample": latent_sample, "sample": decoded},
    }


def with_generator(io: dict[str, dict[str, Array]]) -> dict[str, dict[str, Array]]:
    """`one_step`'s tensors (as numpy) plus the fused generator's: token ids and noise in, the
    uint8 image out."""
    image = to_uint8(io["vae_decoder"]["sample"])
    generator = {"input_ids": io["text_encoder"]["input_ids"], "noise": io["unet"]["sample"]}
    return {**io, "generator": {**generator, "image": image}}
