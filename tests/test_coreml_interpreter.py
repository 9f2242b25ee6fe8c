"""The MIL reference interpreter against PyTorch, op by op, on small saved mlprograms."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402

from instaflow_edge.metrics import tensor_metrics  # noqa: E402
from instaflow_edge.runtimes.mil_interpreter import UnsupportedOp, load_program  # noqa: E402

SHAPE = (1, 4, 8, 8)
RNG = np.random.default_rng(0)
X = RNG.standard_normal(SHAPE).astype(np.float32)
W_CONV = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
W_LIN = RNG.standard_normal((5, 8)).astype(np.float32)
B_LIN = RNG.standard_normal(5).astype(np.float32)
BN_MEAN, BN_VAR = RNG.standard_normal(4).astype(np.float32), RNG.random(4).astype(np.float32) + 0.5
BN_GAMMA, BN_BETA = (
    RNG.standard_normal(4).astype(np.float32),
    RNG.standard_normal(4).astype(np.float32),
)
IDS = np.array([[3, 1, 0, 2]], dtype=np.int32)
T = torch.from_numpy(X)

# op -> (MIL builder on input x, the same computation in PyTorch)
CASES = {
    "add": (lambda x: mb.add(x=x, y=1.5), lambda t: t + 1.5),
    "sub": (lambda x: mb.sub(x=x, y=0.5), lambda t: t - 0.5),
    "mul": (lambda x: mb.mul(x=x, y=x), lambda t: t * t),
    "real_div": (lambda x: mb.real_div(x=x, y=3.0), lambda t: t / 3.0),
    "square": (lambda x: mb.square(x=x), torch.square),
    "sqrt": (lambda x: mb.sqrt(x=mb.square(x=x)), lambda t: t.square().sqrt()),
    "sin": (lambda x: mb.sin(x=x), torch.sin),
    "cos": (lambda x: mb.cos(x=x), torch.cos),
    "exp": (lambda x: mb.exp(x=x), torch.exp),
    "tanh": (lambda x: mb.tanh(x=x), torch.tanh),
    "sigmoid": (lambda x: mb.sigmoid(x=x), torch.sigmoid),
    "silu": (lambda x: mb.silu(x=x), F.silu),
    "relu": (lambda x: mb.relu(x=x), F.relu),
    "round": (lambda x: mb.round(x=mb.mul(x=x, y=10.0)), lambda t: torch.round(t * 10)),
    "clip": (lambda x: mb.clip(x=x, alpha=-0.5, beta=0.5), lambda t: t.clamp(-0.5, 0.5)),
    "gelu-exact": (lambda x: mb.gelu(x=x), F.gelu),
    "gelu-tanh": (
        lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
        lambda t: F.gelu(t, approximate="tanh"),
    ),
    "softmax": (lambda x: mb.softmax(x=x, axis=1), lambda t: t.softmax(1)),
    "layer_norm": (
        lambda x: mb.layer_norm(x=x, axes=[-1], epsilon=1e-5),
        lambda t: F.layer_norm(t, (8,), eps=1e-5),
    ),
    "batch_norm": (
        lambda x: mb.batch_norm(
            x=x, mean=BN_MEAN, variance=BN_VAR, gamma=BN_GAMMA, beta=BN_BETA, epsilon=1e-5
        ),
        lambda t: F.batch_norm(
            t, *(torch.from_numpy(a) for a in (BN_MEAN, BN_VAR, BN_GAMMA, BN_BETA)), eps=1e-5
        ),
    ),
    "reduce_mean": (
        lambda x: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True),
        lambda t: t.mean((2, 3), keepdim=True),
    ),
    "reshape": (lambda x: mb.reshape(x=x, shape=[1, 4, 64]), lambda t: t.reshape(1, 4, 64)),
    "transpose": (lambda x: mb.transpose(x=x, perm=[0, 2, 3, 1]), lambda t: t.permute(0, 2, 3, 1)),
    "expand_dims": (lambda x: mb.expand_dims(x=x, axes=[2]), lambda t: t.unsqueeze(2)),
    "squeeze": (
        lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[2]), axes=[2]),
        lambda t: t,
    ),
    "concat": (lambda x: mb.concat(values=[x, x], axis=1), lambda t: torch.cat([t, t], 1)),
    "split": (
        lambda x: mb.split(x=x, split_sizes=[1, 3], axis=1)[1],
        lambda t: t.split([1, 3], 1)[1],
    ),
    "slice_by_index": (
        lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0, 2], end=[1, 3, 8, 8], stride=[1, 1, 2, 1]),
        lambda t: t[:, 1:3, ::2, 2:],
    ),
    "conv": (
        lambda x: mb.conv(x=x, weight=W_CONV, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
        lambda t: F.conv2d(t, torch.from_numpy(W_CONV), stride=2, padding=1),
    ),
    "linear": (
        lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN),
        lambda t: F.linear(t, torch.from_numpy(W_LIN), torch.from_numpy(B_LIN)),
    ),
    "matmul": (
        lambda x: mb.matmul(x=x, y=x, transpose_y=True),
        lambda t: t @ t.transpose(-1, -2),
    ),
    "einsum": (
        lambda x: mb.einsum(
            values=(x, mb.transpose(x=x, perm=[0, 3, 2, 1])), equation="nchw,nwhu->nchu"
        ),
        lambda t: torch.einsum("nchw,nwhu->nchu", t, t.permute(0, 3, 2, 1)),
    ),
    "upsample_nearest_neighbor": (
        lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2),
        lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
    ),
    "fill_like": (
        lambda x: mb.fill_like(ref_tensor=x, value=2.0),
        lambda t: torch.full_like(t, 2.0),
    ),
}


def save_program(build, tmp_path, precision=ct.precision.FLOAT32, input_spec=None):
    input_spec = input_spec or mb.TensorSpec(shape=SHAPE)

    @mb.program(input_specs=[input_spec], opset_version=ct.target.iOS16)
    def program(x):
        return build(x)

    model = ct.convert(
        program,
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=ct.target.iOS16,
        skip_model_load=True,
    )
    path = tmp_path / "op.mlpackage"
    model.save(str(path))
    return load_program(path)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_matches_pytorch(op, tmp_path):
    build, reference = CASES[op]
    program = save_program(build, tmp_path)
    out = next(iter(program.run({"x": X}).values()))
    expected = reference(T).numpy()
    assert tensor_metrics(expected, out)["psnr_db"] > 100, op


def test_gather_and_cast_match_pytorch(tmp_path):
    table = RNG.standard_normal((5, 3)).astype(np.float32)

    def build(ids):
        return mb.cast(x=mb.gather(x=table, indices=ids, axis=0), dtype="fp32")

    program = save_program(
        build,
        tmp_path,
        input_spec=mb.TensorSpec(shape=(1, 4), dtype=ct.converters.mil.mil.types.int32),
    )
    out = next(iter(program.run({"x": IDS}).values()))
    np.testing.assert_array_equal(
        out, F.embedding(torch.from_numpy(IDS).long(), torch.from_numpy(table)).numpy()
    )


def test_fp16_program_keeps_fp16_storage(tmp_path):
    program = save_program(CASES["conv"][0], tmp_path, precision=ct.precision.FLOAT16)
    out = next(iter(program.run({"x": X}).values()))
    expected = CASES["conv"][1](T).numpy()
    psnr = tensor_metrics(expected, out)["psnr_db"]
    assert 40 < psnr < 100  # fp16 rounding is visible: it is not computed in fp32 throughout


def test_unknown_op_fails_naming_it(tmp_path):
    with pytest.raises(UnsupportedOp, match="'topk'"):
        save_program(lambda x: mb.topk(x=x, k=2)[0], tmp_path)


def test_interpreter_runs_without_torch(tmp_path):
    save_program(CASES["conv"][0], tmp_path)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from instaflow_edge.runtimes.mil_interpreter import load_program\n"
        f"out = load_program({str(tmp_path / 'op.mlpackage')!r}).run({{'x': np.ones({SHAPE})}})\n"
        "print(next(iter(out.values())).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "(1, 6, 4, 4)"
