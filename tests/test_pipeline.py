"""OneStepPipeline: the one-step recipe, noise as an input, Euler sampling, tokenization, saving."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import safetensors
import torch

from instaflow_edge.errors import UserError
from instaflow_edge.pipeline import OneStepPipeline


def test_one_step_equals_hand_written_reference(pipeline):
    input_ids = pipeline.tokenize(["a red circle above a blue square", "two small green triangles"])
    noise = pipeline.make_noise([3, 4])
    with torch.no_grad():
        text = pipeline.text_encoder(input_ids)[0]
        velocity = pipeline.unet(noise, torch.tensor([1000.0, 1000.0]), text).sample
        latents = noise + velocity
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
        expected = (decoded / 2 + 0.5).clamp(0, 1)
    images = pipeline(input_ids=input_ids, noise=noise, output_type="pt")
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-6)


def test_output_types_agree(pipeline):
    ids = pipeline.tokenize("a red circle")
    as_float = pipeline(input_ids=ids, seed=1, output_type="pt")
    as_uint8 = pipeline(input_ids=ids, seed=1, output_type="np")
    as_pil = pipeline(input_ids=ids, seed=1)
    assert as_uint8.shape == (1, 64, 64, 3) and as_uint8.dtype == np.uint8
    expected = (as_float * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(as_uint8, expected)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), as_uint8[0])


def test_noise_per_seed_does_not_depend_on_batching(pipeline):
    together = pipeline.make_noise([5, 6, 7])
    alone = pipeline.make_noise([6])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])


def test_given_noise_is_used_and_checked(pipeline):
    ids = pipeline.tokenize("a red circle")
    zeros = pipeline(input_ids=ids, noise=torch.zeros(1, 4, 16, 16), output_type="pt")
    seeded = pipeline(input_ids=ids, seed=0, output_type="pt")
    assert not torch.equal(zeros, seeded)
    with pytest.raises(UserError, match="noise has shape"):
        pipeline(input_ids=ids, noise=torch.zeros(1, 4, 8, 8))


def test_euler_sampling_one_step_is_the_one_step_model(pipeline):
    text = pipeline.encode_prompt(pipeline.tokenize("a blue square"))
    noise = pipeline.make_noise([0])
    one = pipeline.sample_latents(noise, text, num_steps=1)
    torch.testing.assert_close(one, noise + pipeline.velocity(noise, 1000.0, text))


def test_euler_sampling_many_steps_follows_the_flow(pipeline):
    text = pipeline.encode_prompt(pipeline.tokenize("a blue square"))
    noise = pipeline.make_noise([0])
    x = noise.clone()
    for t in (0.0, 0.5):  # two Euler steps by hand: timesteps 1000 then 500
        x = x + 0.5 * pipeline.velocity(x, (1 - t) * 1000.0, text)
    torch.testing.assert_close(pipeline.sample_latents(noise, text, num_steps=2), x)


def test_classifier_free_guidance_mixes_conditional_and_unconditional(pipeline):
    text = pipeline.encode_prompt(pipeline.tokenize("a blue square"))
    uncond = pipeline.encode_prompt(pipeline._tokenize([""]))
    noise = pipeline.make_noise([0])
    v_c = pipeline.velocity(noise, 1000.0, text)
    v_u = pipeline.velocity(noise, 1000.0, uncond)
    guided = pipeline.sample_latents(noise, text, num_steps=1, guidance_scale=3.0)
    torch.testing.assert_close(guided, noise + v_u + 3.0 * (v_c - v_u))


def test_long_prompt_is_truncated_with_a_warning(pipeline, caplog):
    long_prompt = " ".join(["red circle"] * 40)
    with caplog.at_level(logging.WARNING, logger="instaflow_edge"):
        ids = pipeline.tokenize(long_prompt)
    assert ids.shape == (1, pipeline.max_length)
    assert "truncated" in caplog.text


def test_short_prompt_is_padded_without_warning(pipeline, caplog):
    with caplog.at_level(logging.WARNING, logger="instaflow_edge"):
        ids = pipeline.tokenize("a red circle")
    assert ids.shape == (1, pipeline.max_length)
    assert caplog.text == ""


@pytest.mark.parametrize("prompts", ["", "   ", ["a red circle", ""], []])
def test_empty_prompt_is_refused(pipeline, prompts):
    with pytest.raises(UserError, match="prompt"):
        pipeline.tokenize(prompts)


def test_save_and_reload_gives_the_same_images(pipeline, tmp_path):
    saved = pipeline.save_pretrained(tmp_path / "model")
    assert (saved / "model_index.json").is_file()
    assert sorted(p.name for p in (saved / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    # the names every SD-1.5 checkpoint uses, which the clients' older transformers need
    weights = safetensors.safe_open(saved / "text_encoder" / "model.safetensors", "pt")
    assert all(name.startswith("text_model.") for name in weights.keys())
    reloaded = OneStepPipeline.from_pretrained(saved)
    ids = pipeline.tokenize("a red circle")
    torch.testing.assert_close(
        reloaded(input_ids=ids, output_type="pt"), pipeline(input_ids=ids, output_type="pt")
    )


def test_save_refuses_to_overwrite(pipeline, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        pipeline.save_pretrained(tmp_path / "model")
    with pytest.raises(UserError, match="has no model_index.json"):  # not ours: never replaced
        pipeline.save_pretrained(tmp_path / "model", overwrite=True)
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["notes.txt"]
