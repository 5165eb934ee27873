"""Reading llamax checkpoints: a converted one, or a training run's workdir.

Both hold `config.json` (a converted checkpoint: the `LlamaConfig`; a workdir: the resolved
experiment config, whose `model.resolved` is the `LlamaConfig`) and orbax checkpoints, each
with a `params` item: directly under `checkpoints/`. The latest complete step is the one read.

This module is what `llamax.checkpoint` (the training manager, `init_from`) and
`llamax.convert` (the llamax format) share: the checkpoint directory, its latest step, the
model config, shape checks, restoring the parameters onto shardings, lazy per-slice reads of
them (loading a model to run it, adapters and tokenizer included, is `llamax.loading`'s).

Every read of a step is verified first (`verified`): its files are hashed against the
checksums recorded when it was written (a training step's `checksums.json`, a converted
checkpoint's `manifest.json`), once per process, before any tensor is read. A base or a
reference is identified by that recorded content (`base_fingerprint`), not by its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llamax import fs, lora
from llamax.config import LlamaConfig
from llamax.execution import Execution
from llamax.lora import LoraConfig
from llamax.model import Llama, abstract_params, trained_with_adapters

log = logging.getLogger("llamax")


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


# ----- integrity: what is read is what was written -----

CHECKSUMS = "checksums.json"  # a training step's record: relative path -> digest
MANIFEST = "manifest.json"  # a converted checkpoint's: its files, each {bytes, sha256}
# The items of a step that a model reader reads: the parameters, and `meta` (a LoRA run's
# record of its base); never the optimizer state, twice the parameters again with Adam.
READ_ITEMS = ("params/", "meta/")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files differ from the checksums recorded when it was written."""


def differences(directory: str, recorded: dict, present: set[str]) -> list[str]:
    """What differs between the files under `directory` and their `recorded` checksums
    (relative path -> digest), `present` being the files there (empty: nothing). Each file is
    read once, hashed the way its digest was (`fs.checksums`: on object storage, the hash it
    keeps, nothing downloaded)."""
    problems = [f"{rel} is missing" for rel in sorted(set(recorded) - present)]
    actual = fs.checksums(directory, sorted(set(recorded) & present), like=recorded)
    changed = [rel for rel, digest in actual.items() if digest != recorded[rel]]
    return problems + [f"{rel} differs from its checksum" for rel in changed]


def _read_checksums(path: str) -> tuple[dict, list[str]]:
    """(the digests, the problems of the record itself) of a step's `checksums.json`."""
    try:
        recorded = fs.read_json(path)
    except ValueError as e:
        return {}, [f"{CHECKSUMS} is not JSON ({e})"]
    if not isinstance(recorded, dict):
        return {}, [f"{CHECKSUMS} is not a JSON object"]
    return recorded, []


def verify_step(step_dir: str) -> list[str] | None:
    """What differs between all the files of a training step and its `checksums.json`
    (a resume's check): empty when nothing; None when the step recorded no checksums (written
    before llamax recorded them, or by a run killed between finishing the save and hashing
    it)."""
    path = fs.join(step_dir, CHECKSUMS)
    if not fs.exists(path):
        return None
    recorded, problems = _read_checksums(path)
    if problems:
        return problems
    return differences(step_dir, recorded, set(fs.files_under(step_dir, CHECKSUMS)))


@dataclasses.dataclass(frozen=True)
class _Record:
    """What was recorded of a step's files when it was written: `path` (the step's
    `checksums.json`, else its converted checkpoint's `manifest.json`; "" when neither),
    `root` (the directory its names are relative to), `prefix` (the step directory's path
    under `root`), and the `digests` of the files a model reader reads."""

    path: str
    root: str
    prefix: str = ""
    digests: dict = dataclasses.field(default_factory=dict)
    problems: tuple[str, ...] = ()  # the record itself is unreadable

    def params(self) -> dict[str, str]:
        """The digests of the parameter files, named relative to the step directory."""
        start = self.prefix + "params/"
        return {rel[len(self.prefix) :]: digest for rel, digest in self.digests.items()
                if rel.startswith(start)}  # fmt: skip


def _manifest_of(directory: str) -> str:
    """The `manifest.json` of the converted checkpoint whose `checkpoints/` is `directory`
    ("" when there is none)."""
    directory = directory.rstrip("/")
    if os.path.basename(directory) != "checkpoints":
        return ""
    path = fs.join(os.path.dirname(directory), MANIFEST)
    return path if fs.isfile(path) else ""


def _recorded_file(directory: str, step: int) -> str:
    """The file that recorded step `step`'s checksums: its `checksums.json`, else a manifest
    that lists the step's files; "" when nothing did."""
    path = fs.join(directory, str(step), CHECKSUMS)
    if fs.exists(path):
        return path
    return _manifest_of(directory)


def _record(directory: str, step: int, path: str) -> _Record:
    step_dir = fs.join(directory, str(step))
    if not path:
        return _Record("", step_dir)
    if os.path.basename(path) == CHECKSUMS:
        recorded, problems = _read_checksums(path)
        read = {rel: digest for rel, digest in recorded.items() if rel.startswith(READ_ITEMS)}
        return _Record(path, step_dir, "", read, tuple(problems))
    root, prefix = os.path.dirname(path), f"checkpoints/{step}/"
    try:
        manifest = fs.read_json(path)
    except ValueError as e:
        return _Record(path, root, prefix, problems=(f"{MANIFEST} is not JSON ({e})",))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(info, dict) and isinstance(info.get("sha256"), str) for info in files.values()
    ):
        malformed = f"{MANIFEST} is malformed: 'files' must map file names to sizes and sha256"
        return _Record(path, root, prefix, problems=(malformed,))
    if not any(rel.startswith(prefix) for rel in files):
        return _Record("", step_dir)  # another step's manifest: this one recorded nothing
    read = tuple(prefix + item for item in READ_ITEMS)
    digests = {rel: info["sha256"] for rel, info in files.items()
               if rel.startswith(read) or rel == "config.json"}  # fmt: skip
    return _Record(path, root, prefix, digests)


_VERIFIED: dict[tuple[str, str], _Record] = {}


def verified(directory: str, step: int, what: str = "checkpoint") -> _Record:
    """Step `step` of the checkpoint directory `directory`, checked before any of it is read:
    the files a model reader reads (the step's parameters and meta, a converted checkpoint's
    `config.json`) against the checksums recorded when it was written (the step's
    `checksums.json`, else the converted checkpoint's `manifest.json`). A
    `CorruptCheckpoint` names what differs; a step with nothing recorded is read with one
    warning saying so. Each step once per process (while its record is unchanged): several
    reads of one `init_from` hash it once. `what` names the caller's input."""
    step_dir = fs.join(directory, str(step))
    path = _recorded_file(directory, step)
    key = (step_dir, path and fs.stat_key(path))
    if key in _VERIFIED:
        return _VERIFIED[key]
    record = _record(directory, step, path)
    if not record.path:
        log.warning(
            "%s: the checkpoint of step %d in %s cannot be verified: no checksums were "
            "recorded for it (no %s in the step, no %s beside its checkpoints/: written "
            "before llamax recorded them, or its run was killed between the save and its "
            "checksums); it is read as it is", what, step, directory, CHECKSUMS, MANIFEST,
        )  # fmt: skip
    else:
        present = set(fs.files_under(record.root, os.path.basename(record.path)))
        problems = list(record.problems) or differences(record.root, record.digests, present)
        if problems:
            raise _corrupt(what, directory, step, record.path, problems)
    _VERIFIED[key] = record
    return record


def _corrupt(what: str, directory: str, step: int, record: str, problems) -> CorruptCheckpoint:
    shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
    earlier = sorted((int(d) for d in fs.listdir(directory) if d.isdigit() and int(d) < step),
                     reverse=True)  # fmt: skip
    instead = (f", or use an earlier step's directory ({fs.join(directory, str(earlier[0]))})"
               if earlier else "")  # fmt: skip
    return CorruptCheckpoint(
        f"{what}: the checkpoint of step {step} in {directory} is corrupt, its files differ "
        f"from the checksums recorded when it was written ({record}): {shown}. Nothing was "
        f"read from it; restore it from an intact copy{instead}."
    )


def _params_item(path: str, what: str) -> tuple[epath.Path, int]:
    """The `params` item of the latest checkpoint under `path` (verified), read on its own
    (the other items of a training checkpoint need handlers this module does not know)."""
    directory, step = latest(path, what)
    verified(directory, step, what)
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
    `llamax.loading.load_pretrained`. `partial`: `abstract`'s parameters only, each of which
    the checkpoint must hold, the others it holds left unread (a language model's body without
    its output, a LoRA base without the head that trains beside the adapters)."""
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


_CONTENT: dict[tuple, dict[str, str]] = {}


def base_fingerprint(path: str, what: str = "init_from") -> dict:
    """What identifies a base or a reference model (`check_same_base`): its path, the step
    read, and its `content`: a sha256 over the names and recorded digests of its parameter
    files (verified; nothing read again), the same for a copy elsewhere (the digests travel
    with it); or, when nothing was recorded, over the files' own sha256 (one read)."""
    directory, step = latest(path, what)
    record = verified(directory, step, what)
    params = record.params()
    if not record.path:
        step_dir = fs.join(directory, str(step))
        names = [rel for rel in fs.files_under(step_dir) if rel.startswith("params/")]
        key = (step_dir, *(fs.stat_key(fs.join(step_dir, rel)) for rel in names))
        if key not in _CONTENT:
            _CONTENT[key] = fs.sha256_files(step_dir, names)
        params = _CONTENT[key]
    listing = "".join(f"{rel}\t{digest}\n" for rel, digest in sorted(params.items()))
    return {"path": fs.absolute(fs.expand(path)), "step": step,
            "content": hashlib.sha256(listing.encode()).hexdigest()}  # fmt: skip


def check_same_base(
    recorded: dict | None,
    path: str,
    what: str = "init_from",
    model: str = "LoRA base",
    rule: str = "adapters only fit the base they were trained on",
) -> None:
    """A model a run or adapters were trained with is still the one at `path`: LoRA adapters
    meet the base they were trained on (a resumed run, or adapters loaded on a base), a
    resumed run the models its task keeps beside the trained one (`llamax.tasks.Beside`: a
    DPO run's reference). The `content` recorded (`base_fingerprint`) must be that of the
    checkpoint now at `path`, so that another model put at the same path and step is noticed.
    A record of an older llamax (a manifest's checksum, else the step) is compared as it was,
    with a warning that this is weaker. The error names the caller's input (`what`), the
    `model` ("LoRA base", "DPO reference") and why it may not change (`rule`)."""
    if not recorded:
        return
    if not recorded.get("content"):
        _check_older_record(recorded, path, what, model, rule)
        return
    now = base_fingerprint(path, what)
    if recorded["content"] != now["content"]:
        raise ValueError(
            f"The {model} has changed: the run recorded {recorded.get('path')} (step "
            f"{recorded.get('step')}, content {recorded['content'][:12]}), but {what} {path} "
            f"now holds step {now['step']}, content {now['content'][:12]}; {rule}. Use the "
            f"{model} as it was (restore {recorded.get('path')} from a copy), or start a new "
            "run from the one there now."
        )


def _check_older_record(recorded: dict, path: str, what: str, model: str, rule: str) -> None:
    """`check_same_base` for a record written before llamax recorded a base's content: its
    manifest's checksum (a converted checkpoint's), else its step."""
    directory, step = latest(path, what)
    manifest = _manifest_of(directory)
    now = {"step": step, "manifest_sha256": fs.sha256(manifest) if manifest else None}
    key = "manifest_sha256" if recorded.get("manifest_sha256") else "step"
    log.warning(
        "the %s was recorded by an older llamax, without its content: %s is compared by its "
        "%s alone, a weaker check (another model at the same path and step would pass)",
        model, path, key,
    )  # fmt: skip
    if recorded.get(key) != now[key]:
        raise ValueError(
            f"The {model} has changed: the run recorded {recorded.get('path')} ({key} "
            f"{recorded.get(key)}), but {what} {path} has {key} {now[key]}; {rule}. Use the "
            f"{model} as it was (restore {recorded.get('path')} from a copy)."
        )


def _recorded_base(path: str) -> dict | None:
    """The base fingerprint a LoRA run's latest checkpoint recorded (None if it has none)."""
    directory, step = latest(path)
    verified(directory, step, "adapters")
    item = epath.Path(directory) / str(step) / "meta"
    if not item.exists():
        return None
    meta = ocp.JsonCheckpointHandler().restore(item, ocp.args.JsonRestore())
    return meta.get("lora_base") if isinstance(meta, dict) else None


def check_run_base(run: str, base: str) -> None:
    """The adapters of the LoRA run `run` are about to be read onto the checkpoint `base`:
    it must be the base they were trained on (its recorded content)."""
    check_same_base(_recorded_base(run), base, "the base")


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


def open_param_leaves(path: str, what: str = "checkpoint") -> Callable[[str], Any]:
    """`open(leaf_name)` -> a tensorstore array of one parameter of the latest checkpoint
    under `path` ("layers.attention.wq", ...), verified first: it reads only the slices asked
    for."""
    import tensorstore as ts

    directory, step = latest(path, what)
    verified(directory, step, what)
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
