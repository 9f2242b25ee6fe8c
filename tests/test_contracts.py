"""The shared contracts: the PyTorch reference Runtime, bundle tokenization, calibration sets."""

from __future__ import annotations

import numpy as np
import pytest

from instaflow_edge.calibration import load_calibration
from instaflow_edge.calibration.builder import build_calibration
from instaflow_edge.components import component_specs
from instaflow_edge.errors import UserError
from instaflow_edge.models import EMBEDDED_MODEL_DIR
from instaflow_edge.runtimes import get_runtime
from instaflow_edge.runtimes.base import Session, load_bundle_tokenizer
from instaflow_edge.runtimes.torch_ref import TorchSession

PROMPTS = ["a red circle above a blue square", "two small green triangles", "a white square"]


@pytest.fixture(scope="module")
def reference(pipeline):
    return TorchSession(pipeline)


def test_generate_from_components_matches_the_pipeline(reference, pipeline):
    ids = reference.tokenize(PROMPTS[:2])
    noise = pipeline.make_noise([0, 1]).numpy()
    from_components = Session.generate(reference, ids, noise)  # the contract's composition
    from_pipeline = reference.generate(ids, noise)
    assert from_pipeline.dtype == np.uint8 and from_pipeline.shape == (2, 64, 64, 3)
    assert np.abs(from_components.astype(int) - from_pipeline).max() <= 1


def test_component_io_is_what_each_component_computes(reference, pipeline):
    io = pipeline.component_io(pipeline.tokenize(PROMPTS[:1]), pipeline.make_noise([0]))
    specs = component_specs(pipeline.shapes)
    assert set(io) == set(specs)
    for component, tensors in io.items():
        output = specs[component].outputs[0].name
        feeds = {k: v for k, v in tensors.items() if k != output}
        np.testing.assert_allclose(
            reference.run(component, feeds)[output], tensors[output], atol=1e-5
        )
    assert (io["unet"]["timestep"] == 1000.0).all()


def test_bundle_tokenizer_without_transformers_matches_the_reference(reference):
    tokenizer = load_bundle_tokenizer(EMBEDDED_MODEL_DIR, max_length=32)
    long_prompt = " ".join(["red circle"] * 30)
    for prompt in [*PROMPTS, long_prompt]:
        np.testing.assert_array_equal(tokenizer.encode(prompt).ids, reference.tokenize([prompt])[0])


def test_unknown_runtime_is_a_user_error():
    with pytest.raises(UserError, match="no runtime named"):
        get_runtime("tensorflow-lite")


def test_calibration_set_records_every_component_at_t1000(pipeline, tmp_path):
    out = build_calibration(pipeline, PROMPTS, tmp_path / "set", seed=5, shard_size=2, batch_size=2)
    calibration = load_calibration(out)
    assert len(calibration) == 3 and calibration.seeds == [5, 6, 7]
    assert len(calibration.shards) == 2
    unet = list(calibration.inputs("unet", ["sample", "timestep", "encoder_hidden_states"]))
    assert len(unet) == 3 and all((feed["timestep"] == 1000.0).all() for feed in unet)
    np.testing.assert_array_equal(unet[1]["sample"], pipeline.make_noise([6]).numpy())


def test_calibration_set_is_refused_when_incomplete(pipeline, tmp_path):
    out = build_calibration(pipeline, PROMPTS[:1], tmp_path / "set")
    (out / "shard-00000.safetensors").unlink()
    with pytest.raises(UserError, match="missing shard-00000"):
        load_calibration(out)
    with pytest.raises(UserError, match="not a calibration set"):
        load_calibration(tmp_path)
