"""The Runtime contract: load a bundle on a device, run one component, or generate end to end.

Imports only numpy, `tokenizers` and the standard library (never torch): edge boxes use this.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from instaflow_edge.components import ComponentSpec
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest, SamplingRecipe, verify_bundle

logger = logging.getLogger(__name__)


class RuntimeUnavailable(UserError):
    """This runtime cannot run here: not installed, wrong OS, or the device is absent."""


class Session(ABC):
    """A loaded bundle (or reference model) that runs components with numpy in and out.

    `executed_on` names what actually ran (e.g. "CPUExecutionProvider" after a CUDA request
    fell back), never just what was asked for.
    """

    runtime: str
    executed_on: str
    recipe: SamplingRecipe

    @abstractmethod
    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one component ("text_encoder", "unet", "vae_decoder") by its tensor names."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids (B, L) int64, padded/truncated to the model's length, as the reference does."""

    def component_io(
        self, input_ids: np.ndarray, noise: np.ndarray
    ) -> dict[str, dict[str, np.ndarray]]:
        """Every component's inputs and outputs for one one-step generation, as
        `OneStepPipeline.component_io` gives them, computed by this session."""
        input_ids = input_ids.astype(np.int64)
        noise = noise.astype(np.float32)
        states = self.run("text_encoder", {"input_ids": input_ids})["last_hidden_state"]
        unet_feeds = {
            "sample": noise,
            "timestep": np.full((noise.shape[0],), self.recipe.timestep, dtype=np.float32),
            "encoder_hidden_states": states,
        }
        velocity = self.run("unet", unet_feeds)["out_sample"].astype(np.float32)
        latent_sample = (noise + velocity) / np.float32(self.recipe.vae_scaling_factor)
        decoded = self.run("vae_decoder", {"latent_sample": latent_sample})["sample"]
        return {
            "text_encoder": {"input_ids": input_ids, "last_hidden_state": states},
            "unet": {**unet_feeds, "out_sample": velocity},
            "vae_decoder": {"latent_sample": latent_sample, "sample": decoded},
        }

    def prepare(self, component: str, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """A call that runs `component` on `feeds`, for timing; a runtime that binds inputs on
        its device overrides this so that the call excludes host copies."""
        return lambda: self.run(component, feeds)

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """The one-step recipe from components: uint8 NHWC images from token ids and noise."""
        return images_to_uint8(self.component_io(input_ids, noise)["vae_decoder"]["sample"])


class BundleSession(Session):
    """A session over an exported bundle: it tokenizes with the bundle's own `tokenizer.json`
    and, when the bundle holds a fused generator and it was asked for, generates in one call."""

    fused: bool = False

    def attach_bundle(self, bundle: Path, manifest: Manifest) -> None:
        """Keep the manifest, its sampling recipe and component specs; load the tokenizer."""
        self.manifest = manifest
        self.recipe = manifest.sampling
        self.specs: dict[str, ComponentSpec] = {
            name: entry.spec for name, entry in manifest.components.items()
        }
        length = int(manifest.components["text_encoder"].spec.inputs[0].shape[-1])
        self.tokenizer = load_bundle_tokenizer(bundle, length)

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        if not prompts or any(not prompt.strip() for prompt in prompts):
            raise UserError("empty prompt: describe the image to generate")
        encodings = self.tokenizer.encode_batch(prompts)
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:
                logger.warning(
                    "prompt longer than %d tokens: truncated: %r", len(encoding.ids), prompt
                )
        return np.array([encoding.ids for encoding in encodings], dtype=np.int64)

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """With a fused generator (and fused=True at load): one graph call; else three graphs."""
        if self.fused:
            return self.run("generator", {"input_ids": input_ids, "noise": noise})["image"]
        return super().generate(input_ids, noise)


class Runtime(ABC):
    """One runtime (ONNX Runtime, OpenVINO, Core ML, the PyTorch reference)."""

    name: str
    target: str  # the bundle target it runs

    @abstractmethod
    def load(self, bundle: Path, device: str = "cpu", **options) -> Session:
        """Verify the bundle's files against its manifest, then load it for `device`."""

    def verify(self, bundle: Path) -> Manifest:
        manifest = verify_bundle(bundle)
        if manifest.target != self.target:
            raise UserError(
                f"bundle {bundle} is for target {manifest.target!r}, not {self.target!r}"
            )
        return manifest


def images_to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output NCHW in [-1, 1] to uint8 NHWC, as `pipeline.to_uint8` does (round half to even)."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.round(images * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def load_bundle_tokenizer(bundle: Path, max_length: int):
    """The bundle's `tokenizer/tokenizer.json` with the reference's padding and truncation."""
    import json

    from tokenizers import Tokenizer

    folder = Path(bundle) / "tokenizer"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    pad_token = config.get("pad_token") or config.get("eos_token")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(
        length=max_length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token
    )
    return tokenizer
