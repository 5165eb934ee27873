"""`manifest.json` of a converted directory: its files (size, sha256), format, config and
parameter shapes; `verify` checks a directory against it (`llamax-convert --verify`)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert import hf

NAME = "manifest.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_files(directory: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file, on as many threads as cores (hashlib releases the GIL)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        digests = pool.map(lambda rel: _sha256(os.path.join(directory, rel)), names)
        return dict(zip(names, digests, strict=True))


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != NAME:
                out.append(rel)
    return sorted(out)


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
            for rel, digest in _hash_files(directory, _files(directory)).items()
        },
    }
    fs.write_json(os.path.join(directory, NAME), manifest, indent=1, sort_keys=True)


def verify(directory: str) -> list[str]:
    """The problems found in a converted directory against its manifest (empty: all good)."""
    path = os.path.join(directory, NAME)
    if not os.path.exists(path):
        return [f"no {NAME} in {directory}"]
    with open(path) as f:
        manifest = json.load(f)
    problems = []
    present = set(_files(directory))
    to_hash = []
    for rel, info in manifest["files"].items():
        full = os.path.join(directory, rel)
        if rel not in present:
            problems.append(f"missing file {rel}")
        elif os.path.getsize(full) != info["bytes"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, manifest says {info['bytes']}")
        else:
            to_hash.append(rel)
    for rel, digest in _hash_files(directory, to_hash).items():
        if digest != manifest["files"][rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(manifest["files"]))]
    return problems
