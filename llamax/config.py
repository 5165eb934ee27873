"""LlamaConfig: the model's architecture, with Meta's `ModelArgs` field names.

What a checkpoint must record to be read back: the shapes, the rotary embedding, the norm and
the vocabulary. How a run computes with it (dtypes, attention backend, remat, layer loop) is
`llamax.execution.Execution`, and the mappings from Meta's `params.json` and Hugging Face's
`config.json` live with the converters (`llamax.convert.meta`, `llamax.convert.hf`).

The config is a frozen dataclass so that it is hashable and can be a static argument under
`jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

# rope_scaling keys by type (Hugging Face's names; `ntk` is llamax's, see llamax/rope.py):
# required, then optional. "type"/"rope_type" name the type itself.
ROPE_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "ntk": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": (
        {"factor"},
        {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
         "mscale", "mscale_all_dim", "truncate"},
    ),
    "llama3": (
        {"factor", "low_freq_factor", "high_freq_factor"},
        {"original_max_position_embeddings"},
    ),
}  # fmt: skip
ROPE_TYPES = tuple(ROPE_KEYS)
HEADS = ("lm", "score")
# What checkpoints written before llamax 0.2 recorded beside the architecture: how their run
# computed (now `llamax.execution.Execution`'s), ignored when they are read.
RECORDED_EXECUTION_KEYS = (
    "dtype", "param_dtype", "remat_policy", "scan_unroll", "attention", "attention_chunk",
    "attention_block_q", "attention_block_kv",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many kv heads as query heads (no grouping)
    vocab_size: int = 32000
    multiple_of: int = 256  # feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    # Explicit feed-forward width, for Hugging Face configs whose `intermediate_size` Meta's
    # formula cannot express. None: computed from `multiple_of` and `ffn_dim_multiplier`.
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # Hugging Face's dict form, e.g. {"rope_type": "linear", "factor": 4.0}; None: no scaling.
    rope_scaling: Mapping[str, Any] | None = None
    # What the last layer's normalized output feeds (HEADS): "lm", the next-token logits over
    # the vocabulary (`output`, [dim, vocab]); or "score", one scalar per position (`score`,
    # [dim, 1], no bias): a reward model, Hugging Face's LlamaForSequenceClassification with
    # one label.
    head: str = "lm"

    def __post_init__(self):
        if self.rope_scaling is not None:
            # A plain dict would make the config unhashable, so it could not be static under jit.
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if self.n_kv_heads == self.n_heads:
            # One spelling per model, so that equal models have equal (and equally hashed) configs.
            object.__setattr__(self, "n_kv_heads", None)
        errors = []
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if not _positive_int(getattr(self, name)):
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                errors.append(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if not _positive_number(value) and (value is not None or name != "ffn_dim_multiplier"):
                errors.append(f"{name} must be a finite positive number, got {value!r}")
        if not errors:
            if self.n_heads % self.kv_heads:
                errors.append(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})"
                )
            if self.dim % self.n_heads:
                errors.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif self.head_dim % 2:
                errors.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_scaling is not None:
            errors += self._rope_scaling_errors()
        if self.head not in HEADS:
            errors.append(f"head must be one of {HEADS}, got {self.head!r}")
        if errors:
            raise ValueError("Invalid LlamaConfig: " + "; ".join(errors))

    def _rope_scaling_errors(self) -> list[str]:
        kind, scaling = self.rope_type, self.rope_scaling
        if kind not in ROPE_KEYS:
            return [f"rope_scaling type must be one of {ROPE_TYPES}, got {kind!r}"]
        required, optional = ROPE_KEYS[kind]
        given = set(scaling) - {"type", "rope_type"}
        errors = []
        if required - given:
            errors.append(f"rope_scaling {kind!r} needs {sorted(required - given)}: {scaling}")
        if given - required - optional:
            errors.append(
                f"Unknown rope_scaling key(s) for {kind!r}: {sorted(given - required - optional)}"
                f" (allowed: {sorted(required | optional)})"
            )
        factor = scaling.get("factor")
        if "factor" in required and not _positive_number(factor):
            errors.append(f"rope_scaling {kind!r} needs a positive factor: {scaling}")
        if kind == "llama3" and not errors:
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            if not (_positive_number(low) and _positive_number(high) and high > low):
                errors.append(f"llama3 needs high_freq_factor > low_freq_factor > 0: {scaling}")
        return errors

    # ----- derived sizes -----

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Feed-forward width, exactly as Meta's `FeedForward.__init__` computes it."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        # Hugging Face wrote "type" before version 4.45 and "rope_type" since.
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: wq, wk, wv, wo and the three feed-forward ones."""
        d, h = self.dim, self.head_dim
        return d * h * (2 * self.n_heads + 2 * self.kv_heads) + 3 * d * self.hidden_dim

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals `jax.eval_shape` of `init`)."""
        layer = self.layer_matmul_params + 2 * self.dim  # and the two norms
        head = self.vocab_size * self.dim if self.head == "lm" else self.dim
        return self.n_layers * layer + self.vocab_size * self.dim + head + self.dim

    def replace(self, **changes) -> LlamaConfig:
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(f"Unknown LlamaConfig field(s): {unknown}; known: {sorted(FIELDS)}")
        return dataclasses.replace(self, **changes)

    # ----- presets -----

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    # ----- serialization (a checkpoint's config.json) -----

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """From `to_dict`'s form. The execution settings that checkpoints written before
        llamax 0.2 recorded beside the architecture (`dtype`, `attention`, ...) are ignored."""
        if not isinstance(d, Mapping):
            raise ValueError(f"A LlamaConfig must be a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k not in RECORDED_EXECUTION_KEYS}
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"Unknown LlamaConfig key(s): {unknown}; known keys: {sorted(FIELDS)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        return cls.from_dict(json.loads(text))


FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


# Llama 2 as released (Meta's params.json; 4096 context and the 32000-token tokenizer).
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    # Test and demo sizes: grouped-query attention, a few layers, runs in milliseconds on CPU.
    "tiny": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256
    ),
    "tiny-mha": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=256
    ),
}
