"""Reading llamax checkpoints: a converted one, or a training run's workdir.

Both hold `config.json` (a converted checkpoint: the `LlamaConfig`; a workdir: the resolved
experiment config, whose `model.resolved` is the `LlamaConfig`) and orbax checkpoints, each
with a `params` item: directly under `checkpoints/`. The latest complete step is the one read.

This module is what `llamax.checkpoint` (the training manager, `init_from`) and
`llamax.convert` (the llamax format) share: the checkpoint directory, its latest step, the
model config, shape checks, restoring the parameters onto shardings, lazy per-slice reads of
them, and `load_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llamax import fs, lora, sharding
from llamax.config import LlamaConfig
from llamax.execution import Execution
from llamax.lora import LoraConfig
from llamax.model import Llama, abstract_params, trained_with_adapters


def checkpoint_dir(path: str) -> str:
    """`path/checkpoints` when `path` is a run's workdir or a converted checkpoint, else `path`."""
    nested = fs.join(path, "checkpoints")
    return nested if fs.isdir(nested) else path


def latest(path: str, what: str = "checkpoint") -> tuple[str, int]:
    """(checkpoint directory, latest complete step) under `path` (a workdir, a converted
    checkpoint, their `checkpoints/`, or one step's directory `checkpoints/N`); a clear error
    when there is none. `what` names the caller's input in the error ("init_from", ...)."""
    path = fs.absolute(path)
    name = os.path.basename(path)
    if name.isdigit() and fs.isdir(fs.join(path, "params")):  # one step's directory
        return os.path.dirname(path), int(name)
    directory = checkpoint_dir(path)
    if not fs.isdir(directory):
        raise FileNotFoundError(f"{what}: no checkpoint directory at {path}")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"{what}: no complete checkpoint in {directory}")
    return directory, step


def _params_item(path: str, what: str) -> tuple[epath.Path, int]:
    """The `params` item of the latest checkpoint under `path`, read on its own (the other
    items of a training checkpoint need handlers this module does not know)."""
    directory, step = latest(path, what)
    return epath.Path(directory) / str(step) / "params", step


def saved_params(path: str, what: str = "checkpoint"):
    """The tree of the latest checkpoint's parameter metadata (shape, dtype per leaf)."""
    item, _ = _params_item(path, what)
    return ocp.StandardCheckpointHandler().metadata(item)


def _convert_first(path: str, fmt: str) -> ValueError:
    out = fs.absolute(path) + "-llamax"
    return ValueError(
        f"{path} is a {'Hugging Face' if fmt == 'hf' else 'Meta'} checkpoint: convert it first, "
        f"llamax-convert --from {fmt} --to llamax --input {path} --output {out}"
    )


def read_model_config(path: str) -> LlamaConfig:
    """The LlamaConfig of a converted checkpoint or of a training run's workdir."""
    if not fs.isdir(path):
        raise FileNotFoundError(f"No checkpoint at {path}")
    config_path = fs.join(path, "config.json")
    if not fs.exists(config_path):
        if fs.exists(fs.join(path, "params.json")):
            raise _convert_first(path, "meta")
        raise FileNotFoundError(f"No config.json in {path}: not a llamax checkpoint or workdir")
    try:
        d = fs.read_json(config_path)
    except ValueError as e:
        raise ValueError(f"{config_path}: not JSON ({e})") from e
    if isinstance(d, dict) and "model_type" in d:
        raise _convert_first(path, "hf")
    try:
        if isinstance(d, dict) and isinstance(d.get("model"), dict) and "resolved" in d["model"]:
            d = d["model"]["resolved"]
        return LlamaConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: not a llamax model config: {e}") from e


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_shapes(saved, abstract_params, where: str, partial: bool = False) -> None:
    """Names the first parameter whose shape differs between a checkpoint's metadata (`saved`)
    and the model's abstract parameters; `partial`: of the model's only (the checkpoint may
    hold more)."""
    saved_flat = {
        _path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    want_flat = {
        _path_name(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    names = set(want_flat) if partial else set(saved_flat) | set(want_flat)
    for name in sorted(names):
        if saved_flat.get(name) != want_flat.get(name):
            raise ValueError(
                f"Checkpoint {where} does not fit the model: parameter {name!r} has shape "
                f"{saved_flat.get(name, 'missing')} in the checkpoint but "
                f"{want_flat.get(name, 'missing')} in the model (check the model config)"
            )


def with_shardings(tree, shardings):
    """Abstract arrays (shape, dtype) placed on `shardings`: orbax's restore targets."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def restore_params(path: str, abstract, shardings, what: str = "checkpoint", partial: bool = False):
    """(parameters, step) of the latest checkpoint under `path` (a workdir or a converted
    checkpoint), cast to `abstract`'s dtypes and placed on `shardings`: `init_from` and
    `load_pretrained`. `partial`: `abstract`'s parameters only, each of which the checkpoint
    must hold, the others it holds left unread (a language model's body without its output,
    a LoRA base without the head that trains beside the adapters)."""
    item, step = _params_item(path, what)
    check_shapes(ocp.StandardCheckpointHandler().metadata(item), abstract, str(item.parent),
                 partial)  # fmt: skip
    target = with_shardings(abstract, shardings)
    if partial:
        handler = ocp.PyTreeCheckpointHandler()
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )  # fmt: skip
    else:
        handler, args = ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(target)
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(item, args=args), step


def lora_run(path: str) -> tuple[LoraConfig, str] | None:
    """(its LoRA config, its base) when `path` is the workdir of a LoRA run, else None."""
    recorded = fs.join(path, "config.json")
    if not fs.isfile(recorded):
        return None
    c = fs.read_json(recorded)
    adapters = lora.from_section((c.get("lora") or {}) if isinstance(c, dict) else {})
    return None if adapters is None else (adapters, c["init_from"])


def base_fingerprint(path: str) -> dict:
    """What identifies a LoRA run's base: its path, latest step, and the checksum of its
    `manifest.json` (a converted checkpoint's; None for a training workdir)."""
    manifest = fs.join(fs.expand(path), "manifest.json")
    return {
        "path": fs.absolute(fs.expand(path)),
        "step": latest(path, "init_from")[1],
        "manifest_sha256": fs.sha256(manifest) if fs.isfile(manifest) else None,
    }


def check_same_base(
    recorded: dict | None, path: str, what: str = "init_from", dpo: bool = False
) -> None:
    """LoRA adapters meet the base they were trained on (a resumed run, or adapters loaded on
    a base), a resumed DPO run (`dpo`) the reference it started with: the recorded checksum
    (else the step) must match the checkpoint now at `path`; `what` names the caller's input
    in the error."""
    if not recorded:
        return
    now = base_fingerprint(path)
    key = "manifest_sha256" if recorded.get("manifest_sha256") else "step"
    if recorded.get(key) != now[key]:
        subject, rule = (
            ("The DPO run's reference model was", "a run keeps the reference it started with")
            if dpo else ("The LoRA adapters were trained on the base",
                         "adapters only fit the base they were trained on")
        )  # fmt: skip
        raise ValueError(
            f"{subject} {recorded['path']} ({key} {recorded.get(key)}), but {what} {path} has "
            f"{key} {now[key]}: {rule}. Point {what} at {recorded['path']} as it was."
        )


def _recorded_base(path: str) -> dict | None:
    """The base fingerprint a LoRA run's latest checkpoint recorded (None if it has none)."""
    directory, step = latest(path)
    item = epath.Path(directory) / str(step) / "meta"
    if not item.exists():
        return None
    meta = ocp.JsonCheckpointHandler().restore(item, ocp.args.JsonRestore())
    return meta.get("lora_base") if isinstance(meta, dict) else None


def read_adapters(path: str, config: LlamaConfig) -> tuple[dict, LoraConfig, LlamaConfig]:
    """LoRA adapters for a base of `config` (float32 numpy, layers stacked), their config, and
    the model they make of the base: a PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`), or the workdir of a llamax LoRA run (its latest checkpoint);
    clear errors for anything else and for adapters of another model's shapes. The tree holds
    the parameters trained beside the adapters too (`model.trained_with_adapters`: a reward
    model's score head, PEFT's `modules_to_save`), and the model's head is the adapters' (a
    LoRA reward model on a language model's body is a reward model)."""
    from llamax.convert import peft

    if fs.isfile(fs.join(path, peft.CONFIG_FILE)):
        tree, adapters_config = peft.import_adapters(path, config)
        return tree, adapters_config, peft.adapted_config(config, tree)
    if not fs.isdir(path):
        raise FileNotFoundError(f"adapters: no directory at {path}")
    if lora_run(path) is None:
        raise ValueError(
            f"adapters: {path} is neither a PEFT adapter directory (no {peft.CONFIG_FILE}) "
            "nor the workdir of a llamax LoRA run (lora.rank > 0)"
        )
    adapters, adapters_config, _ = run_adapters(path)
    adapted = config.replace(head=read_model_config(path).head)
    want = lora.split(abstract_params(Llama(adapted, Execution(), adapters_config)),
                      trained_with_adapters(adapted))[1]  # fmt: skip
    check_shapes(adapters, nn.unbox(want), path)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    return tree, adapters_config, adapted


def run_adapters(path: str) -> tuple[dict, LoraConfig, str]:
    """(what a LoRA run trained as numpy arrays, layers stacked: its adapters, and the
    parameters trained beside them, `model.trained_with_adapters`; its LoRA config; its base
    path) from the run's latest checkpoint, read leaf by leaf."""
    adapted = lora_run(path)
    if adapted is None:
        raise ValueError(f"{path} is not the workdir of a LoRA run (lora.rank > 0)")
    adapters_config, base = adapted
    config = read_model_config(path)
    model = Llama(config, Execution(), adapters_config)
    want = nn.unbox(lora.split(abstract_params(model), trained_with_adapters(config))[1])
    open_leaf = open_param_leaves(path)

    def read(keys, x):
        name = _path_name(keys).replace("/", ".")
        leaf = open_leaf(name)
        if tuple(leaf.shape) != tuple(x.shape):
            raise ValueError(f"{path}: adapter {name} has shape {tuple(leaf.shape)}, the "
                             f"run's config implies {tuple(x.shape)}")  # fmt: skip
        return np.asarray(leaf.read().result())

    return jax.tree_util.tree_map_with_path(read, want), adapters_config, base


def load_pretrained(
    path: str,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    adapters: str | None = None,
    **execution,
):
    """`(model, params)` from a converted checkpoint or a training run's workdir: the latest
    checkpoint's parameters, in their stored dtype, on `mesh` (default: one device), and the
    model computing in `dtype`. The attention backend is `auto` (the platform's fused kernel
    where it applies); `execution` overrides any `Execution` field (`attention="xla"`, ...).

    LoRA: `adapters` (a PEFT adapter directory or a LoRA run's workdir) are merged into the
    base `path`'s weights (W + s A B, in float32); a LoRA run's workdir given as `path` reads as
    its recorded base with its adapters. Adapters of a llamax run must meet the base they
    were trained on (its manifest checksum, else its step). Adapters that trained a head
    beside them (a LoRA reward model's score head) bring it: the model has their head, its
    body read from the base (a language model's, without its output)."""
    adapted = lora_run(path)
    if adapted is not None:  # a LoRA run: its base, with the adapters merged in
        if adapters:
            raise ValueError(
                f"{path} is a LoRA run (adapters on the base {adapted[1]}): load it alone, or "
                "give its base as the checkpoint and the run as the adapters"
            )
        return load_pretrained(adapted[1], dtype, mesh, adapters=path, **execution)
    config = read_model_config(path)
    stored = np.dtype(jax.tree.leaves(saved_params(path))[0].dtype).name
    run = Execution(dtype=dtype, param_dtype=stored, attention="auto")
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    if not adapters:
        model = Llama(config, run.replace(**execution))
        boxed = abstract_params(model)
        params, _ = restore_params(path, nn.unbox(boxed), sharding.tree_shardings(boxed, mesh))
        return model, params
    tree, adapters_config, config = read_adapters(adapters, config)
    if lora_run(adapters) is not None:
        check_same_base(_recorded_base(adapters), path, "the base")
    model = Llama(config, run.replace(**execution))
    # What trains beside the adapters and they bring (a PEFT adapter of a language model on
    # a reward model keeps the base's score head).
    trained = tuple(k for k in trained_with_adapters(config) if k in tree)
    base, boxed = lora.split(abstract_params(Llama(config, model.execution, adapters_config)),
                             trained)  # fmt: skip
    params, _ = restore_params(path, nn.unbox(base), sharding.tree_shardings(base, mesh),
                               partial=True)  # fmt: skip
    # What trained beside the adapters in the base's stored dtype, as the merged weights
    # will be (the adapters stay float32 until the merge).
    tree = {k: jax.tree.map(lambda x: x.astype(stored), v) if k in trained else v
            for k, v in tree.items()}  # fmt: skip
    tree = jax.device_put(tree, sharding.tree_shardings(boxed, mesh))
    return model, lora.merge(lora.combine(params, tree), adapters_config)


def open_param_leaves(path: str) -> Callable[[str], Any]:
    """`open(leaf_name)` -> a tensorstore array of one parameter of the latest checkpoint
    under `path` ("layers.attention.wq", ...): it reads only the slices asked for."""
    import tensorstore as ts

    directory, step = latest(path)
    params = fs.join(directory, str(step), "params")
    ocdbt = fs.exists(fs.join(params, "manifest.ocdbt"))

    def open_leaf(name: str):
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": fs.kvstore(params), "path": name}
        else:
            kvstore = fs.kvstore(fs.join(params, name))
        errors = []
        for driver in ("zarr", "zarr3"):  # orbax writes zarr v2 by default, v3 on request
            try:
                return ts.open({"driver": driver, "kvstore": kvstore}, open=True).result()
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{params}: cannot read parameter {name}: {errors[-1]}")

    return open_leaf


def load_with_tokenizer(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    adapters: str | None = None,
    head: str = "lm",
    **execution,
):
    """`(model, params, tokenizer)` for generating or evaluating with a checkpoint (and LoRA
    `adapters` merged in, as `load_pretrained`) and its tokenizer (`checkpoint_tokenizer`).
    The model must have the `head` the caller needs (`LlamaConfig.head`: "lm" to generate and
    evaluate, "score" to score)."""
    model, params = load_pretrained(path, dtype=dtype, adapters=adapters, **execution)
    if model.config.head != head:
        kinds = {"lm": "a language model", "score": "a reward model (a score head)"}
        what = f"{path} with the adapters {adapters}" if adapters else path
        raise ValueError(f"{what} is {kinds[model.config.head]}; this needs {kinds[head]}")
    loaded = checkpoint_tokenizer(path, tokenizer, model.config.vocab_size)
    return model, params, loaded


def checkpoint_tokenizer(path: str, tokenizer: str | None, vocab_size: int):
    """The tokenizer of the checkpoint at `path`: its own `tokenizer.model` (converted
    checkpoints and training workdirs keep one), or `tokenizer`, refused when it is not the
    checkpoint's (a different file gives other ids: outputs that mean nothing) or has more ids
    than the model's `vocab_size`."""
    from llamax.data.tokenizer import Tokenizer

    own = fs.join(path, "tokenizer.model")
    if tokenizer and fs.exists(own) and fs.sha256(own) != fs.sha256(tokenizer):
        raise ValueError(
            f"{tokenizer} is not the tokenizer of {path} ({own} differs): leave out "
            "--tokenizer to use the checkpoint's own"
        )
    if not tokenizer and not fs.exists(own):
        raise FileNotFoundError(f"No tokenizer.model in {path}: pass --tokenizer")
    loaded = Tokenizer(tokenizer or own)
    if loaded.vocab_size > vocab_size:
        raise ValueError(
            f"{loaded.path} has {loaded.vocab_size} pieces, more than the model's vocabulary "
            f"({vocab_size}): not this model's tokenizer"
        )
    return loaded
