"""Conversion between Meta's release layout, Hugging Face, and llamax checkpoints.

Every conversion passes tensors one at a time in Hugging Face's names and layout (the common
currency of `meta.py` and `hf.py`). Meta and Hugging Face inputs are read lazily, tensor by
tensor; a llamax output is written by orbax one layer of one parameter at a time (each
stacked parameter stored as one chunk per layer), so host memory stays near the size of the
largest of one layer's matrices and the embedding (docs/performance.md). Output goes to a temporary
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
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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


def _leaf_readers(path: str) -> Callable[[str], Any]:
    """`open(leaf_name)` -> a tensorstore array for the parameters of the latest checkpoint
    under `path` (converted or a training workdir): reads only the slices asked for."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    from llamax.checkpoint import checkpoint_dir

    directory = os.path.abspath(checkpoint_dir(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No llamax checkpoint at {path}")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {directory}")
    params = os.path.join(directory, str(step), "params")
    ocdbt = os.path.exists(os.path.join(params, "manifest.ocdbt"))

    def open_leaf(name: str):
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{params}", "path": name}
        else:
            kvstore = {"driver": "file", "path": os.path.join(params, name)}
        errors = []
        for driver in ("zarr", "zarr3"):  # orbax writes zarr v2 by default, v3 on request
            try:
                return ts.open({"driver": driver, "kvstore": kvstore}, open=True).result()
            except ValueError as e:
                errors.append(str(e))
        raise FormatError(f"{params}: cannot read parameter {name}: {errors[-1]}")

    return open_leaf


def read_llamax(path: str) -> tuple[LlamaConfig, Tensors]:
    """The config and lazy tensors of a llamax checkpoint: each load reads one layer's slice."""
    config = read_model_config(path)
    open_leaf = _leaf_readers(path)
    expected = {
        "tok_embeddings": (config.vocab_size, config.dim),
        "norm.scale": (config.dim,),
        "output": (config.dim, config.vocab_size),
    }
    for (module, leaf), (_, kind) in hf._LAYER_MAP.items():
        expected[f"layers.{module}.{leaf}"] = (
            config.n_layers,
            *hf.llamax_layer_shape(kind, config),
        )
    leaves = {}
    for name, shape in expected.items():
        leaves[name] = open_leaf(name)
        if tuple(leaves[name].shape) != shape:
            raise FormatError(
                f"{path}: parameter {name} has shape {tuple(leaves[name].shape)}, "
                f"config.json implies {shape}"
            )
    config = config.replace(param_dtype=np.dtype(leaves["norm.scale"].dtype.numpy_dtype).name)

    def read(name, index=()):
        return np.asarray(leaves[name][index].read().result())

    tensors: Tensors = {
        "model.embed_tokens.weight": lambda: read("tok_embeddings"),
        "model.norm.weight": lambda: read("norm.scale"),
        "lm_head.weight": lambda: hf.transpose(read("output")),
    }
    for (module, leaf), (hf_name, kind) in hf._LAYER_MAP.items():
        for i in range(config.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = lambda m=module, lf=leaf, k=kind, i=i: (
                hf._layer_to_hf(read(f"layers.{m}.{lf}", i), k, config)
            )
    return config, tensors


# Parts being built (read, converted) on threads while an earlier one is written.
PREFETCH = 2


class LazyArray:
    """An array made only when it is written, in `parts` equal slices along its first axis:
    `part(i)` builds slice i from the input (a stacked parameter: one layer per part)."""

    def __init__(self, shape, dtype, part: Callable[[int], np.ndarray], parts: int = 1):
        self.shape, self.dtype, self.part, self.parts = tuple(shape), np.dtype(dtype), part, parts
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize


def _streaming_handler():
    """orbax's numpy handler, made to write one leaf at a time, each `LazyArray` part by part
    (building the next `PREFETCH` parts on threads while one is written), and without its
    defensive copy of every array. What it writes are ordinary numpy leaves to any reader."""
    import asyncio

    import jax
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)
            self._lock, self._failed = None, False

        async def _open_and_write(self, value, tspec, ts_context):
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._failed:  # nothing more is written once a leaf has failed (its
                    return  # error is the one the save raises)
                try:
                    await self._write(value, tspec, ts_context)
                except BaseException:
                    self._failed = True
                    raise

        async def _write(self, value, tspec, ts_context):
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            if not isinstance(value, LazyArray):
                await t.write(value)
                return
            rows = value.shape[0] // value.parts
            with ThreadPoolExecutor(PREFETCH) as pool:
                pending = [pool.submit(value.part, i) for i in range(min(PREFETCH, value.parts))]
                for i in range(value.parts):
                    part = await asyncio.wrap_future(pending.pop(0))
                    if part.shape != (rows, *value.shape[1:]) or part.dtype != value.dtype:
                        raise FormatError(
                            f"part {i} of a {value.shape} array: {part.shape} {part.dtype}"
                        )
                    if i + PREFETCH < value.parts:
                        pending.append(pool.submit(value.part, i + PREFETCH))
                    await t[i * rows : (i + 1) * rows].write(part)

    handler = StreamingNumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler), (LazyArray, handler), (jax.Array, ocp.type_handlers.ArrayHandler())
    )
    return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def write_llamax(config: LlamaConfig, tensors: Tensors, directory: str) -> None:
    """Writes `tensors` (Hugging Face names) as a llamax checkpoint into `directory`, holding
    one layer of one parameter at a time, or the embedding or output matrix."""
    import orbax.checkpoint as ocp

    dtype = np.dtype(config.weight_dtype)
    params: dict = {"layers": {}}
    save_args: dict = {"layers": {}}
    count, written = len(hf._LAYER_MAP) + 3, []

    def lazy(name, shape, make, parts=1):
        def part(i):
            out = np.ascontiguousarray(make(i), dtype)
            if i == parts - 1:
                written.append(name)
                log.info("converted %s (%d of %d parameters)", name, len(written), count)
            return out

        return LazyArray(shape, dtype, part, parts)

    for (module, leaf), (hf_name, kind) in hf._LAYER_MAP.items():
        shape = (config.n_layers, *hf.llamax_layer_shape(kind, config))

        def layer(i, hf_name=hf_name, kind=kind):
            w = hf._layer_to_llamax(tensors[f"model.layers.{i}.{hf_name}"](), kind, config)
            return w[None]

        stack = lazy(f"layers/{module}/{leaf}", shape, layer, config.n_layers)
        params["layers"].setdefault(module, {})[leaf] = stack
        # One storage chunk per layer, so that each layer is written once, whole.
        save_args["layers"].setdefault(module, {})[leaf] = ocp.SaveArgs(shard_axes=(0,))
    d, v = config.dim, config.vocab_size
    params["tok_embeddings"] = lazy(
        "tok_embeddings", (v, d), lambda _: tensors["model.embed_tokens.weight"]()
    )
    params["norm"] = {"scale": lazy("norm/scale", (d,), lambda _: tensors["model.norm.weight"]())}
    params["output"] = lazy("output", (d, v), lambda _: hf.transpose(tensors["lm_head.weight"]()))
    save_args.update(tok_embeddings=ocp.SaveArgs(), output=ocp.SaveArgs())
    save_args["norm"] = {"scale": ocp.SaveArgs()}

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(directory, "checkpoints")),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_handlers={"params": _streaming_handler(), "meta": ocp.JsonCheckpointHandler()},
    )
    manager.save(
        0,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(params, save_args=save_args),
            meta=ocp.args.JsonSave({"step": 0, "converted": True, "config": config.to_dict()}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json())


# ----- manifest -----


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_files(directory: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file, on as many threads as cores (hashlib releases the GIL)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        digests = pool.map(lambda rel: _sha256(os.path.join(directory, rel)), names)
        return dict(zip(names, digests, strict=True))


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
            rel: {"bytes": os.path.getsize(os.path.join(directory, rel)), "sha256": digest}
            for rel, digest in _hash_files(directory, _files(directory)).items()
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
    to_hash = []
    for rel, info in manifest["files"].items():
        full = os.path.join(directory, rel)
        if rel not in present:
            problems.append(f"missing file {rel}")
        elif os.path.getsize(full) != info["bytes"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, manifest says {info['bytes']}")
        else:
            to_hash.append(rel)
    for rel, digest in _hash_files(directory, to_hash).items():
        if digest != manifest["files"][rel]["sha256"]:
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
