"""Conversion between Meta's release layout, Hugging Face, and llamax checkpoints.

Every conversion passes tensors one at a time in Hugging Face's names and layout (the common
currency of `meta.py` and `hf.py`). Meta and Hugging Face inputs are read lazily, tensor by
tensor; a llamax output stacks each layer parameter on the `layers` axis in a scratch file
mapped from disk. The final orbax write still holds the whole model in memory (see
docs/performance.md); making it streaming is open work. Output goes to a temporary
directory that is renamed to the output path only when complete, with a `manifest.json`
(files, sizes, sha256; parameter shapes and dtypes) that `verify` checks.

A llamax checkpoint directory holds `config.json` (the LlamaConfig), `checkpoints/0/`
(orbax: `params` and `meta`), `tokenizer.model` when one was found, and `manifest.json`. It is
what `llamax.load_pretrained` and the training config's `init_from` read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import numpy as np

from llamax.config import LlamaConfig
from llamax.convert import hf, meta
from llamax.convert.formats import FormatError

log = logging.getLogger("llamax")
FORMATS = ("meta", "hf", "llamax")
Tensors = dict[str, Callable[[], np.ndarray]]


# ----- llamax checkpoints -----


def read_model_config(path: str) -> LlamaConfig:
    """The LlamaConfig of a converted checkpoint or of a training run's workdir."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"No config.json in {path}: not a llamax checkpoint or workdir")
    with open(config_path) as f:
        d = json.load(f)
    if "model" in d and isinstance(d["model"], dict) and "resolved" in d["model"]:
        return LlamaConfig.from_dict(d["model"]["resolved"])
    return LlamaConfig.from_dict(d)


def read_llamax(path: str) -> tuple[LlamaConfig, Tensors]:
    from llamax.checkpoint import load_pretrained

    model, params = load_pretrained(path, dtype="float32")
    config = model.config
    tensors: Tensors = {
        "model.embed_tokens.weight": lambda: np.asarray(params["tok_embeddings"]),
        "model.norm.weight": lambda: np.asarray(params["norm"]["scale"]),
        "lm_head.weight": lambda: np.asarray(params["output"]).T,
    }
    for (module, leaf), (hf_name, kind) in hf._LAYER_MAP.items():
        for i in range(config.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = lambda m=module, lf=leaf, k=kind, i=i: (
                hf._layer_to_hf(np.asarray(params["layers"][m][lf][i]), k, config)
            )
    return config, tensors


def write_llamax(config: LlamaConfig, tensors: Tensors, directory: str) -> None:
    import orbax.checkpoint as ocp

    dtype = np.dtype(config.weight_dtype)
    scratch = os.path.join(directory, ".scratch")
    os.makedirs(scratch)

    def disk(name, shape):
        return np.memmap(os.path.join(scratch, name), dtype=dtype, mode="w+", shape=shape)

    params: dict = {"layers": {}}
    for (module, leaf), (hf_name, kind) in hf._LAYER_MAP.items():
        first = hf._layer_to_llamax(tensors[f"model.layers.0.{hf_name}"](), kind, config)
        stacked = disk(f"{module}.{leaf}", (config.n_layers, *first.shape))
        stacked[0] = first
        for i in range(1, config.n_layers):
            stacked[i] = hf._layer_to_llamax(tensors[f"model.layers.{i}.{hf_name}"](), kind, config)
        params["layers"].setdefault(module, {})[leaf] = stacked
    params["tok_embeddings"] = np.asarray(tensors["model.embed_tokens.weight"](), dtype)
    params["norm"] = {"scale": np.asarray(tensors["model.norm.weight"](), dtype)}
    params["output"] = np.ascontiguousarray(np.asarray(tensors["lm_head.weight"](), dtype).T)

    # The limits cap the bytes in flight to disk, but orbax still copies every leaf into
    # memory before writing (bench/convert_memory.py: 1.15x the checkpoint in anonymous
    # memory), so the write is not yet streaming. No compression: weights barely compress.
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_compression=False
    )
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(directory, "checkpoints")),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_handlers={"params": handler, "meta": ocp.JsonCheckpointHandler()},
    )
    manager.save(
        0,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(params),
            meta=ocp.args.JsonSave({"step": 0, "converted": True, "config": config.to_dict()}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    del params
    shutil.rmtree(scratch)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json())


# ----- manifest -----


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != "manifest.json":
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str, config: LlamaConfig, fmt: str) -> None:
    manifest = {
        "format": fmt,
        "config": config.to_dict(),
        "parameters": {
            name: {"shape": list(shape), "dtype": config.param_dtype}
            for name, shape in hf.expected_hf_shapes(config).items()
        },
        "files": {
            rel: {
                "bytes": os.path.getsize(os.path.join(directory, rel)),
                "sha256": _sha256(os.path.join(directory, rel)),
            }
            for rel in _files(directory)
        },
    }
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def verify(directory: str) -> list[str]:
    """The problems found in a converted directory against its manifest (empty: all good)."""
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        return [f"no manifest.json in {directory}"]
    with open(path) as f:
        manifest = json.load(f)
    problems = []
    present = set(_files(directory))
    for rel, info in manifest["files"].items():
        full = os.path.join(directory, rel)
        if rel not in present:
            problems.append(f"missing file {rel}")
        elif os.path.getsize(full) != info["bytes"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, manifest says {info['bytes']}")
        elif _sha256(full) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(manifest["files"]))]
    return problems


# ----- conversion -----


def _find_tokenizer(input_dir: str, explicit: str | None) -> str | None:
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"Tokenizer not found: {explicit}")
        return explicit
    for candidate in (input_dir, os.path.dirname(os.path.abspath(input_dir))):
        path = os.path.join(candidate, "tokenizer.model")
        if os.path.isfile(path):
            return path
    return None


def read(fmt: str, directory: str) -> tuple[LlamaConfig, Tensors]:
    if fmt == "meta":
        return meta.read(directory)
    if fmt == "hf":
        return hf.read(directory)
    if fmt == "llamax":
        return read_llamax(directory)
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}")


def convert(
    src: str,
    dst: str,
    input_dir: str,
    output_dir: str,
    shards: int = 1,
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> LlamaConfig:
    """Converts `input_dir` (format `src`) to `output_dir` (format `dst`), atomically."""
    if dst not in FORMATS or src not in FORMATS:
        raise ValueError(f"Formats must be among {FORMATS}; got --from {src} --to {dst}")
    if os.path.exists(output_dir):
        raise FileExistsError(f"Output {output_dir} exists; remove it or choose another path")
    start = time.perf_counter()
    config, tensors = read(src, input_dir)
    source_dtype = tensors["model.norm.weight"]().dtype.name
    target = dtype or (
        source_dtype if source_dtype in ("float32", "bfloat16", "float16") else "float32"
    )
    config = config.replace(param_dtype=target)
    cast = np.dtype(config.weight_dtype)
    tensors = {k: (lambda f=f: np.asarray(f(), dtype=cast)) for k, f in tensors.items()}
    tokenizer_path = _find_tokenizer(input_dir, tokenizer)
    if tokenizer_path:
        from llamax.data.tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer_path).vocab_size
        if vocab != config.vocab_size:
            raise FormatError(
                f"{tokenizer_path} has {vocab} pieces but the weights have a "
                f"{config.vocab_size}-row embedding"
            )

    tmp = f"{os.path.abspath(output_dir).rstrip('/')}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        if dst == "llamax":
            write_llamax(config, tensors, tmp)
        elif dst == "hf":
            hf.write(config, tensors, tmp)
        else:
            meta.write(config, tensors, tmp, shards)
        if tokenizer_path:
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        write_manifest(tmp, config, dst)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "converted %s (%s) to %s (%s): %s parameters, %s, in %.1fs",
        input_dir, src, output_dir, dst, f"{config.num_params():,}", config.param_dtype,
        time.perf_counter() - start,
    )  # fmt: skip
    return config
