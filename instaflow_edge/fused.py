"""Torch modules that exporters convert: each component with its spec's tensor names, and the fused generator."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_edge.flow import ONE_STEP_TIMESTEP
from instaflow_edge.pipeline import OneStepPipeline


class TextEncoder(nn.Module):
    """input_ids (B, L) int64 -> last_hidden_state (B, L, D)."""

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.text_encoder = pipeline.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class Unet(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> out_sample: the velocity v."""

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.unet = pipeline.unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]


class VaeDecoder(nn.Module):
    """latent_sample (already divided by the scaling factor) -> sample, the image in [-1, 1]."""

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.vae = pipeline.vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class OneStepGenerator(nn.Module):
    """The whole one-step recipe as one feed-forward graph: (input_ids, noise) -> uint8 NHWC image.

    text = E(ids); v = U(noise, 1000, text); image = D((noise + v) / scaling) mapped to 0..255,
    rounded half to even like `pipeline.to_uint8` and `runtimes.base.images_to_uint8`.
    """

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.text_encoder = TextEncoder(pipeline)
        self.unet = Unet(pipeline)
        self.vae_decoder = VaeDecoder(pipeline)
        self.scaling_factor = pipeline.scaling_factor

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        text_states = self.text_encoder(input_ids)
        timestep = torch.full_like(noise[:, 0, 0, 0], ONE_STEP_TIMESTEP)
        velocity = self.unet(noise, timestep, text_states)
        decoded = self.vae_decoder((noise + velocity) / self.scaling_factor)
        images = (decoded / 2 + 0.5).clamp(0, 1)
        return torch.round(images * 255).to(torch.uint8).permute(0, 2, 3, 1)


def component_modules(pipeline: OneStepPipeline, fused: bool = False) -> dict[str, nn.Module]:
    """The modules to export by component name (the names of `components.component_specs`)."""
    modules: dict[str, nn.Module] = {
        "text_encoder": TextEncoder(pipeline),
        "unet": Unet(pipeline),
        "vae_decoder": VaeDecoder(pipeline),
    }
    if fused:
        modules["generator"] = OneStepGenerator(pipeline)
    return {name: module.eval() for name, module in modules.items()}
