"""`llamax-train --config configs/X.py --workdir DIR [--config.KEY=VALUE ...]`.

The config is locked: a misspelt key is an error. Several processes form one JAX cluster:
on a multi-host TPU slice JAX finds it by itself; under torchrun-style variables (`WORLD_SIZE`,
`RANK`, `MASTER_ADDR`, ...) or a SLURM job step of several tasks llamax reads it from the
environment (`llamax.cluster.launcher`, docs/gpu.md); elsewhere pass `--coordinator`,
`--num_processes` and `--process_id`.

A failure ends the run with one `llamax-train: error:` line: exit 2 for bad input (config,
workdir, data), 1 when training stopped (a non-finite step, a checkpoint that could not be
written or is corrupt, a lost process: see `llamax.cluster`).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from llamax.cli import config_value, run_absl, setup_logging, usage_error

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


def initialize_distributed(heartbeat_timeout_seconds: float) -> None:
    import jax

    from llamax import cluster

    timeouts = {
        "heartbeat_timeout_seconds": cluster.jax_heartbeat_timeout(heartbeat_timeout_seconds)
    }
    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            sys.exit(
                usage_error("llamax-train", "--coordinator needs --num_processes and --process_id")
            )
    try:
        if _COORDINATOR.value:
            launched = cluster.arguments(
                _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, source="flags"
            )
        else:
            launched = cluster.launcher()
    except ValueError as e:
        sys.exit(usage_error("llamax-train", str(e)))
    if launched is not None:
        kwargs, description = launched
        logging.getLogger("llamax").info("cluster: %s", description)
        # Everything is given: JAX's own detection would otherwise read a SLURM job as one
        # process per GPU and hide the other GPUs of a one-process-per-host job.
        jax.distributed.initialize(**kwargs, cluster_detection_method="deactivate", **timeouts)
    elif _multi_host_tpu():
        jax.distributed.initialize(**timeouts)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(usage_error("llamax-train", f"unexpected arguments: {argv[1:]}"))
    c = config_value(_CONFIG, "llamax-train")
    if c is None or _WORKDIR.value is None:
        sys.exit(usage_error("llamax-train", "--config and --workdir are required"))
    setup_logging("%(asctime)s %(message)s")
    initialize_distributed(c.cluster.heartbeat_timeout_seconds)
    from llamax import loop, train

    code, message = loop.supervise(
        lambda: train.run(c, _WORKDIR.value), c.cluster.heartbeat_timeout_seconds
    )
    if code:
        _exit(code, message)


def _exit(code: int, message) -> None:
    """One error line. With several processes the exit skips JAX's shutdown barrier, which
    would wait for peers that may have stopped too."""
    import jax

    print(f"llamax-train: error: {message}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run() -> None:
    run_absl(main, __name__)


if __name__ == "__main__":
    run()
