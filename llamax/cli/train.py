"""`llamax-train --config configs/X.py --workdir DIR [--config.KEY=VALUE ...]`.

The config is locked: a misspelt key is an error. On a multi-host TPU slice, JAX finds the
cluster by itself; elsewhere (several processes on one machine, GPUs) pass `--coordinator`,
`--num_processes` and `--process_id`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from llamax.cli import setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config.json, metrics and checkpoints."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0, to form a JAX cluster of several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the cluster.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the cluster.")


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator needs --num_processes and --process_id")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _multi_host_tpu():
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    setup_logging("%(asctime)s %(message)s")
    initialize_distributed()
    from llamax import train

    train.run(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
