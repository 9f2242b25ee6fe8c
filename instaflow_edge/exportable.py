"""Torch modules that exporters convert, one per `components.COMPONENTS` entry, with its spec's tensor names."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_edge.components import LAYOUTS, ComponentSpec
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.recipe import ONE_STEP_TIMESTEP, one_step, to_uint8


class TextEncoder(nn.Module):
    """input_ids (B, L) int64 -> last_hidden_state (B, L, D)."""

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.text_encoder = pipeline.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class Unet(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> out_sample: diffusers' flow prediction, noise -
    data, the negative of the model's velocity (`recipe.PREDICTION`; one Neg at the end)."""

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.unet = pipeline.unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return -self.unet(
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

    The same `recipe.one_step` and `recipe.to_uint8` as the pipeline and every runtime.
    """

    def __init__(self, pipeline: OneStepPipeline):
        super().__init__()
        self.text_encoder = TextEncoder(pipeline)
        self.unet = Unet(pipeline)
        self.vae_decoder = VaeDecoder(pipeline)
        self.scaling_factor = pipeline.scaling_factor

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        timestep = torch.full_like(noise[:, 0, 0, 0], ONE_STEP_TIMESTEP)
        io = one_step(
            self.text_encoder,
            self.unet,
            self.vae_decoder,
            input_ids,
            noise,
            timestep,
            self.scaling_factor,
        )
        return to_uint8(io["vae_decoder"]["sample"])


class GraphInputs(nn.Module):
    """A component module fed its inputs as a target's graph takes them (another arrangement,
    float token ids), turning each back into the contract's: `changes` holds, per input, the
    layout to undo and the dtype to cast to (None: as it comes)."""

    def __init__(self, module: nn.Module, changes: list[tuple[str | None, torch.dtype | None]]):
        super().__init__()
        self.module = module
        self.changes = changes

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        converted = []
        for value, (layout, dtype) in zip(inputs, self.changes, strict=True):
            value = LAYOUTS[layout].to_contract(value) if layout else value
            converted.append(value.to(dtype) if dtype is not None else value)
        return self.module(*converted)


def graph_module(module: nn.Module, spec: ComponentSpec, contract: ComponentSpec) -> nn.Module:
    """`module` itself where the graph takes the contract's inputs, else wrapped to take its own."""
    changes = [
        (graph.layout, getattr(torch, want.dtype) if graph.dtype != want.dtype else None)
        for graph, want in zip(spec.inputs, contract.inputs, strict=True)
    ]
    if all(change == (None, None) for change in changes):
        return module
    return GraphInputs(module, changes).eval()
