"""A frozen base's layer matrices held quantized, for LoRA on a base in little memory: int8 or
QLoRA's 4-bit NormalFloat (nf4), their layout (what logical axes shard the codes and scales),
quantization and dequantization. `Execution.weight_quantization` (an experiment's
`lora.base_dtype`) chooses the format; `llamax.model` reads the codes and dequantizes inside
each layer; `llamax.lora.merge` dequantizes before merging.

A quantized matrix `name` is stored as codes q (the parameter `name`) and a float32
`<name>_scale`, with w ~ value(q) * scale, one scale per block of an output channel's inputs.

- "int8": q int8 in [-127, 127], value(q) = q; one block per output channel (all its
  inputs), the scale its absmax / 127 (LLM.int8's vector-wise absmax quantization).
- "nf4": 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, as bitsandbytes' NF4): q indexes
  the 16 values NF4, value(q) = NF4[q]; blocks of NF4_BLOCK = 64 consecutive inputs of an
  output channel, the scale the block's absmax (float32, not double-quantized), each value
  the nearest code to w / absmax. Two codes per uint8 byte, the first of a pair of
  neighbouring inputs in the high nibble (bitsandbytes' packing).

An output channel's inputs run in row-major order over the matrix's input axes (wo's
[heads, head_dim]: the order of Hugging Face's o_proj inputs), as bitsandbytes' blocks run
over a torch Linear's [out, in] weight. Every array keeps logical axes that shard like the
weight: nf4's packed codes are the weight's shape with the last input axis halved (pairs never
cross it) and the same axis names; its scales are [input blocks, out...] named after the first
input axis, whose shards hold whole blocks whenever the blocks divide evenly over them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The layers' matrices, each [in..., out...]: how many leading axes are its input's, and how
# many trailing ones its output's.
AXES = {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1), "w1": (1, 1), "w2": (1, 1),
        "w3": (1, 1)}  # fmt: skip

QUANTIZATIONS = ("int8", "nf4")
# The codes' dtype of each, distinct: how `dequantize` (and so `merge`) tells them apart.
_STORAGE = {"int8": jnp.dtype(jnp.int8), "nf4": jnp.dtype(jnp.uint8)}

# bitsandbytes' NF4 table (`create_normal_map`): 8 positive and 7 negative quantiles of N(0, 1)
# and an exact 0, over the max; tests/test_lora.py derives it again with scipy.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)  # fmt: skip
NF4_BLOCK = 64
# Rounding to the nearest code: the midpoints between neighbours (in float64, then float32, as
# bitsandbytes' decision tree writes them); a value on a midpoint takes the lower code.
_NF4_MIDPOINTS = tuple(
    float(np.float32((lo + hi) / 2)) for lo, hi in zip(NF4[:-1], NF4[1:], strict=True)
)


class Layout(NamedTuple):
    """How a quantized layer matrix is stored, per layer (the layer scan adds `layers`)."""

    dtype: Any  # of the codes
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names
    zero: int  # the stored value of all-zero weights (the model's initialization)
    scale_shape: tuple[int, ...]  # of the float32 `<name>_scale`
    scale_axes: tuple[str, ...]


def layout(name: str, shape: tuple[int, ...], axes: tuple[str, ...], quantization: str) -> Layout:
    """The storage of matrix `name` ([in..., out...] with these logical axes) quantized as
    `quantization`; raises ValueError naming the matrix if it cannot be."""
    n_in = AXES[name][0]
    shape, axes = tuple(shape), tuple(axes)
    if quantization == "int8":
        return Layout(_STORAGE["int8"], shape, axes, 0, shape[n_in:], axes[n_in:])
    if quantization != "nf4":
        raise ValueError(f"Unknown weight quantization {quantization!r}; known: {QUANTIZATIONS}")
    inputs = math.prod(shape[:n_in])
    if inputs % NF4_BLOCK or shape[n_in - 1] % 2:
        raise ValueError(
            f"nf4 quantizes blocks of {NF4_BLOCK} inputs of each output channel, packed in "
            f"pairs: matrix {name} {list(shape)} has {inputs} inputs per output channel (its "
            f"axes {list(axes[:n_in])}), not a multiple of {NF4_BLOCK}, or an odd last input axis"
        )
    packed = (*shape[: n_in - 1], shape[n_in - 1] // 2, *shape[n_in:])
    scales = (inputs // NF4_BLOCK, *shape[n_in:])
    return Layout(_STORAGE["nf4"], packed, axes, 0x77, scales, (axes[0], *axes[n_in:]))


def _split(name: str, shape) -> tuple[int, int, int]:
    """(leading axes, input axes, output axes) of matrix `name`'s array (layers stacked or not)."""
    n_in, n_out = AXES[name]
    return len(shape) - n_in - n_out, n_in, n_out


def quantize_matrix(w: jax.Array, name: str, quantization: str) -> tuple[jax.Array, jax.Array]:
    """Matrix `name` (layers stacked or not) as (codes, float32 scale) in `quantization`."""
    lead, n_in, n_out = _split(name, w.shape)
    out_shape = w.shape[lead + n_in :]
    code = layout(name, w.shape[lead:], (None,) * (n_in + n_out), quantization)
    w = w.astype(jnp.float32)
    if quantization == "int8":
        inputs = tuple(range(lead, lead + n_in))
        scale = jnp.max(jnp.abs(w), axis=inputs) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, inputs)), -127, 127)
        return q.astype(jnp.int8), scale
    blocks = w.reshape(*w.shape[:lead], code.scale_shape[0], NF4_BLOCK, *out_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=lead + 1)
    x = blocks / jnp.expand_dims(jnp.where(absmax > 0, absmax, 1.0), lead + 1)
    # The nearest code's index: how many midpoints lie below x (elementwise, so XLA fuses it).
    q = sum((x > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS).reshape(w.shape)
    last = lead + n_in - 1  # pairs of neighbouring inputs along the last input axis
    pairs = q.reshape(*w.shape[:last], w.shape[last] // 2, 2, *out_shape)
    high, low = jnp.take(pairs, 0, axis=last + 1), jnp.take(pairs, 1, axis=last + 1)
    return (high << 4) | low, absmax


def dequantize(q: jax.Array, scale: jax.Array, name: str, dtype=jnp.float32) -> jax.Array:
    """Matrix `name` in `dtype` from its codes and scale (the format told by the codes' dtype:
    int8, or nf4's packed uint8): value(code) * scale, computed in `dtype`."""
    lead, n_in, n_out = _split(name, q.shape)
    scale = scale.astype(dtype)
    if q.dtype == _STORAGE["int8"]:
        return q.astype(dtype) * jnp.expand_dims(scale, tuple(range(lead, lead + n_in)))
    if q.dtype != _STORAGE["nf4"]:
        raise ValueError(f"{name}: codes of dtype {q.dtype} are neither int8's nor nf4's")
    last = lead + n_in - 1
    codes = jnp.stack([q >> 4, q & 0xF], axis=last + 1)
    shape = (*q.shape[:last], 2 * q.shape[last], *q.shape[last + 1 :])
    values = _nf4_values(codes.reshape(shape), dtype)
    blocks = values.reshape(*shape[:lead], -1, NF4_BLOCK, *shape[lead + n_in :])
    return (blocks * jnp.expand_dims(scale, lead + 1)).reshape(shape)


def _nf4_values(codes: jax.Array, dtype) -> jax.Array:
    """NF4[codes] as a tree of selects on the codes' bits, lowest first: elementwise, so XLA
    fuses it into the dequantization (a gather from the table it would not, on TPU)."""
    values = [jnp.asarray(v, dtype) for v in NF4]
    bit = 0
    while len(values) > 1:
        on = (codes >> bit) & 1 == 1
        values = [jnp.where(on, hi, lo) for lo, hi in zip(values[::2], values[1::2], strict=True)]
        bit += 1
    return values[0]


def quantize(params, quantization: str) -> dict:
    """A parameter tree with every layer matrix (`wq` ... `w3`) quantized (`quantize_matrix`)
    as its codes plus `<name>_scale`; the other parameters as they are."""
    out = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            out[name] = quantize(value, quantization)
        elif name in AXES:
            out[name], out[f"{name}_scale"] = quantize_matrix(value, name, quantization)
        else:
            out[name] = value
    return out
