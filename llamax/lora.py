"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on a frozen base.

A targeted weight W (any of `wq wk wv wo w1 w2 w3`, shaped [in..., out...]) gets two
adapters, A [in..., r] and B [r, out...], and its layer computes x W + s (drop(x) A) B with
s = alpha / r (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023). A starts as PEFT's (uniform in
+-1/sqrt(fan_in)) and B at zero, so that at step 0 the model is the base exactly. Adapters
are parameters of the same modules as their weights (`wq_lora_a`, `wq_lora_b`), with the
base weight's logical axes and `lora_rank` (never split) for r, so they shard with them and
the layer scan, remat and the KV cache work unchanged.

`split` separates a parameter tree into the frozen base and what trains (the adapters, and
any parameters named to train whole beside them: PEFT's `modules_to_save`, a reward model's
score head), `combine` joins them again, and `merge` folds the adapters into the base weights
(W + s A B): a plain checkpoint that any Llama runs. `quantize` holds a frozen base's layer
matrices in int8 or in QLoRA's 4-bit NormalFloat (nf4), and `dequantize` gives them back (see
"a quantized frozen base" below).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The layers' matrices, each [in..., out...]: how many leading axes are its input's, and how
# many trailing ones its output's.
AXES = {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1), "w1": (1, 1), "w2": (1, 1),
        "w3": (1, 1)}  # fmt: skip
TARGETS = tuple(AXES)
SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wv")
    dropout: float = 0.0  # on the adapters' input, in training only
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        errors = []
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            errors.append(f"rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            errors.append(f"alpha must be a finite number, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            errors.append(f"targets must be distinct names among {TARGETS}, got {self.targets}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if errors:
            raise ValueError("Invalid LoRA config: " + "; ".join(errors))
        # In one order (TARGETS'), so that equal configs compare equal.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown LoRA config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def from_section(section: Mapping[str, Any]) -> LoraConfig | None:
    """The LoRA config of an experiment config's `lora` section (None for rank 0): `targets`
    there is a comma-separated string, `base_dtype` belongs to the run."""
    if not section.get("rank"):
        return None
    targets = section.get("targets", "wq,wv")
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    keys = ("rank", "alpha", "dropout", "rslora")
    return LoraConfig(targets=targets, **{k: section[k] for k in keys if k in section})


def init_a(key, shape, dtype=jnp.float32):
    """PEFT's (and torch's Linear) kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)),
    fan_in the product of every axis but the last (the rank)."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


def _partition(params, keep_trained: bool, trained: Collection[str] = ()):
    out = {}
    for name, value in params.items():
        if name in trained:  # a whole parameter (or module) that trains
            if keep_trained:
                out[name] = value
        elif isinstance(value, Mapping):
            sub = _partition(value, keep_trained)
            if sub:
                out[name] = sub
        elif is_adapter(name) == keep_trained:
            out[name] = value
    return out


def split(params, trained: Collection[str] = ()) -> tuple[dict, dict]:
    """(base, trained): the parameter tree without and with the `*_lora_a/_b` leaves and the
    top-level parameters named in `trained`, which train whole beside the adapters (PEFT's
    `modules_to_save`; `llamax.model.trained_with_adapters` names a model's). Without
    `trained`, (everything but the adapters, the adapters)."""
    return _partition(params, False, trained), _partition(params, True, trained)


def combine(base, adapters) -> dict:
    """The parameter tree of a LoRA model: the base's leaves and the adapters'."""
    out = dict(base)
    for name, value in adapters.items():
        out[name] = combine(out.get(name, {}), value) if isinstance(value, Mapping) else value
    return out


def merge(params, lora: LoraConfig) -> dict:
    """The base with each adapted weight replaced by W + s A B (in W's dtype, computed in
    float32; a quantized base's matrices dequantized to float32 first, `dequantize`); works on
    stacked layers ([L, ...]) and per-layer ones alike. A merged weight holding a NaN or an
    infinite value (adapters that hold one, or overflow with the scale) is refused with a
    `ValueError` naming it (outside `jit`: one finiteness flag per merged weight, fetched
    together)."""
    merged = {}

    def visit(tree, path):
        out = {}
        for name, value in tree.items():
            if isinstance(value, Mapping):
                out[name] = visit(value, (*path, name))
            elif is_adapter(name) or (name.endswith("_scale") and name[:-6] in AXES):
                continue
            else:
                if f"{name}_scale" in tree:
                    value = dequantize(value, tree[f"{name}_scale"], name)
                a, b = tree.get(f"{name}_lora_a"), tree.get(f"{name}_lora_b")
                out[name] = value if a is None else _merged(value, a, b, lora.scale)
                if a is not None:
                    stacked = a.ndim + b.ndim - 2 > value.ndim
                    merged["/".join((*path, name))] = (out[name], stacked)
        return out

    out = visit(params, ())
    _require_finite(merged, lora)
    return out


def _require_finite(merged: dict, lora: LoraConfig) -> None:
    """Refuses the first merged weight (by name) that is not finite."""
    flags = {name: jnp.isfinite(w).all() for name, (w, _) in merged.items()}
    if any(isinstance(f, jax.core.Tracer) for f in flags.values()):
        return  # traced: there are no values to check
    for name, finite in jax.device_get(flags).items():
        if not finite:
            w, stacked = merged[name]
            # Counted per slice of the first axis (a layer, when stacked): int32 each.
            counts = np.asarray(jax.device_get(jnp.sum(~jnp.isfinite(w), tuple(range(1, w.ndim)))))
            bad, first = int(counts.sum(dtype=np.int64)), int(np.flatnonzero(counts)[0])
            raise ValueError(
                f"LoRA merge: {name} with the adapters merged (W + s A B, s = {lora.scale:g}) "
                f"has {bad:,} of {w.size:,} values NaN or infinite"
                f"{f', the first in layer {first}' if stacked else ''}: the adapters hold such "
                "values, or are too large for the base's dtype"
            )


def _merged(w, a, b, scale):
    stacked = a.ndim + b.ndim - 2 > w.ndim  # a leading layer axis on all three

    def one(w, a, b):
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.vmap(one)(w, a, b) if stacked else one(w, a, b)


# ----- a quantized frozen base -----
#
# A frozen base may hold its layer matrices quantized (`Execution.weight_quantization`, an
# experiment's `lora.base_dtype`): matrix `name` as codes q (the parameter `name`) and a float32
# `<name>_scale`, with w ~ value(q) * scale, one scale per block of an output channel's inputs.
#
# - "int8": q int8 in [-127, 127], value(q) = q; one block per output channel (all its
#   inputs), the scale its absmax / 127 (LLM.int8's vector-wise absmax quantization).
# - "nf4": 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, as bitsandbytes' NF4): q indexes
#   the 16 values NF4, value(q) = NF4[q]; blocks of NF4_BLOCK = 64 consecutive inputs of an
#   output channel, the scale the block's absmax (float32, not double-quantized), each value
#   the nearest code to w / absmax. Two codes per uint8 byte, the first of a pair of
#   neighbouring inputs in the high nibble (bitsandbytes' packing).
#
# An output channel's inputs run in row-major order over the matrix's input axes (wo's
# [heads, head_dim]: the order of Hugging Face's o_proj inputs), as bitsandbytes' blocks run over
# a torch Linear's [out, in] weight. Every array keeps logical axes that shard like the weight:
# nf4's packed codes are the weight's shape with the last input axis halved (pairs never cross
# it) and the same axis names; its scales are [input blocks, out...] named after the first input
# axis, whose shards hold whole blocks whenever the blocks divide evenly over them.

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
