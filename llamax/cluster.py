"""Forming a multi-process run from its launcher's environment, and noticing, in one, that
another process is gone.

`launcher(env)` reads who started this process and returns `jax.distributed.initialize`'s
arguments (None: a single process, or a TPU slice, where JAX finds the cluster itself):
- torchrun and launchers like it: `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`, and
  `LOCAL_RANK`, `LOCAL_WORLD_SIZE` where several processes share a host;
- SLURM (`srun`): `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, the tasks on this node from
  `SLURM_STEP_TASKS_PER_NODE` and the first host of `SLURM_STEP_NODELIST` as the coordinator
  (`MASTER_ADDR`/`MASTER_PORT` override the host and the port; the default port is
  `20000 + job id % 10000`, the same on every node of a job).
With several processes on a host, each takes the GPU of its local rank (`local_device_ids`);
with one process per host it drives all of the host's GPUs.

JAX's coordination service notices a lost process only after its heartbeat timeout, and then
aborts every other process (SIGABRT and a C++ stack) unless a Python error happens to reach
the top first. llamax keeps its own heartbeat through the coordinator's key-value store:
every second each process stamps `llamax/heartbeat/<i>`; a process that sees another's stamp
stand still for `timeout` seconds (or loses the coordinator) prints one line naming it and
exits at once with status 1, skipping JAX's shutdown barrier, which would wait for the
process that is gone. JAX's own heartbeat timeout is set above llamax's so that the
coordination service never aborts first. A process that finishes marks itself done, so that
its peers do not count it as lost while they finish too.

`threads_for_simulated_devices` (called when llamax is imported) gives XLA's CPU client
enough threads for the devices it simulates (`--xla_force_host_platform_device_count`). The
client runs every CPU device's program on one pool of `NPROC` threads (default: the cores),
and a device waiting in a collective holds its thread. When a step has collectives that may
run side by side (a layer loop's all-gathers beside one outside the loop), 8 simulated devices
on 2 cores filled the pool with waiters while the devices they waited for had no thread left,
and XLA aborted the program after 40 s. Four threads per device leave room.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping

import jax

log = logging.getLogger("llamax")
INTERVAL = 1.0  # seconds between heartbeats


def threads_for_simulated_devices(env: MutableMapping[str, str] = os.environ) -> None:
    """Sets `NPROC` to four threads per simulated CPU device (at least the cores) unless it
    is set; only a process that has not started JAX's CPU backend yet is affected."""
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    devices = int(counts[-1]) if counts else int(env.get("JAX_NUM_CPU_DEVICES") or 1)
    if devices > 1 and "NPROC" not in env:
        env["NPROC"] = str(max(os.cpu_count() or 1, 4 * devices))


def launcher(env: Mapping[str, str] = os.environ) -> tuple[dict, str] | None:
    """`jax.distributed.initialize` keyword arguments for the launcher that started this
    process, with a line that says which; None for a single process."""
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        if world <= 1:
            return None
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} and RANK are set but {missing} are not")
        local = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        coordinator = f"{env['MASTER_ADDR']}:{_int(env, 'MASTER_PORT')}"
        return arguments(coordinator, world, rank, local, local_rank, "WORLD_SIZE/RANK")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_JOB_ID" in env and tasks and int(tasks) > 1:
        world, rank = int(tasks), _int(env, "SLURM_PROCID")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not (env.get("MASTER_ADDR") or nodes):
            raise ValueError("a SLURM job of several tasks with no SLURM_STEP_NODELIST")
        host = env.get("MASTER_ADDR") or first_host(nodes)
        job = int(re.sub(r"\D", "", env["SLURM_JOB_ID"]) or 0)
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 20000 + job % 10000
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        local = int(re.match(r"\d+", per_node).group())
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return arguments(f"{host}:{port}", world, rank, local, local_rank, "SLURM")


def arguments(coordinator, world, rank, local=1, local_rank=0, source="flags"):
    """`jax.distributed.initialize` keyword arguments and a line describing them; with `local`
    processes on this host, this one takes local device `local_rank` only."""
    if not 0 <= rank < world:
        raise ValueError(f"{source}: process {rank} is not one of {world}")
    kwargs = {"coordinator_address": coordinator, "num_processes": world, "process_id": rank}
    where = "all of this host's devices"
    if local > 1:
        kwargs["local_device_ids"] = [local_rank]
        where = f"local device {local_rank}"
    return kwargs, f"{source}: process {rank} of {world}, coordinator {coordinator}, {where}"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {env[name]!r}") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu-[007-009,012],login1` -> `gpu-007`."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + re.split(r"[,-]", ranges)[0] + suffix


def jax_heartbeat_timeout(timeout: float) -> int:
    """JAX's heartbeat timeout for llamax's `timeout`: late enough that llamax reports first."""
    return int(2 * timeout + 10)


def _client():
    from jax._src import distributed  # the client of jax.distributed.initialize

    return distributed.global_state.client


class Watchdog:
    def __init__(self, timeout: float, prog: str = "llamax-train"):
        self.timeout, self.prog = timeout, prog
        self.me, self.count = jax.process_index(), jax.process_count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamax-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.count > 1:
            self._thread.start()
        return self

    @property
    def watching(self) -> bool:
        return self._thread.is_alive()

    def wait_for_verdict(self) -> None:
        """Gives the watchdog the time to notice a lost peer (it then exits the process)."""
        time.sleep(self.timeout + 2 * INTERVAL)

    def stop(self) -> None:
        """This process is done: its peers stop watching it."""
        if self.count > 1 and self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            try:
                _client().key_value_set(f"llamax/done/{self.me}", "1", allow_overwrite=True)
            except Exception:  # the coordinator is gone too; nothing left to tell
                pass

    def _lost(self, what: str) -> None:
        print(
            f"{self.prog}: error: {what}; stopping this process ({self.me}) too. A rerun of "
            "every process resumes from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def _run(self) -> None:
        client = _client()
        peers = [p for p in range(self.count) if p != self.me]
        last_seen = {p: (None, time.monotonic()) for p in peers}
        beat = 0
        while not self._stop.wait(INTERVAL if beat else 0):
            beat += 1
            try:
                client.key_value_set(f"llamax/heartbeat/{self.me}", str(beat), allow_overwrite=True)
                stamps = {p: _try_get(client, f"llamax/heartbeat/{p}") for p in peers}
                done = {p for p in peers if _try_get(client, f"llamax/done/{p}") is not None}
            except Exception as e:  # the key-value store lives in process 0
                self._lost(f"lost the coordinator (process 0): {type(e).__name__}")
            now = time.monotonic()
            for p in peers:
                if p in done:
                    continue
                if stamps[p] != last_seen[p][0]:
                    last_seen[p] = (stamps[p], now)
                elif now - last_seen[p][1] > self.timeout:
                    self._lost(
                        f"process {p} of {self.count} stopped responding (no heartbeat for "
                        f"{self.timeout:g} s)"
                    )


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # NOT_FOUND until the peer first writes it
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise
