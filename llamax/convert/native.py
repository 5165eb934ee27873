"""llamax's own checkpoint format, as the converter reads and writes it.

A converted llamax checkpoint is a directory with `config.json` (the `LlamaConfig`),
`checkpoints/0/` (orbax: `params` and `meta`), `tokenizer.model` when one was found, and
`manifest.json` (`llamax.convert.manifest`). It is what `llamax.load_pretrained` and a
training config's `init_from` read.

Reading is lazy (one layer's slice of one parameter at a time, through tensorstore), and so
is writing: orbax's numpy handler is made to write one leaf at a time, each stacked parameter
layer by layer from lazily built slices into one storage chunk per layer, with the next slices
prefetched on threads. Host memory stays near the size of the largest of one layer's matrices
and the embedding (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from llamax import fs, pretrained
from llamax.config import LlamaConfig
from llamax.convert import hf
from llamax.convert.formats import FormatError

log = logging.getLogger("llamax")
# Tensors by Hugging Face name, each loaded when called: the converter's common currency.
Tensors = dict[str, Callable[[], np.ndarray]]
# Parts being built (read, converted) on threads while an earlier one is written.
PREFETCH = 2


def read(path: str) -> tuple[LlamaConfig, Tensors]:
    """The config and lazy tensors of a llamax checkpoint or training workdir: each load reads
    one layer's slice. Its files are verified against the checksums recorded when it was
    written before anything is read (`pretrained.verified`), so that a conversion never makes
    a corrupt input into an output with a fresh manifest. A LoRA run's workdir reads as its
    base with its adapters merged in, the base being the one they were trained on."""
    if pretrained.lora_run(path) is not None:
        from llamax.convert import peft

        adapters, adapters_config, base = pretrained.run_adapters(path)
        pretrained.check_run_base(path, base)
        config, tensors = read(base)
        return peft.merged_tensors(config, tensors, adapters, adapters_config)
    config = pretrained.read_model_config(path)
    open_leaf = pretrained.open_param_leaves(path)
    expected = {
        "tok_embeddings": (config.vocab_size, config.dim),
        "norm.scale": (config.dim,),
        hf.HEAD[config.head][0]: (config.dim, config.vocab_size if config.head == "lm" else 1),
    }
    for (module, leaf), (_, kind) in hf.LAYER_MAP.items():
        expected[f"layers.{module}.{leaf}"] = (
            config.n_layers,
            *hf.llamax_layer_shape(kind, config),
        )
    leaves = {}
    for name, shape in expected.items():
        try:
            leaves[name] = open_leaf(name)
        except ValueError as e:
            raise FormatError(str(e)) from e
        if tuple(leaves[name].shape) != shape:
            raise FormatError(
                f"{path}: parameter {name} has shape {tuple(leaves[name].shape)}, "
                f"config.json implies {shape}"
            )

    def load(name, index=()):
        return np.asarray(leaves[name][index].read().result())

    tensors: Tensors = {
        "model.embed_tokens.weight": lambda: load("tok_embeddings"),
        "model.norm.weight": lambda: load("norm.scale"),
        hf.HEAD[config.head][1]: lambda: hf.transpose(load(hf.HEAD[config.head][0])),
    }
    for (module, leaf), (hf_name, kind) in hf.LAYER_MAP.items():
        for i in range(config.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = lambda m=module, lf=leaf, k=kind, i=i: (
                hf.layer_to_hf(load(f"layers.{m}.{lf}", i), k, config)
            )
    return config, tensors


class LazyArray:
    """An array made only when it is written, in `parts` equal slices along its first axis:
    `part(i)` builds slice i from the input (a stacked parameter: one layer per part)."""

    def __init__(self, shape, dtype, part: Callable[[int], np.ndarray], parts: int = 1):
        self.shape, self.dtype, self.part, self.parts = tuple(shape), np.dtype(dtype), part, parts
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize


class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """orbax's numpy handler, made to write one leaf at a time, each `LazyArray` part by part
    (building the next `PREFETCH` parts on threads while one is written), and without its
    defensive copy of every array. What it writes are ordinary numpy leaves to any reader."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)
        self._lock, self._stopped, self._in_flight = None, False, None

    def stop(self) -> None:
        """No write starts after this; returns once the one in flight (if any) is done, so
        that nothing writes into the output after the caller removes it."""
        self._stopped = True
        if self._in_flight is not None:
            with contextlib.suppress(Exception):
                self._in_flight.result()

    async def _open_and_write(self, value, tspec, ts_context):
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stopped:  # nothing more is written once a leaf has failed (its
                return  # error is the one the save raises) or the conversion was stopped
            try:
                await self._write(value, tspec, ts_context)
            except BaseException:
                self._stopped = True
                raise

    async def _write(self, value, tspec, ts_context):
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        if not isinstance(value, LazyArray):
            self._in_flight = t.write(value)
            await self._in_flight
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
                if self._stopped:
                    return
                self._in_flight = t[i * rows : (i + 1) * rows].write(part)
                await self._in_flight


def _streaming_handler(handler: StreamingNumpyHandler) -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler), (LazyArray, handler), (jax.Array, ocp.type_handlers.ArrayHandler())
    )
    return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def write(config: LlamaConfig, tensors: Tensors, directory: str, dtype: str) -> None:
    """Writes `tensors` (Hugging Face names) as a llamax checkpoint of `dtype` parameters into
    `directory`, holding one layer of one parameter at a time, or the embedding or output
    matrix."""
    np_dtype = np.dtype(dtype)
    params: dict = {"layers": {}}
    save_args: dict = {"layers": {}}
    count, written = len(hf.LAYER_MAP) + 3, []

    def lazy(name, shape, make, parts=1):
        def part(i):
            out = np.ascontiguousarray(make(i), np_dtype)
            if i == parts - 1:
                written.append(name)
                log.info("converted %s (%d of %d parameters)", name, len(written), count)
            return out

        return LazyArray(shape, np_dtype, part, parts)

    for (module, leaf), (hf_name, kind) in hf.LAYER_MAP.items():
        shape = (config.n_layers, *hf.llamax_layer_shape(kind, config))

        def layer(i, hf_name=hf_name, kind=kind):
            return hf.layer_to_llamax(tensors[f"model.layers.{i}.{hf_name}"](), kind, config)[None]

        stack = lazy(f"layers/{module}/{leaf}", shape, layer, config.n_layers)
        params["layers"].setdefault(module, {})[leaf] = stack
        # One storage chunk per layer, so that each layer is written once, whole.
        save_args["layers"].setdefault(module, {})[leaf] = ocp.SaveArgs(shard_axes=(0,))
    d, v = config.dim, config.vocab_size
    params["tok_embeddings"] = lazy(
        "tok_embeddings", (v, d), lambda _: tensors["model.embed_tokens.weight"]()
    )
    params["norm"] = {"scale": lazy("norm/scale", (d,), lambda _: tensors["model.norm.weight"]())}
    head, hf_head = hf.HEAD[config.head]
    out = v if config.head == "lm" else 1
    params[head] = lazy(head, (d, out), lambda _: hf.transpose(tensors[hf_head]()))
    save_args.update({"tok_embeddings": ocp.SaveArgs(), head: ocp.SaveArgs()})
    save_args["norm"] = {"scale": ocp.SaveArgs()}

    handler = StreamingNumpyHandler()
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(directory, "checkpoints")),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_handlers={"params": _streaming_handler(handler), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        manager.save(
            0,
            args=ocp.args.Composite(
                params=ocp.args.PyTreeSave(params, save_args=save_args),
                meta=ocp.args.JsonSave({"step": 0, "converted": True, "config": config.to_dict()}),
            ),
        )
        manager.wait_until_finished()
    except BaseException:  # a failed read, or Ctrl-C / SIGTERM: stop writing before cleanup
        handler.stop()
        raise
    finally:
        manager.close()
    fs.write_text(os.path.join(directory, "config.json"), config.to_json())
