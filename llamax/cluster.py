"""Noticing, in a multi-process run, that another process is gone.

JAX's coordination service notices a lost process only after its heartbeat timeout, and then
aborts every other process (SIGABRT and a C++ stack) unless a Python error happens to reach
the top first. llamax keeps its own heartbeat through the coordinator's key-value store:
every second each process stamps `llamax/heartbeat/<i>`; a process that sees another's stamp
stand still for `timeout` seconds (or loses the coordinator) prints one line naming it and
exits at once with status 1, skipping JAX's shutdown barrier, which would wait for the
process that is gone. JAX's own heartbeat timeout is set above llamax's so that the
coordination service never aborts first. A process that finishes marks itself done, so that
its peers do not count it as lost while they finish too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import jax

log = logging.getLogger("llamax")
INTERVAL = 1.0  # seconds between heartbeats


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
