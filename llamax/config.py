"""LlamaConfig: the model's shape and numerics, with Meta's `ModelArgs` field names.

The config is a frozen dataclass so that it is hashable and can be a static argument under
`jax.jit`. It maps to and from Meta's `params.json` and Hugging Face's `config.json`; those two
mappings are the only places that know the foreign field names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj")
ATTENTION_BACKENDS = ("xla", "chunked", "splash", "cudnn")
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
# What `use_scaled_rope: true` means in Meta's Llama 3.1 params.json (its `apply_scaling`).
META_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


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
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (the master weights)
    remat_policy: str = "none"
    # Layers per iteration of the scan over layers. Unrolling lets XLA fuse across layers
    # (20% faster train steps on CPU, measured in docs/performance.md) and costs compile time;
    # 1 keeps TPU compiles fast. The parameter layout is the same for every value.
    scan_unroll: int = 1
    attention: str = "xla"  # "chunked" (memory-lean), "splash" (TPU), "cudnn" (GPU)
    # Queries and keys per block of the chunked and splash attention (llamax/attention.py).
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def __post_init__(self):
        if self.rope_scaling is not None:
            # A plain dict would make the config unhashable, so it could not be static under jit.
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if self.n_kv_heads == self.n_heads:
            # One spelling per model, so that equal models have equal (and equally hashed) configs.
            object.__setattr__(self, "n_kv_heads", None)
        errors = []
        for name in (
            "dim",
            "n_layers",
            "n_heads",
            "vocab_size",
            "multiple_of",
            "max_seq_len",
            "scan_unroll",
            "attention_block_q",
            "attention_block_kv",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            errors.append(f"n_kv_heads must be positive, got {self.n_kv_heads}")
        if not errors:
            if self.n_heads % self.kv_heads:
                errors.append(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})"
                )
            if self.dim % self.n_heads:
                errors.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif self.head_dim % 2:
                errors.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name, allowed in (
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("remat_policy", REMAT_POLICIES),
            ("attention", ATTENTION_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            errors += self._rope_scaling_errors()
        if self.attention == "splash" and self.attention_block_kv % 128:
            errors.append(
                f"splash attention needs attention_block_kv a multiple of 128 (TPU lanes), "
                f"got {self.attention_block_kv}"
            )
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
        if "factor" in required and not (isinstance(factor, int | float) and factor > 0):
            errors.append(f"rope_scaling {kind!r} needs a positive factor: {scaling}")
        if kind == "llama3" and not errors:
            if not scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0:
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
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals `jax.eval_shape` of `init`)."""
        d, f, h = self.dim, self.hidden_dim, self.head_dim
        attention = d * h * (2 * self.n_heads + 2 * self.kv_heads)
        layer = attention + 3 * d * f + 2 * d
        return self.n_layers * layer + 2 * self.vocab_size * d + d

    def replace(self, **changes) -> LlamaConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Unknown LlamaConfig field(s): {unknown}")
        return dataclasses.replace(self, **changes)

    # ----- presets -----

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    # ----- serialization -----

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown LlamaConfig key(s): {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_meta_params(
        cls, params: Mapping[str, Any], vocab_size: int | None = None, **overrides
    ):
        """From Meta's `params.json`. Its `vocab_size` is -1 in the Llama 2 release: the
        vocabulary then comes from the tokenizer or the embedding, passed as `vocab_size`."""
        ignored = {"max_batch_size"}  # generation-time settings of Meta's ModelArgs
        if params.get("use_scaled_rope"):  # Llama 3.1's params.json: its fixed llama3 scaling
            params = {k: v for k, v in params.items() if k != "use_scaled_rope"}
            params["rope_scaling"] = META_LLAMA3_SCALING
        elif "use_scaled_rope" in params:
            params = {k: v for k, v in params.items() if k != "use_scaled_rope"}
        fields = {
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "max_seq_len",
            "rope_theta",
            "rope_scaling",
        }
        unknown = sorted(set(params) - fields - ignored)
        if unknown:
            raise ValueError(f"Unknown key(s) in Meta params.json: {unknown}")
        kwargs = {k: v for k, v in params.items() if k in fields}
        if kwargs.get("vocab_size", -1) <= 0:
            if vocab_size is None:
                raise ValueError(
                    "params.json has vocab_size -1: pass the vocabulary size of the tokenizer"
                )
            kwargs["vocab_size"] = vocab_size
        elif vocab_size is not None and vocab_size != kwargs["vocab_size"]:
            raise ValueError(
                f"params.json says vocab_size {kwargs['vocab_size']}, but got {vocab_size}"
            )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_meta_params(self) -> dict[str, Any]:
        out = {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": -1,
        }
        if self.n_kv_heads is not None:
            out["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            out["rope_theta"] = self.rope_theta
        if self.rope_scaling is not None:
            # Not a field of Meta's Llama 2 ModelArgs (its loader refuses unknown keys), but
            # the only way to keep a context-extended model's rotary scaling in this format.
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.ffn_dim is not None:
            raise ValueError(
                "Meta's params.json cannot express an explicit ffn_dim; use multiple_of and "
                "ffn_dim_multiplier instead"
            )
        return out

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> LlamaConfig:
        """From a Hugging Face `LlamaConfig` dict (`config.json`)."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"Not a Llama config: model_type is {hf.get('model_type')!r}")
        if hf.get("tie_word_embeddings", False):
            raise ValueError("Tied input/output embeddings are not Llama 2's layout")
        if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
            raise ValueError("Llama 2 has no biases; attention_bias/mlp_bias must be false")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama 2 uses silu, not {hf['hidden_act']!r}")
        n_heads = hf["num_attention_heads"]
        n_kv = hf.get("num_key_value_heads") or n_heads
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // n_heads:
            raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
        rope_theta = hf.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling")
        if hf.get("rope_parameters"):  # transformers 5 folds both into one dict
            rope_scaling = dict(hf["rope_parameters"])
            rope_theta = rope_scaling.pop("rope_theta", rope_theta)
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
                rope_scaling = None
        base = cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=None if n_kv == n_heads else n_kv,
            vocab_size=hf["vocab_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
        )
        if base.hidden_dim != hf["intermediate_size"]:
            base = base.replace(ffn_dim=hf["intermediate_size"])
        return base.replace(**overrides)

    def to_hf_config(self) -> dict[str, Any]:
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.param_dtype,
        }
        if self.rope_type == "ntk":
            # transformers has no static NTK type: it is the default rotary embedding with the
            # scaled base, which gives the same frequencies (llamax.rope.ntk_theta).
            h = self.head_dim
            out["rope_theta"] = self.rope_theta * self.rope_scaling["factor"] ** (h / (h - 2))
            out["rope_scaling"] = None
        return out


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
