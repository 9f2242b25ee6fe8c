"""Model sources: the embedded default, presets, local directories, and clear errors for bad ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instaflow_edge.errors import UserError
from instaflow_edge.models import EMBEDDED_MODEL_DIR, load_model
from instaflow_edge.presets import build_modules, count_parameters
from instaflow_edge.synthetic.checker import prompt_accuracy
from instaflow_edge.train.data import initial_pipeline
from instaflow_edge.train.evaluate import held_out_prompts

BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_embedded_default_is_small_and_safetensors_only():
    files = [p for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 16 * 2**20
    weights = [p.suffix for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt"}]
    assert weights and set(weights) == {".safetensors"}


def test_embedded_default_is_an_instaflow_architecture():
    model = load_model()
    assert model.source == "embedded:tiny"
    assert type(model.unet).__name__ == "UNet2DConditionModel"
    assert type(model.vae).__name__ == "AutoencoderKL"
    assert type(model.text_encoder).__name__ == "CLIPTextModel"
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size


def test_embedded_default_is_the_recipes_trained_one_step_model(pipeline):
    """The shipped weights are the synthetic recipe's (d): in one step they follow held-out prompts
    far better than the architecture's initial weights, and the model card says how they were made.
    (Measured on these 64 prompts: colour 0.75, count 0.44, background 1.0; initial weights 0.14,
    0.03, 0.36.)"""
    prompts = held_out_prompts(64, seed=0)
    ids, noise = pipeline.tokenize(prompts), pipeline.make_noise(range(64))
    trained = prompt_accuracy(pipeline(input_ids=ids, noise=noise, output_type="np"), prompts)
    initial = initial_pipeline(seed=0)
    untrained = prompt_accuracy(initial(input_ids=ids, noise=noise, output_type="np"), prompts)
    for criterion in ("colour", "count", "background"):
        assert trained[criterion] >= untrained[criterion] + 0.3, (criterion, trained, untrained)
    card = (EMBEDDED_MODEL_DIR / "README.md").read_text()
    results = json.loads((BENCH_RESULTS / "synthetic_full.json").read_text())
    shipped = next(row for row in results["rows"] if row["model"] == "(d) 2-RF distilled")
    assert "Model (d) 2-RF distilled of the synthetic recipe, seed 0" in card
    assert f"| (d) 2-RF distilled | 1 step | {shipped['accuracy']:.3f} |" in card


def test_sd15_preset_has_the_real_shapes_without_running():
    modules = build_modules("sd15", device="meta")
    unet = count_parameters(modules["unet"])
    assert 855e6 < unet < 865e6  # SD-1.5 / InstaFlow-0.9B UNet: 859.5 M
    assert 120e6 < count_parameters(modules["text_encoder"]) < 125e6  # CLIP ViT-L/14 text
    assert 80e6 < count_parameters(modules["vae"]) < 86e6
    assert modules["unet"].config.cross_attention_dim == 768
    assert modules["unet"].config.sample_size == 64  # 512x512 images
    assert modules["vae"].config.scaling_factor == 0.18215


def test_presets_are_deterministic():
    first = build_modules("tiny", seed=3)["unet"].state_dict()
    second = build_modules("tiny", seed=3)["unet"].state_dict()
    assert all((first[k] == second[k]).all() for k in first)


def test_unknown_model_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing"))


def test_directory_without_components_is_named(tmp_path):
    with pytest.raises(UserError, match="missing .*unet"):
        load_model(str(tmp_path))


def test_pickled_weights_are_never_loaded(tmp_path):
    model_dir = shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "model")
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserError, match="pickled weights are never loaded"):
        load_model(str(model_dir))


def test_corrupt_safetensors_names_the_file(tmp_path):
    model_dir = shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "model")
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt safetensors file .*vae"):
        load_model(str(model_dir))


def test_a_hub_model_in_the_local_cache_loads_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(EMBEDDED_MODEL_DIR, snapshot)
    (tmp_path / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "model_info", None)  # any network use fails the test
    loaded = load_model("someorg/tiny")
    assert loaded.source == "someorg/tiny"
    assert sum(p.numel() for p in loaded.unet.parameters()) > 0


def test_a_hub_model_that_cannot_be_fetched_fails_in_seconds(tmp_path, monkeypatch):
    import time

    import huggingface_hub

    def unreachable(model_id, timeout):
        assert timeout <= 10
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    started = time.monotonic()
    with pytest.raises(UserError, match="not in the local hub cache and could not be fetched"):
        load_model("someorg/missing")
    assert time.monotonic() - started < 10
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        load_model("someorg/missing")


def test_a_weights_file_missing_a_tensor_is_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_out.bias"]
    save_file(tensors, weights)
    with pytest.raises(UserError, match="1 missing tensor.*conv_out.bias"):
        load_model(str(model))


def test_the_embedded_default_is_a_stock_diffusers_model(pipeline):
    """Stock diffusers loads it and makes our image in one step (at sigma 1 - 1/2001, not 1: see
    diffusers_format), and runs it at the pipeline's defaults too (50 steps with guidance)."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from instaflow_edge.metrics import image_psnr

    stock = DiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    prompt = "a red circle above a blue square"
    out = stock(
        prompt,
        latents=pipeline.make_noise([0]),
        num_inference_steps=1,
        guidance_scale=0.0,
        output_type="np",
    )
    ours = pipeline(prompt, seed=0, output_type="np")
    assert image_psnr(ours, (out.images * 255).round().astype(np.uint8)) >= 60
    default = stock(prompt, output_type="np").images
    assert default.shape == out.images.shape and np.isfinite(default).all()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 25, 50, 100, 500, 1000])
def test_the_clients_scheduler_runs_one_step_at_t_1000_and_any_step_count(steps):
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from instaflow_edge.diffusers_format import SCHEDULER_CONFIG

    scheduler = DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps[0] == 1000 and len(scheduler.timesteps) == steps
    assert float(scheduler.sigmas[0]) > 0.9994 and float(scheduler.sigmas[-1]) == 0
    noise, data = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:  # a straight flow's exact velocity: every schedule ends at data
        sample = scheduler.step(noise - data, t, sample).prev_sample
    assert torch.allclose(
        sample, data + (noise - data) * (1 - float(scheduler.sigmas[0])), atol=1e-4
    )
