"""Checkpoints: orbax `CheckpointManager` with async saves, exact resume, preemption.

A checkpoint at step N is one directory `DIR/checkpoints/N/` with four items:

- `params`: the parameters (float32 master weights), one array per leaf, sharded on write:
  each host writes only its shards.
- `opt_state`: `{"step", "opt_state"}`, the rest of the train state.
- `data`: each process's data-iterator state (`process_I-of-P.json`), so a resumed run sees
  the batches an uninterrupted one would have.
- `meta`: the resolved config and run facts (tokens seen).
- one more item for each model a run trains beside its own (PPO's `value`: its `step`,
  `params` and `opt_state`), saved and restored with the rest as one step.

and, once the save is complete, `checksums.json` (the sha256 of every file, computed on a
thread of its own; on `gs://`, the MD5 or CRC32C the storage keeps of each object), checked
before a resume: the whole step. Every other reader of a step (`init_from`, a LoRA base, a
DPO reference, `load_pretrained`, the converter) checks the files it reads
(`pretrained.verified`).

orbax writes a step into a temporary directory and renames it when complete (on `gs://`,
where renames are copies, it marks a complete step with a `commit_success.txt` instead), so
a process killed mid-save (even `kill -9`) leaves only complete checkpoints; the partial one
is removed on the next start. A save that fails (a full disk) stops training with one
`CheckpointError` naming the step and the earlier checkpoint, which is intact. Restores read
into the target shardings of the current mesh, whatever mesh or device count wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llamax import fs, pretrained
from llamax.pretrained import with_shardings

log = logging.getLogger("llamax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 1000  # steps between saves; the last step is always saved. 0: only the last
    c.keep = 3  # the most recent checkpoints kept
    c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    c.async_save = True  # write in the background while training continues
    # A corrupt latest checkpoint (its files differ from the checksums recorded at save)
    # stops the run; true: set it aside and resume from the previous good one.
    c.fallback_on_corrupt = False
    return c


# ----- the data-iterator state, one JSON file per process -----


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own iterator state."""

    def save(self, directory: epath.Path, args: DataStateSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> dict:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"No data-iterator state for this process ({name}) in {directory}: the "
                f"checkpoint was written by a different number of processes ({saved}), so the "
                "data order cannot be resumed exactly"
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----- the manager -----


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or one on disk is corrupt."""


CHECKSUMS = pretrained.CHECKSUMS


def record_checksums(step_dir: str) -> None:
    """`STEP/checksums.json`: the sha256 of every file of a finalized checkpoint."""
    if not fs.isdir(step_dir):
        raise FileNotFoundError(f"no checkpoint at {step_dir}")
    digests = fs.checksums(step_dir, fs.files_under(step_dir, CHECKSUMS))
    fs.write_json(fs.join(step_dir, CHECKSUMS), digests, indent=0, sort_keys=True)


def _record_checksums_quietly(step_dir: str) -> None:
    try:
        record_checksums(step_dir)
    except OSError as e:  # removed meanwhile (checkpoint.keep), or the disk is full
        log.warning("no checksums for %s: %s", step_dir, e)


def verify(step_dir: str) -> list[str]:
    """What differs between a checkpoint's files, all of them, and its recorded checksums
    (empty: nothing; `pretrained.verify_step`). A checkpoint without checksums (written
    before llamax recorded them, or by a run killed between finishing the save and hashing
    it) cannot be checked and passes, with a warning."""
    problems = pretrained.verify_step(step_dir)
    if problems is None:
        log.warning("%s has no %s: its integrity cannot be checked", step_dir, CHECKSUMS)
        return []
    return problems


def is_complete(step_dir: str) -> bool:
    """Whether orbax finished writing a step: on local disks it renames a complete step to its
    number; on object storage it writes in place and marks a complete step with a commit
    file."""
    return not fs.is_remote(step_dir) or fs.exists(fs.join(step_dir, "commit_success.txt"))


class Checkpoints:
    """A run's checkpoints in `DIR/checkpoints`: orbax's `CheckpointManager` with llamax's
    items, checksums recorded for each completed save (on a thread of their own, off the
    training loop's path), saves that fail reported as one `CheckpointError` naming the step
    and the checkpoint still intact, and corrupt checkpoints refused (or, when asked, set
    aside) before anything is restored."""

    def __init__(self, directory: str, c: ml_collections.ConfigDict | None = None,
                 others: Sequence[str] = ()):  # fmt: skip
        """`others`: the names of models a run trains beside its own (PPO's `value`), each an
        item of every checkpoint (`save`'s `others`, `restore_other`)."""
        c = c or default_config()
        clash = set(others) & set(_handlers())
        if clash:
            raise ValueError(f"{sorted(clash)}: names of a checkpoint's own items")
        self.directory = fs.absolute(directory)
        self.blocking = not c.async_save
        if fs.isdir(self.directory):
            self._set_aside_corrupt(c.fallback_on_corrupt)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep,
            keep_period=c.keep_period or None,
            enable_async_checkpointing=c.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers(others)
        )
        self.good = self.manager.latest_step()  # the last step known written whole
        self.saving: int | None = None  # the step whose save is in flight
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="llamax-checksums")
        self._hashing: Future | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _completed(self) -> None:
        """The save in flight is complete: it is the good one now; hash it in the background
        (by process 0, which sees every file on shared storage)."""
        self.good, self.saving = self.saving, None
        if jax.process_index() == 0:
            self._hashing = self._hasher.submit(
                _record_checksums_quietly, fs.join(self.directory, str(self.good))
            )

    def _set_aside_corrupt(self, fallback: bool) -> None:
        """Verifies the latest checkpoint; a corrupt one stops the run, or with `fallback` is
        renamed `STEP.corrupt` (by process 0) and the previous one is checked in turn."""
        steps = [int(d) for d in fs.listdir(self.directory) if d.isdigit()]
        steps = sorted((s for s in steps if is_complete(fs.join(self.directory, str(s)))),
                       reverse=True)  # fmt: skip
        for i, step in enumerate(steps):
            step_dir = fs.join(self.directory, str(step))
            problems = verify(step_dir)
            if not problems:
                return
            previous = steps[i + 1] if i + 1 < len(steps) else None
            if not fallback:
                then = f"the previous one (step {previous})" if previous else "a fresh start"
                raise CheckpointError(
                    f"The checkpoint of step {step} ({step_dir}) is corrupt: "
                    f"{'; '.join(problems[:3])}. Nothing was changed. To resume from {then} "
                    "instead, rerun with --config.checkpoint.fallback_on_corrupt=true (the "
                    "corrupt one is then renamed, not deleted)."
                )
            log.warning("checkpoint of step %d is corrupt (%s): set aside as %d.corrupt",
                        step, "; ".join(problems[:3]), step)  # fmt: skip
            if jax.process_index() == 0:
                fs.rename(step_dir, f"{step_dir}.corrupt")
            _sync("llamax: corrupt checkpoint set aside")

    def save(self, step: int, state, data_state: dict, meta: dict,
             others: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """The checkpoint of `step`: the run's train state (its parameters the item `params`,
        which every reader of a model reads), the data position, `meta`, and the train state
        of each model trained beside (`others`, by name), one item each; in the background
        unless `checkpoint.async_save` is false."""
        self.finish_saving()  # the one before (orbax would wait for it anyway)
        self.saving = step
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            "data": DataStateSave(data_state),
            "meta": ocp.args.JsonSave(meta),
        }
        for name, other in (others or {}).items():
            whole = {"step": other.step, "params": other.params, "opt_state": other.opt_state}
            items[name] = ocp.args.StandardSave(whole)
        try:  # a write can fail here, or later in the background (`raise_if_failed`)
            self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._failed(e) from None
        if self.blocking:
            self.finish_saving()

    def _failed(self, e: Exception) -> CheckpointError:
        """The error for the save in flight, which is then given up (never counted good)."""
        step, self.saving = self.saving, None
        intact = f"the checkpoint of step {self.good}" if self.good else "no earlier checkpoint"
        return CheckpointError(
            f"Writing the checkpoint of step {step} to {self.directory} failed: "
            f"{type(e).__name__}: {str(e)[:1500]}. Training stopped there; {intact} is intact "
            "and a rerun resumes from it once the cause (disk space, permissions) is fixed."
        )

    def raise_if_failed(self) -> None:
        """Raises `CheckpointError` if a save in the background has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from None

    def finish_saving(self) -> None:
        """Waits for the save in flight, if any; `CheckpointError` if it failed."""
        if self.saving is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None
        self._completed()

    def close(self) -> None:
        """Waits for the last save and its checksums, and closes."""
        self.finish_saving()
        if self._hashing is not None:
            self._hashing.result()
        self._hasher.shutdown()
        self.manager.close()

    def abandon(self) -> None:
        """After another error: let a save in flight finish (it holds a good state) without
        raising, and close. With several processes a peer may be gone, and orbax's barriers
        would wait for it, so nothing is waited for."""
        if jax.process_count() > 1:
            return
        try:
            self.close()
        except Exception as e:  # the error being raised already says what went wrong
            log.warning("the checkpoint of step %s was not written either: %s", self.saving, e)

    def restore(self, step: int, state, shardings):
        """The train state and data-iterator state of `step`, onto the given shardings."""
        saved = self.manager.item_metadata(step)["params"]
        pretrained.check_shapes(saved, state.params, f"{self.directory}/{step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(with_shardings(state.params, shardings.params)),
                opt_state=ocp.args.StandardRestore(
                    with_shardings(
                        {"step": state.step, "opt_state": state.opt_state},
                        {"step": shardings.step, "opt_state": shardings.opt_state},
                    )
                ),
                data=DataStateRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        new_state = state.replace(
            step=restored.opt_state["step"],
            params=restored.params,
            opt_state=restored.opt_state["opt_state"],
        )
        return new_state, restored.data, restored.meta

    def restore_other(self, step: int, name: str, state, shardings):
        """The train state of the model `name` trained beside the run's own (`save`'s
        `others`) at `step`, onto the given shardings."""
        step_dir = f"{self.directory}/{step}"
        if not fs.isdir(fs.join(step_dir, name)):
            raise CheckpointError(
                f"The checkpoint {step_dir} holds no {name!r} model, which this run trains: it "
                "was written by another kind of run"
            )
        whole = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        saved = self.manager.item_metadata(step)[name]
        pretrained.check_shapes(saved["params"], state.params, f"{step_dir}/{name}")
        where = {"step": shardings.step, "params": shardings.params,
                 "opt_state": shardings.opt_state}  # fmt: skip
        args = ocp.args.StandardRestore(with_shardings(whole, where))
        restored = self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        return state.replace(step=restored["step"], params=restored["params"],
                             opt_state=restored["opt_state"])  # fmt: skip


def _handlers(others: Sequence[str] = ()) -> dict:
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": DataStateHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        **{name: ocp.StandardCheckpointHandler() for name in others},
    }


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----- preemption -----


class PreemptionWatcher:
    """True at the first step boundary after SIGTERM (a TPU VM's preemption notice).

    On several processes, JAX's preemption sync point makes them all agree on the step; on
    one, a SIGTERM handler sets a flag."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def state_bytes(state) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
