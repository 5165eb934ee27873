"""One writer at a time: the lock of a training workdir or of a conversion's output, which
names its holder, is never left held by a process that is gone, and works on local disks and
`gs://` alike.

A lock is a small JSON file that says who holds it: host, process id and its start time,
the command, when it was taken and last renewed. A training run holds `WORKDIR/.llamax-lock`
from before it writes anything until it stops; a conversion holds `OUTPUT.llamax-lock`,
beside its output, which appears only when complete. A second writer is refused at once, with
the holder named; nothing is waited for.

On a local (or NFS-mounted) disk the lock is the kernel's: an exclusive `flock` on the lock
file, held while the holder lives and released by the kernel when it dies, SIGKILL included.
The file's content only describes the holder. A holder removes the file when it stops; a file
left by a killed holder is found with its `flock` free: that holder is gone, and the lock is
taken over, with a warning naming it.

Object storage has no `flock`. There the lock is an object created with the precondition
`ifGenerationMatch=0`, which only one creator can meet; its holder renews it every
`RENEW_SECONDS` by rewriting it under the precondition of the generation it wrote last (so a
holder whose lock was taken over learns it at the next renewal, and `check` stops it). A lock
object is stale when its holder is a process of this host that is gone, or when it has not
been renewed for `STALE_SECONDS`; it is taken over by rewriting it under the precondition of
the generation seen stale, so that of two processes taking over one stale lock, one wins.

The processes of one multi-process run are one writer: process 0 takes the lock and the
others learn whether it did, so that all of them go on or all refuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from llamax import fs

log = logging.getLogger("llamax")
NAME = ".llamax-lock"  # inside a workdir
SUFFIX = ".llamax-lock"  # beside a conversion's output
RENEW_SECONDS = 30.0
STALE_SECONDS = 300.0


class Held(OSError):
    """Another live process holds the lock."""


def _start_time(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it (to tell a process from a later
    one given the same id); None when it is gone or this system does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, after the command's parentheses


def _alive(holder: dict) -> bool:
    """Whether the process a lock names is one of this host's, still running (and not a later
    process given the same id)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if os.path.isdir("/proc/self"):
        started = _start_time(pid)
        return started is not None and holder.get("started") in (None, started)
    return fs.pid_alive(pid)


def describe(holder: dict | None) -> str:
    """The holder of a lock, as a person reads it."""
    if not holder:
        return "a process that left no description"
    when = holder.get("taken")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when else ""
    command = holder.get("command")
    return (f"process {holder.get('pid')} on host {holder.get('host')}{since}"
            + (f" ({command})" if command else ""))  # fmt: skip


class Lock:
    """The lock at `path` (a lock file) for `what` ("--workdir runs/x"): `acquire` takes it or
    raises `Held` naming its holder; `release` gives it back (removing the file)."""

    def __init__(self, path: str, what: str):
        self.path, self.what = fs.absolute(path), what
        self.remote = fs.is_remote(self.path)
        self._fd: int | None = None
        self._generation: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _holder(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": _start_time(os.getpid()), "what": self.what,
                "command": " ".join(os.path.basename(a) if i == 0 else a
                                    for i, a in enumerate(sys.argv))[:500],
                "taken": now, "renewed": now}  # fmt: skip

    def _refuse(self, holder: dict | None) -> Held:
        return Held(
            f"{self.what} is in use by {describe(holder)}: two writers would mix their files. "
            f"Wait for it to finish or stop it, or choose another path (its lock: {self.path})"
        )

    def acquire(self) -> Lock:
        if self.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    # ----- local disks: flock -----

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0))
                # The holder writes its record just after taking the lock: give it a moment.
                for _ in range(20):
                    if holder:
                        break
                    time.sleep(0.05)
                    holder = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise self._refuse(holder) from None
            # The holder before removes the file when it stops: a lock on a file no longer at
            # the path is no lock; take the one there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _parse(os.pread(fd, 1 << 16, 0))
        if previous:
            log.warning("%s: taking over the lock left by %s, which is gone", self.what,
                        describe(previous))  # fmt: skip
        data = json.dumps(self._holder()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd

    # ----- object storage: preconditions -----

    def _acquire_remote(self) -> None:
        holder = self._holder()
        try:
            self._generation = _write_object(self.path, holder, "0")
            self._start_renewing()
            return
        except FileExistsError:
            pass
        seen, generation = _read_object(self.path)
        if generation is None:  # removed meanwhile by its holder: try once more
            return self._acquire_remote()
        here = seen.get("host") == socket.gethostname()
        stale = not _alive(seen) if here else _age(seen) > STALE_SECONDS
        if seen and not stale:
            raise self._refuse(seen)
        try:
            self._generation = _write_object(self.path, holder, generation)
        except FileExistsError:  # another process took it over first
            raise self._refuse(_read_object(self.path)[0]) from None
        log.warning(
            "%s: taking over the lock left by %s, which is gone%s",
            self.what,
            describe(seen),
            "" if here else f" (not renewed for {_age(seen):.0f} s)",
        )
        self._start_renewing()

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="llamax-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        holder = self._holder()
        while not self._stop.wait(RENEW_SECONDS):
            holder["renewed"] = time.time()
            try:
                self._generation = _write_object(self.path, holder, self._generation)
            except FileExistsError:
                self._lost = f"{self.what}: its lock {self.path} was taken over by " + describe(
                    _read_object(self.path)[0]
                )
                log.error("%s", self._lost)
                return
            except OSError as e:  # a network error: the next renewal tries again
                log.warning("%s: renewing its lock failed (%s); retrying", self.what, e)

    def check(self) -> None:
        """Raises `Held` if the lock was taken over meanwhile (object storage)."""
        if self._lost:
            raise Held(f"{self._lost}: stopped writing")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)  # the flock goes with it
            self._fd = None
        if self._generation is not None:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
            if not self._lost:
                with contextlib.suppress(FileNotFoundError, FileExistsError):
                    _delete_object(self.path, self._generation)
            self._generation = None


def _age(holder: dict) -> float:
    """Seconds since a lock object's holder last renewed it."""
    try:
        return time.time() - float(holder.get("renewed") or 0)
    except (TypeError, ValueError):
        return float("inf")


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _object(path: str):
    filesystem, inner = fs._fs(path)
    bucket, _, key = inner.partition("/")
    return filesystem, bucket, key


def _write_object(path: str, holder: dict, generation: str) -> str:
    """Writes the lock object if its generation is `generation` ("0": if there is none);
    returns the generation written. `FileExistsError` when the precondition fails."""
    from gcsfs.core import quote

    filesystem, bucket, key = _object(path)
    body = json.dumps(holder).encode()
    out = filesystem.call(
        "POST", f"{filesystem._location}/upload/storage/v1/b/{quote(bucket)}/o",
        uploadType="media", name=key, ifGenerationMatch=generation, data=body,
        headers={"Content-Type": "application/octet-stream"}, json_out=True,
    )  # fmt: skip
    return str(out["generation"])


def _read_object(path: str) -> tuple[dict, str | None]:
    """(the holder a lock object names, its generation); ({}, None) when there is none."""
    filesystem, bucket, key = _object(path)
    try:
        filesystem.invalidate_cache(path)
        info = filesystem.info(f"{bucket}/{key}")
        data = filesystem.cat_file(f"{bucket}/{key}")
    except FileNotFoundError:
        return {}, None
    return _parse(data), str(info.get("generation"))


def _delete_object(path: str, generation: str) -> None:
    filesystem, bucket, key = _object(path)
    filesystem.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)


@contextlib.contextmanager
def holding(path: str, what: str) -> Iterator[Lock]:
    """The lock at `path` held for the block (see `Lock`); on several processes, process 0's,
    the others told whether it was taken (`Held` on every process if not)."""
    import jax

    lock = None
    if jax.process_count() == 1:
        lock = Lock(path, what).acquire()
    else:
        import numpy as np
        from jax.experimental import multihost_utils

        error = None
        if jax.process_index() == 0:
            try:
                lock = Lock(path, what).acquire()
            except OSError as e:
                error = e
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is not None:
            raise error
        if not int(taken):
            raise Held(f"{what}: process 0 could not take its lock {path} (its error says why)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def check(lock: Lock | None) -> None:
    """`lock.check()` where this process holds the lock."""
    if lock is not None:
        lock.check()


def workdir(path: str) -> contextlib.AbstractContextManager[Lock]:
    """The lock of a training run's workdir, held while it writes there."""
    return holding(fs.join(fs.absolute(path), NAME), f"--workdir {path}")


def output(path: str) -> contextlib.AbstractContextManager[Lock]:
    """The lock of a conversion's output, beside it (the output exists only when whole)."""
    return holding(fs.absolute(path) + SUFFIX, f"--output {path}")
