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
(W + s A B): a plain checkpoint that any Llama runs, a quantized base's matrices
(`llamax.quantization`: int8, QLoRA's nf4) dequantized first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llamax.quantization import AXES, dequantize

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
