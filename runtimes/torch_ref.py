"""The PyTorch reference as a Runtime: the model a bundle was exported from, run by OneStepPipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from instaflow_edge.manifest import Manifest, SamplingRecipe
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.runtimes.base import Runtime, RuntimeOptions, RuntimeUnavailable, Session


class TorchSession(Session):
    runtime = "torch_ref"

    def __init__(
        self,
        pipeline: OneStepPipeline,
        options: RuntimeOptions | None = None,
        autocast: torch.dtype | None = None,
    ):
        self.pipeline = pipeline
        self.options = options or RuntimeOptions()
        self.autocast = autocast  # run under torch.autocast to this dtype (None: as loaded)
        self.executed_on = str(pipeline.device)
        self.recipe = SamplingRecipe(
            latent_shape=list(pipeline.latent_shape),
            vae_scaling_factor=pipeline.scaling_factor,
            image_size=pipeline.image_size,
        )

    def _autocast(self):
        device_type = "cuda" if self.executed_on.startswith("cuda") else "cpu"
        return torch.autocast(device_type, self.autocast, enabled=self.autocast is not None)

    @torch.no_grad()
    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One component, or "generator" (a fused bundle's graph: token ids + noise to uint8 NHWC)."""
        with self._autocast():
            return self._run(component, feeds)

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component == "generator":
            noise = np.asarray(feeds["noise"], dtype=np.float32)
            return {"image": self.generate(np.asarray(feeds["input_ids"]), noise)}
        pipe = self.pipeline
        tensors = {
            name: torch.from_numpy(np.asarray(value)).to(pipe.device)
            for name, value in feeds.items()
        }
        if component == "text_encoder":
            outputs = {"last_hidden_state": pipe.encode_prompt(tensors["input_ids"])}
        elif component == "unet":
            sample = tensors["sample"].to(pipe.dtype)
            states = tensors["encoder_hidden_states"].to(pipe.dtype)
            outputs = {
                "out_sample": pipe.flow_prediction(sample, tensors["timestep"].float(), states)
            }
        elif component == "vae_decoder":
            outputs = {"sample": pipe.vae.decode(tensors["latent_sample"].to(pipe.dtype)).sample}
        else:
            raise KeyError(f"unknown component {component!r}")
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        return self.pipeline.tokenize(prompts).numpy()

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with self._autocast():
            return self.pipeline(
                input_ids=torch.from_numpy(input_ids),
                noise=torch.from_numpy(noise),
                output_type="np",
            )


class TorchRuntime(Runtime):
    """The reference for a bundle: the source model its manifest names, run in PyTorch."""

    name = "torch_ref"
    target = "torch"

    def load(self, bundle: Path, device: str = "cpu", options=None, **settings) -> Session:
        """The source model of any bundle (whatever its target), verified first."""
        from instaflow_edge.manifest import verify_bundle

        manifest = verify_bundle(Path(bundle))
        return self.open(Path(bundle), manifest, device, self.options.from_mapping(settings))

    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: RuntimeOptions
    ) -> Session:
        return load_reference(manifest.source_model["id"], device)


def load_reference(model: str | None = None, device: str = "cpu") -> TorchSession:
    """The PyTorch reference session for a model (None: the embedded default)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUnavailable("CUDA was asked for the PyTorch reference but is not available")
    return TorchSession(OneStepPipeline.from_pretrained(model, device=device))


# What a PyTorch user would run instead of a bundle, timed beside the bundles by `bench`
PEERS = {
    "pytorch-bf16": "the reference under torch.autocast to bfloat16 (its weights shared)",
    "torch-compile": "the reference's UNet and VAE decoder compiled by torch.compile "
    "(inductor, default mode; its weights shared)",
}


def load_peer(name: str, reference: TorchSession) -> TorchSession:
    """The session of a PEERS entry, beside `reference` (the model's fp32 reference)."""
    if name == "pytorch-bf16":
        return TorchSession(reference.pipeline, autocast=torch.bfloat16)
    if name == "torch-compile":
        return TorchSession(compiled(reference.pipeline))
    raise KeyError(f"unknown peer {name!r}")


def compiled(pipeline: OneStepPipeline) -> OneStepPipeline:
    """A pipeline that runs `pipeline`'s UNet and VAE decoder compiled by torch.compile, over the
    same weights (a second copy of sd15 is 4 GiB more beside the reference): the modules are
    wrapped, not compiled in place, so `pipeline` itself stays eager."""
    peer = copy.copy(pipeline)
    peer.unet = torch.compile(pipeline.unet)
    peer.vae = copy.copy(pipeline.vae)  # its own table of submodules, the same parameters
    peer.vae._modules = {**pipeline.vae._modules, "decoder": torch.compile(pipeline.vae.decoder)}
    return peer
