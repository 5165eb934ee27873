"""Meta's Llama 2 release layout: `params.json` (<-> `LlamaConfig`) and `consolidated.NN.pth`
model-parallel shards.

Shards follow fairscale's layers in Meta's `llama/model.py`: `wq, wk, wv, w1, w3, output` are
ColumnParallelLinear (torch `[out, in]`, split on dim 0), `wo, w2` RowParallelLinear (split on
dim 1), `tok_embeddings` ParallelEmbedding (split on the embedding dim, 1); norms are
replicated. Meta rotates interleaved pairs, llamax and Hugging Face the two halves of each head:
the rows of wq and wk are permuted per head on import, and back on export.

Tensors are exchanged in Hugging Face's names and layout (`model.layers.0.self_attn.q_proj.
weight`, half-split rotary), the converter's common currency.

Meta's release carries md5 sums beside its files (`checklist.chk` beside the shards,
`tokenizer_checklist.chk` beside the tokenizer): `verify_checklist` checks what a conversion
reads against them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert.formats import FormatError, load_pth
from llamax.convert.hf import check_layer_count, expected_hf_shapes

# Meta name (inside `layers.{i}.` for layer tensors) -> (HF name, split dim or None, permute)
_TOP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1, None),
    "norm.weight": ("model.norm.weight", None, None),
    "output.weight": ("lm_head.weight", 0, None),
}
_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, "q"),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, "k"),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, None),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, None),
    "attention_norm.weight": ("input_layernorm.weight", None, None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, None),
}
IGNORED = ("rope.freqs",)  # a buffer of Meta's, recomputed from rope_theta

log = logging.getLogger("llamax")

# The fields of Meta's `ModelArgs` that are LlamaConfig fields of the same name.
PARAMS_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "max_seq_len", "rope_theta",
                 "rope_scaling")  # fmt: skip
# Generation-time settings of Meta's ModelArgs, not part of the architecture.
IGNORED_PARAMS = ("max_batch_size",)
# What `use_scaled_rope: true` means in Meta's Llama 3.1 params.json (its `apply_scaling`).
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# ----- params.json -----


def config_from_params(
    params: Mapping[str, Any], vocab_size: int | None = None, **overrides
) -> LlamaConfig:
    """The LlamaConfig of Meta's `params.json`. Its `vocab_size` is -1 in the Llama 2 release:
    the vocabulary then comes from the tokenizer or the embedding, passed as `vocab_size`."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params.json must be a JSON object, got {type(params).__name__}")
    params = dict(params)
    if params.pop("use_scaled_rope", False):  # Llama 3.1's params.json: its fixed llama3 scaling
        params["rope_scaling"] = LLAMA3_SCALING
    unknown = sorted(set(params) - set(PARAMS_FIELDS) - set(IGNORED_PARAMS))
    if unknown:
        raise ValueError(f"Unknown key(s) in Meta params.json: {unknown}")
    kwargs = {k: v for k, v in params.items() if k in PARAMS_FIELDS}
    given_vocab = kwargs.get("vocab_size", -1)
    if isinstance(given_vocab, bool) or not isinstance(given_vocab, int):
        raise ValueError(f"vocab_size must be an integer, got {given_vocab!r}")
    if given_vocab <= 0:
        if vocab_size is None:
            raise ValueError(
                "params.json has vocab_size -1: pass the vocabulary size of the tokenizer"
            )
        kwargs["vocab_size"] = vocab_size
    elif vocab_size is not None and vocab_size != given_vocab:
        raise ValueError(f"params.json says vocab_size {given_vocab}, but got {vocab_size}")
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def params_json(config: LlamaConfig) -> dict[str, Any]:
    """Meta's `params.json` of a config."""
    if config.ffn_dim is not None:
        raise ValueError(
            "Meta's params.json cannot express an explicit ffn_dim; use multiple_of and "
            "ffn_dim_multiplier instead"
        )
    out = {
        "dim": config.dim,
        "multiple_of": config.multiple_of,
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "norm_eps": config.norm_eps,
        "vocab_size": -1,
    }
    if config.n_kv_heads is not None:
        out["n_kv_heads"] = config.n_kv_heads
    if config.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    if config.rope_theta != 10000.0:
        out["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        # Not a field of Meta's Llama 2 ModelArgs (its loader refuses unknown keys), but
        # the only way to keep a context-extended model's rotary scaling in this format.
        out["rope_scaling"] = dict(config.rope_scaling)
    return out


# ----- tensors and shards -----


def to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows -> half-split, per head (`view(n, H/2, 2, D)
    .transpose(1, 2)`)."""
    d = w.shape[1]
    return w.reshape(n_heads, -1, 2, d).transpose(0, 2, 1, 3).reshape(-1, d)


def to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    d = w.shape[1]
    return w.reshape(n_heads, 2, -1, d).transpose(0, 2, 1, 3).reshape(-1, d)


def _names(config: LlamaConfig):
    """(Meta name, HF name, split dim, permute) for every tensor of the model."""
    for meta, (hf, dim, perm) in _TOP.items():
        yield meta, hf, dim, perm
    for i in range(config.n_layers):
        for meta, (hf, dim, perm) in _LAYER.items():
            yield f"layers.{i}.{meta}", f"model.layers.{i}.{hf}", dim, perm


def shard_files(directory: str) -> list[str]:
    if not fs.isdir(directory):
        raise FileNotFoundError(f"Input directory not found: {directory}")
    names = sorted(f for f in fs.listdir(directory) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if not names or not fs.exists(fs.join(directory, "params.json")):
        raise FormatError(
            f"{directory} is not a Meta Llama checkpoint: expected params.json and "
            f"consolidated.NN.pth files, found {sorted(fs.listdir(directory))[:10]}"
        )
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(names))]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        raise FormatError(
            f"Shards of {directory} are not consolidated.00..{len(names) - 1:02d}.pth: missing "
            f"{missing}, unexpected {extra}"
        )
    return [fs.join(directory, n) for n in names]


# ----- Meta's checksums: md5sum's lines, `<md5>  <file name>` -----

CHECKLIST = "checklist.chk"
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
MAX_CHECKLIST_BYTES = 1 << 20  # a line per file of the directory: a few hundred bytes


def read_checklist(path: str) -> dict[str, str]:
    """File name -> md5 (hex) of an md5sum checklist; `FormatError` naming it when it is
    not one."""
    fs.require_file(path)
    if fs.getsize(path) > MAX_CHECKLIST_BYTES:
        raise FormatError(f"{path}: {fs.getsize(path):,} bytes is not an md5 checklist")
    try:
        text = fs.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not an md5 checklist ({e})") from None
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\\?([0-9a-fA-F]{32}) [ *](.+)", line.rstrip("\r"))
        if not m:
            raise FormatError(f"{path}: line {number} is not '<md5>  <file name>': {line[:100]!r}")
        sums[m.group(2)] = m.group(1).lower()
    return sums


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checklist(directory: str, names: list[str], checklist: str = CHECKLIST,
                     listed_only: bool = False) -> bool:  # fmt: skip
    """Checks the files `names` of `directory` that a conversion reads against the md5 sums
    of `directory/checklist`, each read once (on threads); False when there is no checklist.
    A shard or `params.json` it lists that is not among `names`, a file of `names` it does
    not list, or an md5 that differs: `FormatError` naming the file. `listed_only`: only the
    files of `names` it lists are checked (a tokenizer's directory holds other files)."""
    path = fs.join(directory, checklist)
    if not fs.exists(path):
        return False
    sums = read_checklist(path)
    if listed_only:
        names = [n for n in names if n in sums]
    unlisted = [n for n in names if n not in sums]
    if unlisted:
        raise FormatError(f"{directory}: {unlisted[0]} is read but {path} does not list it: "
                          "it cannot be verified")  # fmt: skip
    lost = sorted(n for n in sums if n not in names and _is_read(n) and not listed_only)
    if lost:
        raise FormatError(f"{path} lists {lost[0]}, which is not in {directory}")
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1) or 1) as pool:
        actual = dict(zip(names, pool.map(lambda n: _md5(fs.join(directory, n)), names),
                          strict=True))  # fmt: skip
    for name in names:
        if actual[name] != sums[name]:
            raise FormatError(
                f"{fs.join(directory, name)}: md5 {actual[name]} differs from {path}'s "
                f"{sums[name]}: the file is corrupt or not the one released"
            )
    return True


def _is_read(name: str) -> bool:
    """Whether a conversion from Meta's layout reads the file `name` of the shards' directory."""
    return name == "params.json" or re.fullmatch(r"consolidated\.\d+\.pth", name) is not None


def check_shard_count(config: LlamaConfig, shards: int) -> None:
    for what, size in (
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.kv_heads),
        ("dim", config.dim),
        ("the feed-forward width", config.hidden_dim),
        ("vocab_size", config.vocab_size),
    ):
        if size % shards:
            raise FormatError(f"{shards} shards do not fit {what} = {size}: it must divide it")


def read(directory: str) -> tuple[LlamaConfig, dict[str, Callable[[], np.ndarray]]]:
    """The config and, per Hugging Face tensor name, a function that loads that tensor (merged
    across shards, rotary rows permuted)."""
    files = shard_files(directory)
    shards = [load_pth(path) for path in files]
    if "tok_embeddings.weight" not in shards[0]:
        raise FormatError(f"{files[0]} has no tok_embeddings.weight")
    vocab = shards[0]["tok_embeddings.weight"].shape[0]
    params_path = fs.join(directory, "params.json")
    try:
        config = config_from_params(fs.read_json(params_path), vocab_size=vocab)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{params_path}: {e}") from e
    check_shard_count(config, len(files))
    check_layer_count(shards[0], r"layers\.(\d+)\.", config.n_layers, files[0])

    expected = {meta: (hf, dim, perm) for meta, hf, dim, perm in _names(config)}
    for path, shard in zip(files, shards, strict=True):
        names = set(shard) - set(IGNORED)
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or extra:
            raise FormatError(
                f"{path} does not match params.json: missing {missing[:5]}, unexpected {extra[:5]}"
            )
    # Every shape is checked before anything is loaded or written.
    hf_shapes = expected_hf_shapes(config)
    n = len(files)
    for meta, (hf, dim, _) in expected.items():
        want = hf_shapes[hf]
        if dim is not None:
            want = tuple(w // n if i == dim else w for i, w in enumerate(want))
        for path, shard in zip(files, shards, strict=True):
            if shard[meta].shape != tuple(want):
                raise FormatError(
                    f"{path}: {meta} has shape {shard[meta].shape}, but params.json implies {want}"
                )

    def loader(meta: str, hf: str, dim: int | None, perm: str | None):
        def load() -> np.ndarray:
            parts = [s[meta] for s in shards]
            w = (
                parts[0].load()
                if dim is None
                else np.concatenate([p.load() for p in parts], axis=dim)
            )
            if perm == "q":
                w = to_half_split(w, config.n_heads)
            elif perm == "k":
                w = to_half_split(w, config.kv_heads)
            return w

        return load

    return config, {hf: loader(meta, hf, dim, perm) for meta, (hf, dim, perm) in expected.items()}


def write(
    config: LlamaConfig, tensors: dict[str, Callable[[], np.ndarray]], directory: str, shards: int
) -> None:
    """Meta's layout with `shards` model-parallel shards (needs torch to write `.pth`). One
    shard is held in memory at a time (each input tensor is read once per shard)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("Writing Meta's .pth shards needs PyTorch: pip install torch") from e
    if config.head != "lm":
        raise ValueError(
            f"Meta's format holds language models only; this model has a {config.head!r} head "
            "(a reward model): convert it to hf (LlamaForSequenceClassification) or llamax"
        )
    check_shard_count(config, shards)
    h = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    for k in range(shards):
        out = {}
        for meta, hf, dim, perm in _names(config):
            w = tensors[hf]()
            if perm == "q":
                w = to_interleaved(w, config.n_heads)
            elif perm == "k":
                w = to_interleaved(w, config.kv_heads)
            piece = w if dim is None else np.split(w, shards, axis=dim)[k]
            out[meta] = _to_torch(torch, np.ascontiguousarray(piece))
        out["rope.freqs"] = _to_torch(torch, freqs.astype(np.float32))
        torch.save(out, os.path.join(directory, f"consolidated.{k:02d}.pth"))
        log.info("wrote consolidated.%02d.pth (%d of %d shards)", k, k + 1, shards)
        del out
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params_json(config), f, indent=2)


def _to_torch(torch, a: np.ndarray):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())
