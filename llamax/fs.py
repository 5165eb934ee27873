"""Files and directories written whole or not at all.

Every file or directory llamax writes for a user (configs, metrics, evaluation results, plots,
tokenizer models, converted checkpoints) goes through `atomic_path`: the content is written
under a temporary name beside the target, then renamed to it, so a reader (or a rerun after a
crash) never sees half of it. Training checkpoints get the same from orbax.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path to write a file or a directory at, renamed to `path` when the block
    ends without an error (removed when it raises). `suffix` keeps an extension some writers
    look at (".png")."""
    path = os.path.abspath(path).rstrip("/")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
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
