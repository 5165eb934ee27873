"""`manifest.json` of a converted directory: its files (size, sha256), format, config,
parameter shapes and what it was converted from (`source`); `verify` checks a directory
against it (`llamax-convert --verify`, and a conversion of a directory llamax wrote)."""

from __future__ import annotations

import os
from collections.abc import Callable

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert import hf
from llamax.convert.formats import FormatError

NAME = "manifest.json"


def write(
    directory: str, config: LlamaConfig, fmt: str, dtype: str, source: dict | None = None
) -> None:
    """The manifest of the converted directory `directory`; `source`: what it was converted
    from, `{"format": ..., "path": absolute input path}` (older manifests have none)."""
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
    if source is not None:
        manifest["source"] = dict(source)
    fs.write_json(os.path.join(directory, NAME), manifest, indent=1, sort_keys=True)


def source(directory: str) -> dict | None:
    """What the converted directory `directory` was converted from, as its manifest recorded
    it (`{"format": ..., "path": ...}`); None when it records none (no manifest, one written
    before llamax recorded sources, or a malformed one)."""
    path = fs.join(directory, NAME)
    if not fs.isfile(path):
        return None
    try:
        recorded = _read(path).get("source")
    except FormatError:
        return None
    ok = isinstance(recorded, dict) and all(
        isinstance(recorded.get(k), str) and recorded[k] for k in ("format", "path")
    )
    return {"format": recorded["format"], "path": recorded["path"]} if ok else None


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


def verify(directory: str, reads: Callable[[str], bool] | None = None) -> list[str]:
    """The problems found in a converted directory against its manifest (empty: all good); a
    missing or malformed manifest raises `FormatError`. `reads`: which file names a reader of
    the directory reads; a file the manifest does not list is a problem only then (other
    files added beside, a README, are not read)."""
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
    unlisted = sorted(present - set(manifest["files"]))
    problems += [f"unexpected file {rel}" for rel in unlisted if reads is None or reads(rel)]
    return problems
