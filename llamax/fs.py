"""Files and directories written whole or not at all.

Every file or directory llamax writes for a user (configs, metrics, evaluation results, plots,
tokenizer models, converted checkpoints) goes through `atomic_path`: the content is written
under a temporary name beside the target, then renamed to it, so a reader (or a rerun after a
crash) never sees half of it. Training checkpoints get the same from orbax.

A temporary is named `TARGET.tmp-HOST-PID-NONCE`. A process killed with SIGKILL cannot remove
its own, so every write first removes the temporaries of its target that no live process
owns: those of a dead process of this host, and those that carry this process's own PID
(containers reuse PIDs), never another host's.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("llamax")
_HOST = socket.gethostname()
# What follows the target's name in a temporary: `.tmp-HOST-PID-NONCE` (and a suffix), or
# `.tmp-PID` as llamax 0.1 wrote them.
_TEMPORARY = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:-[0-9a-f]{8})?(?:\.[A-Za-z0-9]+)?")
_ACTIVE: set[str] = set()  # the temporaries this process is writing now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes the temporaries of `path` that no live process of this host is writing; returns
    what was removed."""
    directory, base = os.path.split(os.path.abspath(path).rstrip("/"))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            match = _TEMPORARY.fullmatch(name[len(base) :]) if name.startswith(base) else None
            full = os.path.join(directory, name)
            if match is None or full in _ACTIVE or match["host"] not in (None, _HOST):
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or not _alive(pid):
                log.warning("removing %s, left by a process that is gone", full)
                _remove(full)
                removed.append(full)
    return removed


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path to write a file or a directory at, renamed to `path` when the block
    ends without an error (removed when it raises). `suffix` keeps an extension some writers
    look at (".png")."""
    path = os.path.abspath(path).rstrip("/")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    _ACTIVE.add(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        was_directory = os.path.isdir(tmp)
        _remove(tmp)
        if was_directory:
            _remove_when_settled(tmp)
        raise
    finally:
        _ACTIVE.discard(tmp)


def _remove_when_settled(tmp: str, quiet: float = 1.0, limit: float = 10.0) -> None:
    """After a writer was stopped (an error, Ctrl-C, SIGTERM), threads of a library that
    wrote into a temporary directory (orbax's metadata, tensorstore's files) can still finish
    their last write and recreate it: remove it until it has stayed gone for `quiet` seconds,
    and once more at exit, after Python has joined those threads."""
    atexit.register(_remove, tmp)
    deadline, gone_since = time.monotonic() + limit, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - gone_since < quiet:
        time.sleep(0.1)
        if os.path.exists(tmp):
            _remove(tmp)
            gone_since = time.monotonic()


@contextlib.contextmanager
def no_empty_directory_on_error(path: str) -> Iterator[None]:
    """A directory this block creates is removed if the block fails having written no file
    into it, so that a failed first run leaves no empty workdir behind."""
    created = not os.path.exists(path)
    try:
        yield
    except BaseException:
        if created and os.path.isdir(path) and not any(f for _, _, f in os.walk(path)):
            shutil.rmtree(path, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, data: Any, **dump_args) -> None:
    write_text(path, json.dumps(data, **dump_args))


def write_lines(path: str, lines) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def files_under(directory: str, leave_out: str = "") -> list[str]:
    """Every file below `directory`, as sorted relative paths, but `leave_out`."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != leave_out:
                out.append(rel)
    return sorted(out)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(directory: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file (names relative to `directory`), on as many threads as cores
    (hashlib releases the GIL)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        digests = pool.map(lambda rel: sha256(os.path.join(directory, rel)), names)
        return dict(zip(names, digests, strict=True))
