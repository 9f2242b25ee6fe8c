"""Our models and bundles in diffusers' format, so that the ecosystem's own clients run them.

InstaFlow's UNet predicts the velocity v = data - noise (flow time 0 is noise, 1 is data), and
the training core works in that convention. Every stock flow scheduler (diffusers', and so
optimum's and optimum-intel's pipelines; Apple's too) expects the opposite sign, out = noise -
data, and steps x + (sigma_next - sigma) * out. So everything we write for others speaks theirs:

- an exported UNet graph outputs noise - data; its manifest says `sampling.prediction:
  "flow_prediction"`, and the recipe (`recipe.decoder_input`) steps noise - out;
- a saved model folder holds a UNet whose last layer (`conv_out`) is negated, which negates its
  output exactly, beside `scheduler/` holding the scheduler below. Loading a folder whose
  scheduler says flow prediction negates that layer back; any other folder (InstaFlow's own
  checkpoints) is read in InstaFlow's convention.

Bundles for optimum's clients also get `model_index.json`, the scheduler, and each component's
`config.json` (clients read e.g. the VAE's `scaling_factor` from it, and silently use 4 if absent).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from instaflow_edge.recipe import PREDICTION

SCHEDULER_FOLDER = "scheduler"
# One step from pure noise to the image that feeds the UNet timestep exactly 1000, in diffusers,
# optimum-onnx and optimum-intel alike, and more steps that still run: with flow sigmas and 1001
# training steps, a shift of 2 maps the first sigma to 1 - 1/2001 (timestep 1000 after truncation;
# 1000 training steps give 999) and keeps the second timestep below 1000 up to 1000 steps. A
# larger shift gives a sigma nearer 1 but the same first timestep twice, and DPM-Solver then
# starts at its second index and raises IndexError at any step count but one (the clients'
# default is 50). The one step's sigma, 0.9995 and not 1, leaves (noise - data) / 2001 in the
# latents. FlowMatchEuler would be the natural choice but has no `init_noise_sigma`, which the
# Stable Diffusion pipelines read.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1001,
    "use_flow_sigmas": True,
    "flow_shift": 2.0,
    "prediction_type": PREDICTION,
    "final_sigmas_type": "zero",
    "steps_offset": 1,
}
# the pipeline class the clients look up by name, and the libraries' classes of the components
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_pipeline_files(folder: Path) -> list[str]:
    """`model_index.json` and the one-step scheduler into `folder`; their relative paths."""
    folder = Path(folder)
    stamp = {"_diffusers_version": version("diffusers")}
    _write_json(folder / "model_index.json", {**MODEL_INDEX, **stamp})
    scheduler = f"{SCHEDULER_FOLDER}/scheduler_config.json"
    _write_json(folder / scheduler, {**SCHEDULER_CONFIG, **stamp})
    return ["model_index.json", scheduler]


def write_component_configs(folder: Path, pipeline: Any, layout: dict[str, str]) -> list[str]:
    """Each component's library config as `config.json` beside its graph (`layout`: component ->
    file); their relative paths."""
    configs = {
        "text_encoder": pipeline.text_encoder.config.to_dict(),
        "unet": dict(pipeline.unet.config),
        "vae_decoder": dict(pipeline.vae.config),
    }
    written = []
    for component, config in configs.items():
        relative = (Path(layout[component]).parent / "config.json").as_posix()
        config.pop("_name_or_path", None)  # where this machine loaded it from: not the bundle's
        _write_json(Path(folder) / relative, config)
        written.append(relative)
    return written


def write_client_files(folder: Path, pipeline: Any, layout: dict[str, str]) -> list[str]:
    """Everything optimum's and optimum-intel's pipelines read from a bundle besides its graphs
    and tokenizer: the index, the scheduler, each component's config; their relative paths."""
    return write_pipeline_files(folder) + write_component_configs(folder, pipeline, layout)


def speaks_flow_prediction(model_folder: Path) -> bool:
    """Whether a model folder's scheduler says its UNet predicts noise - data (ours, saved)."""
    path = Path(model_folder) / SCHEDULER_FOLDER / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("prediction_type") == PREDICTION


TEXT_MODEL_PREFIX = "text_model."


def prefix_text_encoder_weights(folder: Path) -> None:
    """Give a saved CLIPTextModel's weights the `text_model.` prefix of every SD-1.5 checkpoint,
    in place (safetensors files and their index). transformers 5.24 saves them without it and
    reads either; transformers 4.57 and 5.5 (optimum-onnx's and optimum-intel's venvs) read only
    the prefixed names and would leave the whole encoder randomly initialized, silently."""
    from safetensors.torch import load_file, save_file

    def prefixed(name: str) -> str:
        return name if name.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + name

    for path in sorted(Path(folder).glob("*.safetensors")):
        weights = load_file(path)
        save_file({prefixed(name): w for name, w in weights.items()}, path, {"format": "pt"})
    for index in Path(folder).glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {prefixed(k): v for k, v in data["weight_map"].items()}
        _write_json(index, data)


def flip_prediction(unet: Any) -> None:
    """Negate the UNet's output exactly by negating its last convolution, in place: InstaFlow's
    velocity to diffusers' flow prediction, or back."""
    for parameter in (unet.conv_out.weight, unet.conv_out.bias):
        parameter.data.neg_()
