"""Hugging Face `LlamaForCausalLM`: `config.json` <-> `LlamaConfig`, state dicts <-> llamax
parameters, and model directories (config.json + safetensors) read lazily and written.

Hugging Face stores linear weights as torch `[out, in]` matrices and already uses the
half-split rotary layout, so the mapping is a transpose and a reshape per tensor, with no
permutation. Layers are stacked on llamax's leading `layers` axis. Hugging Face's names and
layout are also the converter's common currency (`llamax.convert.core`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert.formats import FormatError, SafetensorsWriter, load_safetensors

# llamax layer path -> (Hugging Face name inside `model.layers.{i}.`, kind)
LAYER_MAP = {
    ("attention", "wq"): ("self_attn.q_proj.weight", "q"),
    ("attention", "wk"): ("self_attn.k_proj.weight", "kv"),
    ("attention", "wv"): ("self_attn.v_proj.weight", "kv"),
    ("attention", "wo"): ("self_attn.o_proj.weight", "o"),
    ("feed_forward", "w1"): ("mlp.gate_proj.weight", "in"),
    ("feed_forward", "w3"): ("mlp.up_proj.weight", "in"),
    ("feed_forward", "w2"): ("mlp.down_proj.weight", "out"),
    ("attention_norm", "scale"): ("input_layernorm.weight", "norm"),
    ("ffn_norm", "scale"): ("post_attention_layernorm.weight", "norm"),
}
# Buffers that older checkpoints saved and that carry no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----- config.json -----


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face `LlamaConfig` dict (`config.json`)."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must be a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"Not a Llama config: model_type is {hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("Tied input/output embeddings are not Llama 2's layout")
    if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
        raise ValueError("Llama 2 has no biases; attention_bias/mlp_bias must be false")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama 2 uses silu, not {hf['hidden_act']!r}")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size")  # fmt: skip
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim")
    if head_dim is not None and n_heads and head_dim != hf["hidden_size"] // n_heads:
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling")
    if hf.get("rope_parameters"):  # transformers 5 folds both into one dict
        rope_scaling = dict(hf["rope_parameters"])
        rope_theta = rope_scaling.pop("rope_theta", rope_theta)
        if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
            rope_scaling = None
    base = LlamaConfig(
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
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForSequenceClassification" in architectures:
        labels = hf.get("num_labels", len(hf.get("id2label") or {0: ""}))
        if labels != 1:
            raise ValueError(
                f"A LlamaForSequenceClassification with {labels} labels: llamax's score head "
                "(a reward model) has one"
            )
        base = base.replace(head="score")
    elif not set(architectures) & {"LlamaForCausalLM", "LlamaModel"}:
        raise ValueError(
            f"Unknown Llama architecture {architectures}: llamax reads LlamaForCausalLM and "
            "LlamaForSequenceClassification (one label)"
        )
    return base.replace(**overrides)


def hf_config(config: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """A Hugging Face `config.json` dict for a model whose weights are stored in `dtype`."""
    c = config
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling is None else dict(c.rope_scaling),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if c.head == "score":
        # A reward model: transformers reads its score at each row's last token that is not
        # `pad_token_id`; 0 is Llama's <unk>, which its tokenizer (with byte fallback) never
        # gives, so that token is the sequence's last, where llamax reads it.
        out.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=0)  # fmt: skip
    if c.rope_type == "ntk":
        # transformers has no static NTK type: it is the default rotary embedding with the
        # scaled base, which gives the same frequencies (llamax.rope.ntk_theta).
        h = c.head_dim
        out["rope_theta"] = c.rope_theta * c.rope_scaling["factor"] ** (h / (h - 2))
        out["rope_scaling"] = None
    return out


# ----- tensors -----


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (bfloat16 tensors become float32)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def transpose(w: np.ndarray, tile: int = 64) -> np.ndarray:
    """A contiguous transpose of a matrix, tile by tile: 4x faster than numpy's on large
    bfloat16 matrices (bench/convert_memory.py), whose strided copy misses the cache."""
    rows, cols = w.shape
    # Copied as unsigned integers of the same width: numpy moves those faster than
    # ml_dtypes' bfloat16.
    bits = np.dtype(f"u{w.dtype.itemsize}")
    src = np.ascontiguousarray(w).view(bits)
    out = np.empty((cols, rows), bits)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T
    return out.view(w.dtype)


def layer_to_llamax(w: np.ndarray, kind: str, c: LlamaConfig) -> np.ndarray:
    d, h = c.dim, c.head_dim
    if kind == "q":
        return transpose(w).reshape(d, c.n_heads, h)
    if kind == "kv":
        return transpose(w).reshape(d, c.kv_heads, h)
    if kind == "o":
        return transpose(w).reshape(c.n_heads, h, d)
    if kind in ("in", "out"):
        return transpose(w)
    return w


def layer_to_hf(w: np.ndarray, kind: str, c: LlamaConfig) -> np.ndarray:
    if kind in ("q", "kv"):
        return transpose(w.reshape(c.dim, -1))
    if kind == "o":
        return transpose(w.reshape(-1, c.dim))
    if kind in ("in", "out"):
        return transpose(w)
    return w


def llamax_layer_shape(kind: str, c: LlamaConfig) -> tuple[int, ...]:
    """The shape of one layer's slice of a llamax parameter, by `LAYER_MAP` kind."""
    d, f, h = c.dim, c.hidden_dim, c.head_dim
    return {
        "q": (d, c.n_heads, h),
        "kv": (d, c.kv_heads, h),
        "o": (c.n_heads, h, d),
        "in": (d, f),
        "out": (f, d),
        "norm": (d,),
    }[kind]


# The head's parameter by `LlamaConfig.head`: (llamax's name [dim, out], Hugging Face's [out, dim]).
HEAD = {"lm": ("output", "lm_head.weight"), "score": ("score", "score.weight")}


def expected_hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, f, h = c.dim, c.hidden_dim, c.head_dim
    per_layer = {
        "q": (c.n_heads * h, d),
        "kv": (c.kv_heads * h, d),
        "o": (d, c.n_heads * h),
        "in": (f, d),
        "out": (d, f),
        "norm": (d,),
    }
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, d),
        "model.norm.weight": (d,),
        HEAD[c.head][1]: (c.vocab_size, d) if c.head == "lm" else (1, d),
    }
    for i in range(c.n_layers):
        for hf_name, kind in LAYER_MAP.values():
            shapes[f"model.layers.{i}.{hf_name}"] = per_layer[kind]
    return shapes


def params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig, dtype=np.float32) -> dict:
    """llamax parameters (numpy) from a Hugging Face Llama state dict (numpy or torch)."""
    expected = expected_hf_shapes(config)
    names = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Hugging Face state dict does not match the config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )

    def get(name):
        w = to_numpy(state_dict[name])
        if tuple(w.shape) != expected[name]:
            raise ValueError(f"{name}: expected shape {expected[name]}, got {tuple(w.shape)}")
        return w.astype(dtype)

    layers: dict[str, dict[str, np.ndarray]] = {}
    for (module, leaf), (hf_name, kind) in LAYER_MAP.items():
        stacked = [
            layer_to_llamax(get(f"model.layers.{i}.{hf_name}"), kind, config)
            for i in range(config.n_layers)
        ]
        layers.setdefault(module, {})[leaf] = np.stack(stacked)
    return {
        "tok_embeddings": get("model.embed_tokens.weight"),
        "layers": layers,
        "norm": {"scale": get("model.norm.weight")},
        HEAD[config.head][0]: get(HEAD[config.head][1]).T,
    }


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """A Hugging Face Llama state dict (numpy, contiguous) from llamax parameters."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["tok_embeddings"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
        HEAD[config.head][1]: np.asarray(params[HEAD[config.head][0]]).T,
    }
    for (module, leaf), (hf_name, kind) in LAYER_MAP.items():
        stacked = np.asarray(params["layers"][module][leaf])
        for i in range(config.n_layers):
            out[f"model.layers.{i}.{hf_name}"] = layer_to_hf(stacked[i], kind, config)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----- files: config.json and safetensors (single, or sharded with an index) -----


def read(directory: str):
    """The config and, per tensor name, a function that loads it, from a Hugging Face model
    directory (`config.json` and `model.safetensors` or `model.safetensors.index.json`)."""
    if not fs.isdir(directory):
        raise FileNotFoundError(f"Input directory not found: {directory}")
    config_path = fs.join(directory, "config.json")
    index_path = fs.join(directory, "model.safetensors.index.json")
    single = fs.join(directory, "model.safetensors")
    if not fs.exists(config_path) or not (fs.exists(index_path) or fs.exists(single)):
        raise FormatError(
            f"{directory} is not a Hugging Face Llama checkpoint: expected config.json and "
            f"model.safetensors (or an index), found {sorted(fs.listdir(directory))[:10]}"
        )
    try:
        config = config_from_hf(fs.read_json(config_path))
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(f"{config_path}: {e}") from e
    if fs.exists(index_path):
        lazy = _read_index(directory, index_path)
    else:
        lazy = load_safetensors(single)
    # Before any per-layer name is made: a config.json that claims a billion layers is
    # refused by what the files hold, in memory proportional to the files.
    check_layer_count(lazy, r"model\.layers\.(\d+)\.", config.n_layers, directory)
    expected = expected_hf_shapes(config)
    names = {k for k in lazy if not k.endswith(IGNORED_SUFFIXES)}
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise FormatError(
            f"{directory}: tensors do not match config.json: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, want in expected.items():
        if lazy[name].shape != want:
            raise FormatError(f"{name}: shape {lazy[name].shape}, config.json implies {want}")
    return config, {name: lazy[name].load for name in expected}


def _read_index(directory: str, index_path: str) -> dict:
    """The lazy tensors of the shards a `model.safetensors.index.json` names, each tensor in
    the shard the index says, and every shard a plain file name inside `directory`."""
    try:
        weight_map = fs.read_json(index_path)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{index_path}: not a safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index_path}: weight_map must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        if name in ("", ".", "..") or os.path.basename(name) != name or os.path.isabs(name):
            raise FormatError(
                f"{index_path}: shard {name[:100]!r} is not a file name inside {directory}"
            )
    missing = [name for name in files if not fs.isfile(fs.join(directory, name))]
    if missing:
        raise FormatError(f"{directory}: shards named in the index are missing: {missing}")
    lazy: dict = {}
    for file in files:
        for name, tensor in load_safetensors(fs.join(directory, file)).items():
            if name in lazy:
                raise FormatError(f"{directory}: tensor {name!r} is in two shards")
            if weight_map.get(name, file) != file:
                raise FormatError(
                    f"{index_path}: tensor {name!r} is in {file}, the index says {weight_map[name]}"
                )
            lazy[name] = tensor
    return lazy


def check_layer_count(names, pattern: str, n_layers: int, where: str) -> None:
    """The layer indices in tensor names (the first group of `pattern`) are 0 .. n_layers - 1."""
    compiled = re.compile(pattern)
    found = {int(m.group(1)) for name in names if (m := compiled.match(name))}
    if len(found) != n_layers or found != set(range(n_layers)):  # (no set of n_layers made)
        held = f"{len(found)} (indices {min(found)} to {max(found)})" if found else "none"
        raise FormatError(
            f"{where}: the config says {n_layers} layers, but the weights hold {held}"
        )


def write(config: LlamaConfig, tensors, directory: str, dtype: str) -> None:
    """`config.json` and one `model.safetensors` of `dtype` weights, loadable by
    `LlamaForCausalLM.from_pretrained`."""
    shapes = expected_hf_shapes(config)
    writer = SafetensorsWriter(
        os.path.join(directory, "model.safetensors"),
        {k: (v, np.dtype(dtype)) for k, v in shapes.items()},
    )
    for name in shapes:
        writer.write(name, tensors[name]())
    writer.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config, dtype), f, indent=2)
