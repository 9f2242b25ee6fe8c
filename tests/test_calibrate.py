"""Prompt sets and the calibrate command."""

from __future__ import annotations

import pytest

from instaflow_edge.calibration import load_calibration
from instaflow_edge.calibration.prompts import (
    PROMPT_SETS,
    SYNTHETIC_COUNT,
    load_prompts,
    synthetic_prompts,
)
from instaflow_edge.errors import UserError
from instaflow_edge.synthetic.captions import parse_caption
from tests.conftest import assert_one_line_error, run_cli


def test_shipped_sets_are_large_distinct_and_clean():
    for name in PROMPT_SETS:
        prompts = load_prompts(name)
        assert len(prompts) >= 256, name
        assert len(set(prompts)) == len(prompts), name
        assert all(prompt == prompt.strip() and prompt for prompt in prompts), name


def test_synthetic_set_is_the_seeded_sampler_output():
    prompts = load_prompts("synthetic")
    assert prompts == synthetic_prompts() and len(prompts) == SYNTHETIC_COUNT
    for prompt in prompts:
        parse_caption(prompt)  # every line is a caption of the synthetic language


def test_general_set_is_diverse():
    prompts = load_prompts("general")
    words = {word for prompt in prompts for word in prompt.lower().replace(",", " ").split()}
    assert len(words) > 1000
    assert all(len(prompt.split()) <= 20 for prompt in prompts)  # fits CLIP's 77 tokens


def test_a_file_and_a_limit(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert load_prompts(path) == ["first prompt", "second prompt", "third"]
    assert load_prompts(str(path), limit=2) == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "neither a prompt set"), ("\n \n", "no prompts"), (b"\xff\xfe", "not UTF-8")],
)
def test_bad_prompts_are_user_errors(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_prompts(path)


@pytest.mark.slow
def test_calibrate_command_writes_a_set_quantizers_read(tmp_path):
    out = tmp_path / "set"
    args = ["calibrate", "--prompts", "synthetic", "--limit", "3", "--seed", "7", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "wrote calibration set" in result.stderr and "3 prompts" in result.stderr
    calibration = load_calibration(out)
    assert calibration.prompts == load_prompts("synthetic", limit=3)
    assert calibration.seeds == [7, 8, 9] and calibration.source_model == "embedded:tiny"
    names = ["sample", "timestep", "encoder_hidden_states"]
    assert all((feed["timestep"] == 1000.0).all() for feed in calibration.inputs("unet", names))
    assert_one_line_error(run_cli(*args), "already exists")
    assert_one_line_error(run_cli(*args[:-1], str(tmp_path / "x"), "--limit", "0"), "--limit")


def test_a_set_records_each_sample_as_the_reference_computes_it_alone(pipeline, tmp_path):
    """A set recorded in batches holds, per sample, exactly the tensors a batch-1 run gives (the
    VAE decoder's batched output is channels-last in memory, once written transposed)."""
    from instaflow_edge.calibration.builder import build_calibration
    from instaflow_edge.metrics import tensor_metrics

    prompts = load_prompts("synthetic", limit=3)
    calibration = load_calibration(build_calibration(pipeline, prompts, tmp_path / "set"))
    for index, prompt in enumerate(prompts):
        alone = pipeline.component_io(pipeline.tokenize([prompt]), pipeline.make_noise([index]))
        for component, tensors in alone.items():
            recorded = list(calibration.samples(component))[index]
            for name, value in tensors.items():
                assert tensor_metrics(value, recorded[name])["psnr_db"] > 100, (component, name)
