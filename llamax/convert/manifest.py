"""`manifest.json` of a converted directory: its files (size, sha256), format, config and
parameter shapes; `verify` checks a directory against it (`llamax-convert --verify`)."""

from __future__ import annotations

import os

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert import hf
from llamax.convert.formats import FormatError

NAME = "manifest.json"


def write(directory: str, config: LlamaConfig, fmt: str, dtype: str) -> None:
    manifest = {
        "format": fmt,
        "config": config.to_dict(),
        "dtype": dtype,
        "parameters": {
            name: {"shape": list(shape), "dtype": dtype}
            for name, shape in hf.expected_hf_shapes(config).items()
        },
        "files": {
            rel: {"bytes": os.path.getsize(os.path.join(directory, rel)), "sha256": digest}
            for rel, digest in fs.sha256_files(directory, fs.files_under(directory, NAME)).items()
        },
    }
    fs.write_json(os.path.join(directory, NAME), manifest, indent=1, sort_keys=True)


def _read(path: str) -> dict:
    """The manifest, its structure checked: a malformed one raises `FormatError`."""
    try:
        manifest = fs.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not JSON ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise FormatError(f"{path}: malformed, 'files' must map file names to sizes and hashes")
    for rel, info in files.items():
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or ".." in parts or rel in ("", "."):
            raise FormatError(f"{path}: file name {rel[:100]!r} is not inside the directory")
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int)
        if not ok or not isinstance(info.get("sha256"), str):
            raise FormatError(f"{path}: malformed entry for {rel[:100]!r}: needs bytes and sha256")
    return manifest


def verify(directory: str) -> list[str]:
    """The problems found in a converted directory against its manifest (empty: all good); a
    missing or malformed manifest raises `FormatError`."""
    path = fs.join(directory, NAME)
    if not fs.isfile(path):
        raise FormatError(f"no {NAME} in {directory}: not a converted directory")
    manifest = _read(path)
    problems = []
    present = set(fs.files_under(directory, NAME))
    to_hash = []
    for rel, info in manifest["files"].items():
        if rel not in present:
            problems.append(f"missing file {rel}")
        elif (size := fs.getsize(fs.join(directory, rel))) != info["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {info['bytes']}")
        else:
            to_hash.append(rel)
    for rel, digest in fs.sha256_files(directory, to_hash).items():
        if digest != manifest["files"][rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(manifest["files"]))]
    return problems
