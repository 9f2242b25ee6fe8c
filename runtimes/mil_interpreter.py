"""The MIL reference interpreter: runs a saved Core ML mlprogram's own ops with numpy, off macOS.

Core ML prediction exists only on macOS. To check a converted program on Linux, this module reads
the program back from the saved `.mlpackage` (the spec protobuf and its weight.bin, through
coremltools' milproto loader) and evaluates every op with numpy. Each op computes in float32 and
stores its result in the dtype the program declares for it, so an fp16 program keeps fp16 storage
between ops as Core ML's GPU and Neural Engine do. Compressed weights (`constexpr_lut_to_dense`,
`constexpr_affine_dequantize`, `constexpr_blockwise_shift_scale`) are decompressed once at load by
their MIL definitions, as Core ML does at load time. An op outside `OPS` fails at load, naming it.

Imports numpy and coremltools only (note: coremltools itself imports torch when it is installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instaflow_edge.errors import UserError

COMPUTE = np.float32
_DTYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "bool": np.bool_,
}


class UnsupportedOp(UserError):
    """The program holds an op this interpreter does not implement (named in the message)."""


def _binary(ufunc: np.ufunc) -> Callable:
    return lambda x, y: ufunc(x, y)


def _unary(ufunc: np.ufunc) -> Callable:
    return lambda x: ufunc(x)


# -- elementwise --------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    """erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), evaluated in float64."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t
                            * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(COMPUTE)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(COMPUTE)


def _gelu(x: np.ndarray, mode: str = "EXACT") -> np.ndarray:
    mode = str(mode)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.sqrt(np.float32(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.sqrt(np.float32(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise UnsupportedOp(f"gelu mode {mode!r} is not supported by the MIL interpreter")


# -- shapes -------------------------------------------------------------------------------------
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    index = tuple(
        slice(
            None if begin_mask[axis] else int(begin[axis]),
            None if end_mask[axis] else int(end[axis]),
            int(stride[axis]),
        )
        for axis in range(rank)
    )
    out = x[index]
    if squeeze_mask is not None and np.any(squeeze_mask):
        out = out.squeeze(axis=tuple(int(a) for a in np.flatnonzero(squeeze_mask)))
    return out


def _split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(split_sizes)[:-1].astype(int), axis=int(axis)))
    return tuple(np.split(x, int(num_splits), axis=int(axis)))


def _concat(values, axis, interleave=False):
    if interleave:
        raise UnsupportedOp("concat with interleave=True is not supported by the MIL interpreter")
    return np.concatenate(values, axis=int(axis))


def _axes(axes) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


# -- normalisation and reductions ---------------------------------------------------------------
def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = _axes(axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out


def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    """Per-channel (axis 1) normalisation with given statistics; MIL's batch_norm."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + np.float32(epsilon))
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def _softmax(x, axis=-1):
    shifted = x - x.max(axis=int(axis), keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=int(axis), keepdims=True)


def _reduce(function: Callable) -> Callable:
    def reduce(x, axes=None, keep_dims=False):
        return function(x, axis=_axes(axes), keepdims=bool(keep_dims))

    return reduce


# -- linear algebra -----------------------------------------------------------------------------
def _linear(x, weight, bias=None):
    out = np.matmul(x, weight.T)
    return out if bias is None else out + bias


def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv_padding(pad_type, pad, size, kernel, stride, dilation) -> tuple[int, int]:
    pad_type = str(pad_type)
    if pad_type == "valid":
        return 0, 0
    if pad_type == "custom":
        return pad
    if pad_type in ("same", "same_lower"):
        effective = (kernel - 1) * dilation + 1
        out = -(-size // stride)
        total = max((out - 1) * stride + effective - size, 0)
        small, large = total // 2, total - total // 2
        return (small, large) if pad_type == "same" else (large, small)
    raise UnsupportedOp(f"conv pad_type {pad_type!r} is not supported by the MIL interpreter")


def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """2-D convolution (NCHW, OIHW) as a sum over kernel offsets of channel matmuls."""
    if x.ndim != 4:
        raise UnsupportedOp(f"conv of rank {x.ndim} is not supported by the MIL interpreter")
    kernel_h, kernel_w = weight.shape[2:]
    sh, sw = (1, 1) if strides is None else (int(s) for s in strides)
    dh, dw = (1, 1) if dilations is None else (int(d) for d in dilations)
    pad = [0, 0, 0, 0] if pad is None else [int(p) for p in pad]
    top, bottom = _conv_padding(pad_type, pad[0:2], x.shape[2], kernel_h, sh, dh)
    left, right = _conv_padding(pad_type, pad[2:4], x.shape[3], kernel_w, sw, dw)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (x.shape[2] - (kernel_h - 1) * dh - 1) // sh + 1
    out_w = (x.shape[3] - (kernel_w - 1) * dw - 1) // sw + 1
    groups = int(groups)
    in_per_group, out_per_group = weight.shape[1], weight.shape[0] // groups
    outputs = []
    for group in range(groups):
        xg = x[:, group * in_per_group : (group + 1) * in_per_group]
        wg = weight[group * out_per_group : (group + 1) * out_per_group]
        acc = np.zeros((x.shape[0], out_per_group, out_h, out_w), COMPUTE)
        for i in range(kernel_h):
            for j in range(kernel_w):
                window = xg[
                    :,
                    :,
                    i * dh : i * dh + sh * (out_h - 1) + 1 : sh,
                    j * dw : j * dw + sw * (out_w - 1) + 1 : sw,
                ]
                acc += np.einsum("nchw,oc->nohw", window, wg[:, :, i, j], optimize=True)
        outputs.append(acc)
    out = np.concatenate(outputs, axis=1)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def _upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    if not (sh.is_integer() and sw.is_integer()):
        raise UnsupportedOp("upsample_nearest_neighbor with a fractional scale is not supported")
    return np.repeat(np.repeat(x, int(sh), axis=-2), int(sw), axis=-1)


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise UnsupportedOp("gather with batch_dims != 0 is not supported by the MIL interpreter")
    return np.take(x, indices.astype(np.int64), axis=int(axis))


def _cast(x, dtype):
    return x.astype(_DTYPES[str(dtype)])


# -- compressed weights (decompressed once, at load) ---------------------------------------------
def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB first, one byte at a time (the MIL spec of constexpr_lut_to_dense)."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: nbits * count]
    weights = (1 << np.arange(nbits, dtype=np.uint32)).astype(np.uint32)
    return (bits.reshape(count, nbits).astype(np.uint32) * weights).sum(axis=1)


def _expand_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a per-block parameter (same rank, each dim dividing `shape`) to `shape`."""
    for axis, (size, blocks) in enumerate(zip(shape, param.shape, strict=True)):
        param = np.repeat(param, size // blocks, axis=axis)
    return param


def _constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    if shape is not None:  # iOS16: one LUT, indices packed into uint8
        nbits = int(np.log2(lut.size))
        count = int(np.prod(shape))
        return lut[unpack_bits(indices, nbits, count)].reshape(tuple(int(s) for s in shape))
    if lut.shape[-1] != 1:  # iOS18: a LUT per block of channels; indices already unpacked
        raise UnsupportedOp("constexpr_lut_to_dense with vector palettes is not supported")
    groups = []
    for axis, (size, blocks) in enumerate(zip(indices.shape, lut.shape[:-2], strict=True)):
        view = [1] * indices.ndim
        view[axis] = size
        groups.append((np.arange(size) // (size // blocks)).reshape(view))
    return lut[(*groups, indices.astype(np.int64), 0)]


def _constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16 linear quantization: scale * (q - zero_point), scale/zero_point along `axis`."""
    view = [1] * quantized_data.ndim
    if np.ndim(scale) == 1:
        view[int(axis)] = -1
    q = quantized_data.astype(np.float32)
    zero = np.asarray(zero_point, np.float32).reshape(view if np.ndim(zero_point) == 1 else ())
    return (q - zero) * np.asarray(scale, np.float32).reshape(view if np.ndim(scale) == 1 else ())


def _constexpr_blockwise_shift_scale(data, scale, offset=None):
    """iOS18 linear quantization: scale * (data - offset), per block."""
    q = data.astype(np.float32)
    if offset is not None:
        q = q - _expand_blocks(offset.astype(np.float32), data.shape)
    return q * _expand_blocks(scale.astype(np.float32), data.shape)


def _constexpr_cast(source_val, output_dtype):
    return source_val.astype(_DTYPES[str(output_dtype)])


CONSTEXPR_OPS: dict[str, Callable] = {
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    "constexpr_cast": _constexpr_cast,
}

OPS: dict[str, Callable] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "pow": _binary(np.power),
    "square": _unary(np.square),
    "sqrt": _unary(np.sqrt),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(x + np.float32(epsilon)),
    "exp": _unary(np.exp),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tanh": _unary(np.tanh),
    "erf": _erf,
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "relu": lambda x: np.maximum(x, 0),
    "gelu": _gelu,
    "clip": lambda x, alpha, beta: np.clip(x, alpha, beta),
    "round": _unary(np.round),
    "fill_like": lambda ref_tensor, value=0.0: np.full(ref_tensor.shape, value, COMPUTE),
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "linear": _linear,
    "matmul": _matmul,
    "einsum": lambda values, equation: np.einsum(str(equation), *values),
    "conv": _conv,
    "upsample_nearest_neighbor": _upsample_nearest_neighbor,
    "reshape": lambda x, shape: x.reshape(tuple(int(s) for s in shape)),
    "transpose": lambda x, perm: x.transpose(tuple(int(p) for p in perm)),
    "expand_dims": lambda x, axes: np.expand_dims(x, _axes(axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, _axes(axes)),
    "concat": _concat,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "gather": _gather,
    "cast": _cast,
}


# -- the program --------------------------------------------------------------------------------
@dataclass
class _Step:
    op_type: str
    function: Callable
    inputs: dict[str, str | tuple[str, ...]]  # parameter -> value name(s)
    outputs: list[tuple[str, np.dtype]]


def _dtype_of(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(_DTYPES[types.builtin_to_string(var.dtype)])


def _const_value(var) -> np.ndarray:
    value = var.val
    if isinstance(value, str | bool):
        return value
    return np.asarray(value, dtype=_dtype_of(var))


class MILProgram:
    """The `main` function of a saved mlprogram, ready to evaluate with numpy."""

    def __init__(self, function):
        self.constants: dict[str, object] = {}
        self.steps: list[_Step] = []
        self.inputs = {
            name: (tuple(var.shape), _dtype_of(var)) for name, var in function.inputs.items()
        }
        self.outputs = {var.name: (tuple(var.shape), _dtype_of(var)) for var in function.outputs}
        self.op_counts: dict[str, int] = {}
        self.decompressed: list[str] = []  # constants that constexpr ops produced
        self.const_ops: dict[str, str] = {}  # const op name -> the name of its value
        for op in function.operations:
            self.op_counts[op.op_type] = self.op_counts.get(op.op_type, 0) + 1
            if op.op_type == "const":
                self.constants[op.outputs[0].name] = _const_value(op.outputs[0])
                self.const_ops[op.name] = op.outputs[0].name
            elif op.op_type in CONSTEXPR_OPS:
                params = {k: _const_value(v) for k, v in op.inputs.items()}
                value = CONSTEXPR_OPS[op.op_type](**params)
                self.constants[op.outputs[0].name] = value.astype(_dtype_of(op.outputs[0]))
                self.decompressed.append(op.outputs[0].name)
            elif op.op_type in OPS:
                self.steps.append(
                    _Step(
                        op_type=op.op_type,
                        function=OPS[op.op_type],
                        inputs={
                            k: tuple(v.name for v in value)
                            if isinstance(value, list | tuple)
                            else value.name
                            for k, value in op.inputs.items()
                        },
                        outputs=[(var.name, _dtype_of(var)) for var in op.outputs],
                    )
                )
            else:
                name = op.outputs[0].name if op.outputs else op.name
                raise UnsupportedOp(
                    f"the MIL interpreter does not implement op {op.op_type!r} (producing "
                    f"{name!r}); supported: {', '.join(sorted([*OPS, *CONSTEXPR_OPS, 'const']))}"
                )
        self.freed_after = self._last_uses()

    def _last_uses(self) -> list[list[str]]:
        """Per step, the values no later step reads (neither constants nor outputs): a run drops
        them there, so that it holds the live activations only, not every one it made."""
        last: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for name, _ in step.outputs:
                last.setdefault(name, index)  # made and never read: dropped where it is made
            for ref in step.inputs.values():
                for name in ref if isinstance(ref, tuple) else (ref,):
                    last[name] = index
        kept = {*self.constants, *self.outputs}
        freed: list[list[str]] = [[] for _ in self.steps]
        for name, index in last.items():
            if name not in kept:
                freed[index].append(name)
        return freed

    def run(
        self, feeds: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Evaluate the program on named inputs; returns the named outputs in their program dtype.

        `constants` replaces named weights for this run (mixed-bit search tries candidates so)."""
        values: dict[str, object] = dict(self.constants)
        for name, value in (constants or {}).items():
            values[name] = value.astype(self.constants[name].dtype)
        for name, (shape, dtype) in self.inputs.items():
            if name not in feeds:
                raise UserError(f"missing input {name!r}; the program takes {list(self.inputs)}")
            value = np.asarray(feeds[name])
            if value.shape != shape:
                raise UserError(
                    f"input {name!r} has shape {value.shape}, the program wants {shape}"
                )
            values[name] = value.astype(dtype)
        for step, freed in zip(self.steps, self.freed_after, strict=True):
            kwargs = {
                param: [_compute(values[n]) for n in ref]
                if isinstance(ref, tuple)
                else _compute(values[ref])
                for param, ref in step.inputs.items()
            }
            result = step.function(**kwargs)
            results = result if isinstance(result, tuple) else (result,)
            for (name, dtype), value in zip(step.outputs, results, strict=True):
                values[name] = np.asarray(value).astype(dtype, copy=False)
            for name in freed:
                values.pop(name, None)
        return {name: values[name] for name in self.outputs}


def _compute(value):
    """Float values compute in float32 (fp16 storage is kept between ops, not inside them)."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(COMPUTE)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim == 0:
        return value.item()
    return value


def load_program(mlpackage: Path) -> MILProgram:
    """Read the mlprogram back from a saved `.mlpackage` (spec protobuf + weights), not from memory."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.models.utils import load_spec

    mlpackage = Path(mlpackage)
    if not (mlpackage / "Manifest.json").is_file():
        raise UserError(f"{mlpackage} is not an .mlpackage (no Manifest.json)")
    spec = load_spec(str(mlpackage))
    if spec.WhichOneof("Type") != "mlProgram":
        raise UserError(f"{mlpackage} is not an mlprogram (it is {spec.WhichOneof('Type')!r})")
    weights = mlpackage / "Data" / "com.apple.CoreML" / "weights"
    program = load_milproto(spec, spec.specificationVersion, file_weights_dir=str(weights))
    return MILProgram(program.functions["main"])
