"""OneStepPipeline: the PyTorch reference for a one-step rectified-flow text-to-image model."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instaflow_edge.atomic import atomic_directory
from instaflow_edge.components import ModelShapes
from instaflow_edge.diffusers_format import (
    flip_prediction,
    prefix_text_encoder_weights,
    write_pipeline_files,
)
from instaflow_edge.errors import UserError
from instaflow_edge.flow import euler_times, unet_timestep
from instaflow_edge.memory import return_freed_memory
from instaflow_edge.models import LoadedModel, load_model
from instaflow_edge.recipe import (
    ONE_STEP_TIMESTEP,
    one_step,
    require_finite,
    to_uint8,
    unit_interval,
)

logger = logging.getLogger(__name__)


class OneStepPipeline:
    """Text to image with one UNet call: latents = noise + v(noise, t=1000, text), then the VAE decodes.

    The noise is an input (seeds or a tensor), so every runtime can be fed exactly the same noise.
    `num_steps > 1` runs Euler sampling of the flow (with optional classifier-free guidance),
    as a 2-rectified-flow teacher needs.
    """

    def __init__(self, model: LoadedModel):
        self.tokenizer = model.tokenizer
        self.text_encoder = model.text_encoder
        self.unet = model.unet
        self.vae = model.vae
        self.source = model.source

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> OneStepPipeline:
        """Load the embedded default (None), a preset ("tiny", "sd15"), a directory or a hub id."""
        return cls(load_model(model)).to(device, dtype)

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write a diffusers model folder (safetensors only), atomically, that stock diffusers
        runs: `DiffusionPipeline.from_pretrained(directory)` with one step makes this pipeline's
        image. Its UNet speaks diffusers' flow prediction (`diffusers_format`); `from_pretrained`
        reads it back into this pipeline's velocity."""
        directory = Path(directory)
        with atomic_directory(directory, overwrite, "model_index.json") as staging:
            for name in ("text_encoder", "vae"):
                getattr(self, name).save_pretrained(staging / name, safe_serialization=True)
            prefix_text_encoder_weights(staging / "text_encoder")  # what every client reads
            flip_prediction(self.unet)
            try:
                self.unet.save_pretrained(staging / "unet", safe_serialization=True)
            finally:
                flip_prediction(self.unet)
            self.tokenizer.save_pretrained(staging / "tokenizer")
            # vocab.json + merges.txt too: the SD-1.5 layout, and what Core ML apps read
            self.tokenizer.backend_tokenizer.model.save(str(staging / "tokenizer"))
            write_pipeline_files(staging)
        return directory

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> OneStepPipeline:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for, but CUDA is not available here")
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
            if dtype is not None and dtype != module.dtype:
                module.to(dtype)
        return self

    def release_weights(self, modules: Sequence[str] = ("text_encoder", "unet", "vae")) -> None:
        """Free the weights of `modules` (by default all: they move to torch's meta device) for a
        caller done with them: configs, tokenizer and shapes stay readable, but the pipeline can
        no longer run."""
        for name in modules:
            getattr(self, name).to("meta")
        return_freed_memory()

    # -- shapes and recipe --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shapes(self) -> ModelShapes:
        channels, size, _ = self.latent_shape
        return ModelShapes(
            text_length=self.max_length,
            text_hidden=int(self.text_encoder.config.hidden_size),
            latent_channels=channels,
            latent_size=size,
            image_size=self.image_size,
        )

    # -- the stages ----------------------------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's max length; longer prompts are truncated with a warning."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompt given")
        for prompt in prompts:
            if not prompt.strip():
                raise UserError("empty prompt: describe the image to generate")
        return self._tokenize(prompts)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        full = self.tokenizer(prompts, truncation=False).input_ids
        for prompt, ids in zip(prompts, full, strict=True):
            if len(ids) > self.max_length:
                logger.warning(
                    "prompt is %d tokens, longer than the model's %d: truncated: %r",
                    len(ids),
                    self.max_length,
                    prompt,
                )
        encoded = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return encoded.input_ids

    @torch.no_grad()
    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text encoder: token ids (B, L) to hidden states (B, L, D)."""
        return self.text_encoder(input_ids.to(self.device))[0]

    def make_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One standard-normal latent per seed, drawn on the CPU so every device gets the same noise."""
        noise = [
            torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
            for seed in seeds
        ]
        return torch.stack(noise)

    @torch.no_grad()
    def velocity(
        self, latents: torch.Tensor, timestep: float | torch.Tensor, text_states: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's velocity prediction v(latents, timestep | text)."""
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=self.device)
        timestep = timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep
        return self.unet(latents, timestep, encoder_hidden_states=text_states).sample

    def flow_prediction(
        self, latents: torch.Tensor, timestep: float | torch.Tensor, text_states: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet component of a bundle outputs: diffusers' flow prediction, noise - data,
        the negative of the velocity (`recipe.PREDICTION`)."""
        return -self.velocity(latents, timestep, text_states)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoder on the flow's latents (divided by the scaling factor first): NCHW in [-1, 1]."""
        return self.vae.decode(latents / self.scaling_factor).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoder: latents to images in [0, 1], NCHW float."""
        return unit_interval(self.decode_latents(latents))

    def decode_to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """VAE decoder: latents to uint8 NHWC images, as every runtime makes them; NaN or Inf
        anywhere is a NonFiniteError, never a black image."""
        decoded = require_finite(self.decode_latents(latents), "the model's decoded image")
        return to_uint8(decoded).cpu().numpy()

    @torch.no_grad()
    def sample_latents(
        self,
        noise: torch.Tensor,
        text_states: torch.Tensor,
        num_steps: int = 1,
        guidance_scale: float = 0.0,
        uncond_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Euler integration of the flow from noise (t=0) to data (t=1); one step is noise + v(noise, 1000)."""
        use_guidance = guidance_scale > 1.0
        if use_guidance and uncond_states is None:
            uncond_states = self.encode_prompt(self._tokenize([""] * noise.shape[0]))
        latents = noise.to(self.device, self.dtype)
        times = euler_times(num_steps)
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            timestep = float(unet_timestep(t))  # 1000.0 at the first step: pure noise
            v = self.velocity(latents, timestep, text_states)
            if use_guidance:
                v_uncond = self.velocity(latents, timestep, uncond_states)
                v = v_uncond + guidance_scale * (v - v_uncond)
            latents = latents + float(t_next - t) * v
        return latents

    @torch.no_grad()
    def component_io(
        self, input_ids: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, dict[str, np.ndarray]]:
        """Every component's inputs and outputs, by the names of `components.component_specs`,
        for one one-step generation: what parity checks compare and calibration sets record."""
        noise = noise.to(self.device, self.dtype)
        timestep = torch.full((noise.shape[0],), ONE_STEP_TIMESTEP, device=self.device)
        tensors = one_step(
            self.encode_prompt,
            self.flow_prediction,
            lambda latent_sample: self.vae.decode(latent_sample).sample,
            input_ids,
            noise,
            timestep,
            self.scaling_factor,
        )
        return {
            component: {name: value.detach().cpu().numpy() for name, value in named.items()}
            for component, named in tensors.items()
        }

    def fingerprint(self) -> str:
        """sha256 over every weight (names, dtypes, shapes, bytes): identifies the source model."""
        digest = hashlib.sha256()
        for name in ("text_encoder", "unet", "vae"):
            for key, tensor in sorted(getattr(self, name).state_dict().items()):
                digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(
                    tensor.detach()
                    .cpu()
                    .contiguous()
                    .reshape(-1)
                    .view(torch.uint8)
                    .numpy()
                    .tobytes()
                )
        return digest.hexdigest()

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        seed: int = 0,
        num_steps: int = 1,
        guidance_scale: float = 0.0,
        output_type: str = "pil",
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Generate images. Give `prompt` or `input_ids`; `noise` (B, C, H, W) or seeds seed, seed+1, ...

        output_type: "pil" (list of images), "np" (uint8 NHWC array) or "pt" (float NCHW in [0, 1]).
        """
        if input_ids is None:
            if prompt is None:
                raise UserError("give a prompt or input_ids")
            input_ids = self.tokenize(prompt)
        batch = input_ids.shape[0]
        if noise is None:
            noise = self.make_noise(range(seed, seed + batch))
        if tuple(noise.shape) != (batch, *self.latent_shape):
            raise UserError(
                f"noise has shape {tuple(noise.shape)}, expected {(batch, *self.latent_shape)}"
            )
        text_states = self.encode_prompt(input_ids)
        latents = self.sample_latents(noise, text_states, num_steps, guidance_scale)
        if output_type == "pt":
            return self.decode(latents)
        array = self.decode_to_uint8(latents)
        if output_type == "np":
            return array
        if output_type == "pil":
            return [Image.fromarray(image) for image in array]
        raise ValueError(f"unknown output_type {output_type!r}")
