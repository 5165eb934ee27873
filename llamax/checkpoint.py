"""Checkpoints: orbax `CheckpointManager` with async saves, exact resume, preemption.

A checkpoint at step N is one directory `DIR/checkpoints/N/` with four items:

- `params`: the parameters (float32 master weights), one array per leaf, sharded on write:
  each host writes only its shards.
- `opt_state`: `{"step", "opt_state"}`, the rest of the train state.
- `data`: each process's data-iterator state (`process_I-of-P.json`), so a resumed run sees
  the batches an uninterrupted one would have.
- `meta`: the resolved config and run facts (tokens seen).

orbax writes a step into a temporary directory and renames it when complete, so a process
killed mid-save (even `kill -9`) leaves only complete checkpoints; the partial one is removed
on the next start. Restores read into the target shardings of the current mesh, whatever mesh
or device count wrote the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llamax import pretrained
from llamax.pretrained import with_shardings

log = logging.getLogger("llamax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 1000  # steps between saves; the last step is always saved. 0: only the last
    c.keep = 3  # the most recent checkpoints kept
    c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    c.async_save = True  # write in the background while training continues
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


def make_manager(
    directory: str, c: ml_collections.ConfigDict | None = None
) -> ocp.CheckpointManager:
    c = c or default_config()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep,
        keep_period=c.keep_period or None,
        enable_async_checkpointing=c.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=_handlers()
    )


def _handlers() -> dict:
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": DataStateHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict,
    meta: dict,
    force: bool = False,
) -> bool:
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def restore(manager: ocp.CheckpointManager, step: int, state, shardings):
    """The train state and data-iterator state of `step`, onto the given shardings."""
    saved = manager.item_metadata(step)["params"]
    pretrained.check_shapes(saved, state.params, f"{manager.directory}/{step}")
    restored = manager.restore(
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
