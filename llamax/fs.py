"""One file-system layer for every path llamax reads or writes: local paths and `gs://` (any
fsspec URL), and files and directories written whole or not at all.

Local paths go to the operating system, URLs to fsspec (gcsfs for `gs://`, the backend that
etils `epath` and so orbax use too). Listings are never cached, so that a path written by
another client (tensorstore under orbax, another host) is seen at once.

`STORAGE_EMULATOR_HOST` (the standard variable of Google's clients) points every client
llamax uses at a GCS emulator: gcsfs and google-cloud-storage read it themselves; llamax
sets tensorstore's `TENSORSTORE_GCS_HTTP_URL` from it, and switches credential discovery off
(anonymous gcsfs, a fixed tensorstore token, google-auth's `NO_GCE_CHECK`), so that no client
looks for a metadata server or any other address.

Every file or directory llamax writes for a user (configs, metrics, evaluation results, plots,
tokenizer models, converted checkpoints) goes through `atomic_path`: the content is written
under a temporary name beside the target, then renamed to it, so a reader (or a rerun after a
crash) never sees half of it. Training checkpoints get the same from orbax. On object storage
the content is staged in a local temporary: a file is then uploaded as one object (an upload
is published whole or not at all); a directory is uploaded beside the target under a
temporary name, then copied to the target server-side with `config.json` and
`manifest.json` last, so that an interrupted copy is recognisably incomplete.

A temporary is named `TARGET.tmp-HOST-PID-NONCE`. A process killed with SIGKILL cannot remove
its own, so every write first removes the temporaries of its target that no live process
owns: those of a dead process of this host, and those that carry this process's own PID
(containers reuse PIDs), never another host's.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import glob as _glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
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
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Files of a directory copied last when it is published on object storage: their presence
# says the rest is there.
LAST = ("manifest.json", "config.json")


def honour_storage_emulator() -> None:
    """With `STORAGE_EMULATOR_HOST` set, points tensorstore at the emulator too and switches
    credential discovery off for every client (see the module's docstring); without it, undoes
    what an earlier call set. Variables the user set win. Called again after the variable
    changed (another emulator in the same process), the variables it set follow: a
    `TENSORSTORE_GCS_HTTP_URL` left behind would send tensorstore, and every process started
    from this one, to an emulator that is gone, retrying for as long as it takes."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    wanted = {}
    if host not in ("", "default"):
        wanted = {
            "TENSORSTORE_GCS_HTTP_URL": host if "://" in host else f"http://{host}",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "storage-emulator",
            "NO_GCE_CHECK": "true",
            # gcsfs's extended file system asks the storage-control API (not emulated) for the
            # bucket's layout through google-auth's default credentials.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
    for key in set(_SET_HERE) | set(wanted):
        if key in os.environ and os.environ[key] != _SET_HERE.get(key):
            _SET_HERE.pop(key, None)  # the user's value: left as is
        elif key in wanted:
            os.environ[key] = _SET_HERE[key] = wanted[key]
        else:
            os.environ.pop(key, None)
            _SET_HERE.pop(key, None)
    _GCS_OPTIONS["token"] = "anon" if wanted else None


# The environment variables `honour_storage_emulator` set, with their values.
_SET_HERE: dict[str, str] = {}
# gcsfs's options (None: gcsfs's default).
_GCS_OPTIONS: dict[str, Any] = {"cache_timeout": 0, "token": None}


def _configure_fsspec() -> None:
    import fsspec.config

    options = fsspec.config.conf.setdefault("gs", {})
    for key, value in _GCS_OPTIONS.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value


honour_storage_emulator()


# ----- paths -----


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`gs://bucket/...`) rather than a local path."""
    return bool(_URL.match(str(path)))


def _fs(path: str):
    """The fsspec file system of a URL, and the path within it."""
    import fsspec

    _configure_fsspec()
    filesystem, inner = fsspec.core.url_to_fs(path)
    return filesystem, inner


def _url(path: str, inner: str) -> str:
    """A path fsspec returned (without its protocol) as a URL like `path`."""
    return f"{path.split('://', 1)[0]}://{inner}"


def absolute(path: str) -> str:
    """A local path made absolute (`~` expanded), or a URL as it is (without a trailing /)."""
    path = str(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def expand(path: str) -> str:
    """`~` expanded in a local path; a URL as it is."""
    return str(path) if is_remote(path) else os.path.expanduser(path)


def join(path: str, *names: str) -> str:
    return os.path.join(str(path), *names)


def exists(path: str) -> bool:
    if is_remote(path):
        filesystem, inner = _fs(path)
        return filesystem.exists(inner)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if is_remote(path):
        filesystem, inner = _fs(path)
        return filesystem.isdir(inner)
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        filesystem, inner = _fs(path)
        return filesystem.isfile(inner)
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in a directory (FileNotFoundError when there is none)."""
    if not is_remote(path):
        return os.listdir(path)
    filesystem, inner = _fs(path)
    if not filesystem.isdir(inner):
        raise FileNotFoundError(f"No directory {path}")
    return [os.path.basename(p.rstrip("/")) for p in filesystem.ls(inner, detail=False)]


def require_file(path: str, what: str = "") -> str:
    """`path` when it is a regular file (an object, on object storage); otherwise an error
    that says what it is instead: `FileNotFoundError` when there is nothing there,
    `IsADirectoryError` for a directory, and `ValueError` for anything else (a device such as
    /dev/zero, a pipe, a socket), which reading would never finish or make sense of. `what`
    names the caller's input in the message ("--tokenizer ", "adapters: ")."""
    import stat

    if is_remote(path):
        if isfile(path):
            return path
        if isdir(path):
            raise IsADirectoryError(f"{what}{path} is a directory, not a file")
        raise FileNotFoundError(f"{what}{path} not found")
    try:
        mode = os.stat(expand(path)).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}{path} not found") from None
    except OSError as e:
        raise OSError(e.errno, f"{what}{path}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what}{path} is a directory, not a file")
    kinds = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISFIFO: "a pipe", stat.S_ISSOCK: "a socket"}  # fmt: skip
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    raise ValueError(f"{what}{path} is {kind}, not a regular file")


def makedirs(path: str) -> None:
    """A directory and its parents (object storage has no directories: nothing to do)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def getsize(path: str) -> int:
    if is_remote(path):
        filesystem, inner = _fs(path)
        return int(filesystem.size(inner))
    return os.path.getsize(path)


def stat_key(path: str) -> str:
    """What changes when a file's content does: size and modification time (a URL: size and
    the object's generation)."""
    if not is_remote(path):
        stat = os.stat(path)
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    filesystem, inner = _fs(path)
    info = filesystem.info(inner)
    return f"{info['size']}|{info.get('generation') or info.get('mtime') or info.get('etag')}"


def remove(path: str) -> None:
    """Removes a file or a directory tree; nothing when there is none."""
    if is_remote(path):
        filesystem, inner = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            filesystem.rm(inner, recursive=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def rename(src: str, dst: str) -> None:
    """Renames a file or a directory (on object storage: copies, then removes the source)."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    filesystem, inner = _fs(src)
    _, inner_dst = _fs(dst)
    if filesystem.isdir(inner):
        order = {name: i + 1 for i, name in enumerate(LAST)}
        for rel in sorted(files_under(src), key=lambda r: (order.get(os.path.basename(r), 0), r)):
            filesystem.copy(f"{inner}/{rel}", f"{inner_dst}/{rel}")
    else:
        filesystem.copy(inner, inner_dst)
    filesystem.rm(inner, recursive=True)


def open(path: str, mode: str = "r", **kwargs):  # noqa: A001 (the file system's open)
    """`open` for local paths and URLs."""
    if is_remote(path):
        filesystem, inner = _fs(path)
        return filesystem.open(inner, mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern (`**` recurses), local or a URL."""
    if not is_remote(pattern):
        return sorted(_glob.glob(os.path.expanduser(pattern), recursive=True))
    filesystem, inner = _fs(pattern)
    return sorted(_url(pattern, p) for p in filesystem.glob(inner))


def files_under(directory: str, leave_out: str = "") -> list[str]:
    """Every file below `directory`, as sorted relative paths, but `leave_out`."""
    out = []
    if is_remote(directory):
        filesystem, inner = _fs(directory)
        inner = inner.rstrip("/")
        for path in filesystem.find(inner):
            rel = path[len(inner) + 1 :]
            if rel and rel != leave_out:
                out.append(rel)
        return sorted(out)
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != leave_out:
                out.append(rel)
    return sorted(out)


def kvstore(path: str) -> dict:
    """The tensorstore key-value store of a directory: `file` or `gcs`."""
    path = absolute(path)
    if path.startswith("gs://"):
        bucket, _, inner = path[len("gs://") :].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": inner.rstrip("/") + "/"}
    if is_remote(path):
        raise ValueError(f"tensorstore cannot read {path}: only local paths and gs:// are known")
    return {"driver": "file", "path": path + "/"}


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path holding the file's content: the file itself, or a URL's object downloaded
    into a temporary file removed afterwards."""
    if not is_remote(path):
        yield path
        return
    stage = tempfile.mkdtemp(prefix="llamax-")
    try:
        local = os.path.join(stage, os.path.basename(path.rstrip("/")))
        filesystem, inner = _fs(path)
        filesystem.get_file(inner, local)
        yield local
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def upload(local: str, path: str) -> None:
    """Copies a local file or directory tree to a URL, each file as one object."""
    filesystem, inner = _fs(path)
    if os.path.isdir(local):
        for rel in files_under(local):
            filesystem.put_file(os.path.join(local, rel), f"{inner}/{rel}")
    else:
        filesystem.put_file(local, inner)


# ----- writing whole or not at all -----


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has the id `pid` (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes the temporaries of `path` that no live process of this host is writing; returns
    what was removed."""
    directory, base = os.path.split(absolute(path))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in listdir(directory):
            match = _TEMPORARY.fullmatch(name[len(base) :]) if name.startswith(base) else None
            full = join(directory, name)
            if match is None or full in _ACTIVE or match["host"] not in (None, _HOST):
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or not pid_alive(pid):
                log.warning("removing %s, left by a process that is gone", full)
                remove(full)
                removed.append(full)
    return removed


def _temporary(path: str, suffix: str = "") -> str:
    return f"{path}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A local temporary path to write a file or a directory at, which becomes `path` when
    the block ends without an error (and is removed when it raises). `suffix` keeps an
    extension some writers look at (".png")."""
    path = absolute(path)
    if is_remote(path):
        with _atomic_remote(path, suffix) as tmp:
            yield tmp
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path, suffix)
    _ACTIVE.add(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        was_directory = os.path.isdir(tmp)
        remove(tmp)
        if was_directory:
            _remove_when_settled(tmp)
        if isinstance(e, OSError):
            raise _naming_target(e, tmp, path) from e
        raise
    finally:
        _ACTIVE.discard(tmp)


def _naming_target(e: OSError, tmp: str, path: str) -> OSError:
    """A write's error that names what the user asked for (`path`, or the file under it),
    not the temporary written first, and says it was a write: "[Errno 28] No space left on
    device" alone names nothing."""
    where = path
    for name in (e.filename, e.filename2):
        if isinstance(name, str) and name.startswith(tmp):
            where = path + name[len(tmp) :]
            break
        if isinstance(name, str):  # a file elsewhere (a copy's source): the error says it
            return e
    out = type(e)(f"cannot write {where}: {e.strerror or e}")
    out.errno = e.errno
    return out


@contextlib.contextmanager
def _atomic_remote(path: str, suffix: str) -> Iterator[str]:
    remove_stale_temporaries(path)
    stage = tempfile.mkdtemp(prefix="llamax-")
    local = os.path.join(stage, os.path.basename(path) + suffix)
    try:
        yield local
        if os.path.isdir(local):  # beside the target, then copied to it
            tmp = _temporary(path)
            _ACTIVE.add(tmp)
            try:
                upload(local, tmp)
                rename(tmp, path)
            except BaseException:
                remove(tmp)
                raise
            finally:
                _ACTIVE.discard(tmp)
        else:  # one object: published whole or not at all
            upload(local, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_when_settled(tmp: str, quiet: float = 1.0, limit: float = 10.0) -> None:
    """After a writer was stopped (an error, Ctrl-C, SIGTERM), threads of a library that
    wrote into a temporary directory (orbax's metadata, tensorstore's files) can still finish
    their last write and recreate it: remove it until it has stayed gone for `quiet` seconds,
    and once more at exit, after Python has joined those threads."""
    atexit.register(remove, tmp)
    deadline, gone_since = time.monotonic() + limit, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - gone_since < quiet:
        time.sleep(0.1)
        if os.path.exists(tmp):
            remove(tmp)
            gone_since = time.monotonic()


@contextlib.contextmanager
def no_empty_directory_on_error(path: str) -> Iterator[None]:
    """A local directory this block creates is removed if the block fails having written no
    file into it, so that a failed first run leaves no empty workdir behind (object storage
    has no empty directories)."""
    created = not is_remote(path) and not os.path.exists(path)
    try:
        yield
    except BaseException:
        if created and os.path.isdir(path) and not any(f for _, _, f in os.walk(path)):
            shutil.rmtree(path, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, builtins.open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, builtins.open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, data: Any, **dump_args) -> None:
    """`data` as JSON at `path`, whole or not at all. Strict JSON: a NaN or an infinity is a
    `ValueError` (nothing written) unless the caller asks otherwise; results that may hold
    one go through `json_safe` first."""
    dump_args.setdefault("allow_nan", False)
    write_text(path, json.dumps(data, **dump_args))


def json_safe(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON's null): what strict
    JSON readers accept."""
    if isinstance(data, float):
        return data if data == data and abs(data) != float("inf") else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


def write_lines(path: str, lines) -> None:
    with atomic_path(path) as tmp, builtins.open(tmp, "w") as f:
        f.writelines(lines)


def copy_file(src: str, dst: str) -> None:
    """Copies a file between any two paths, atomically."""
    with atomic_path(dst) as tmp, local_file(src) as local:
        shutil.copyfile(local, tmp)


# ----- checksums -----


def _digest(path: str, digest):
    """`digest` (a hashlib-like object) fed with the file's content, read in 4 MiB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest


def sha256(path: str) -> str:
    return _digest(path, hashlib.sha256()).hexdigest()


def sha256_files(directory: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file (names relative to `directory`), on as many threads as cores
    (hashlib releases the GIL)."""
    return _on_threads(lambda rel: sha256(join(directory, rel)), names)


_STORED = {"md5": "md5Hash", "crc32c": "crc32c"}  # kind -> the object metadata holding it


def object_hash(path: str) -> str:
    """The content hash object storage keeps for an object, read from its metadata (nothing
    is downloaded): `md5:` and its base64 MD5, or for a composite object (which has none)
    `crc32c:` and its CRC32C. MD5 first: many files (tensorstore's OCDBT files among them)
    end with their own CRC32C, which makes the CRC32C of every intact one the same."""
    filesystem, inner = _fs(path)
    info = filesystem.info(inner)
    kind = "md5" if info.get("md5Hash") else "crc32c"
    if not info.get(_STORED[kind]):
        raise OSError(f"{path}: the storage reports no content hash")
    return f"{kind}:{info[_STORED[kind]]}"


def checksums(directory: str, names: list[str], like: dict | None = None) -> dict[str, str]:
    """A checksum of each file: the sha256 of a local one; of an object, the hash object
    storage keeps (`object_hash`), so that a checkpoint on `gs://` is not downloaded to be
    checked. With `like` (checksums recorded earlier), each is computed the way its recorded
    one was (`sha256`, `md5:...`, `crc32c:...`), so that a checkpoint copied between local
    disk and object storage still verifies."""
    if like is None:
        hash_file = object_hash if is_remote(directory) else sha256
        return _on_threads(lambda rel: hash_file(join(directory, rel)), names)
    return _on_threads(lambda rel: _hash(join(directory, rel), str(like[rel]).split(":")[0]), names)


def _hash(path: str, kind: str) -> str:
    if kind not in _STORED:
        return sha256(path)
    if is_remote(path):
        filesystem, inner = _fs(path)
        stored = filesystem.info(inner).get(_STORED[kind])
        if stored:
            return f"{kind}:{stored}"
    import base64

    if kind == "md5":
        digest = hashlib.md5(usedforsecurity=False)
    else:
        import google_crc32c

        digest = google_crc32c.Checksum()
    return f"{kind}:{base64.b64encode(_digest(path, digest).digest()).decode()}"


def _on_threads(function, names: list[str]) -> dict[str, str]:
    """`function(name)` of each name, on as many threads as cores (hashlib releases the GIL;
    requests wait on the network)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(function, names), strict=True))


# ----- files appended to over a run -----


class Mirror:
    """A local directory standing in for `directory` while a run appends to its files
    (object storage cannot append): `local` is written to, `sync()` uploads the files that
    changed since the last sync, each as one object. For a local `directory`, `local` is the
    directory itself and `sync` does nothing. `fetch` names files to download first (to be
    continued)."""

    def __init__(self, directory: str, fetch: tuple[str, ...] = ()):
        self.directory = absolute(directory)
        self.remote = is_remote(self.directory)
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = self.directory
            os.makedirs(self.local, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix="llamax-mirror-")
        for rel in fetch:
            remote = join(self.directory, rel)
            if exists(remote):
                filesystem, inner = _fs(remote)
                filesystem.get_file(inner, os.path.join(self.local, rel))
                self._synced[rel] = self._key(rel)

    def _key(self, rel: str) -> tuple[int, int]:
        stat = os.stat(os.path.join(self.local, rel))
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        if not self.remote:
            return
        for rel in files_under(self.local):
            key = self._key(rel)
            if self._synced.get(rel) != key:
                upload(os.path.join(self.local, rel), join(self.directory, rel))
                self._synced[rel] = key

    def close(self) -> None:
        """Syncs a last time and removes the local stand-in."""
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
