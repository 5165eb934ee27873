"""Data sources that need no tokenizer model and no dataset build.

- `markov`: a random first-order Markov chain over a small alphabet. Its entropy rate is known
  exactly, so a test can check that training reaches it.
- `text_bytes`: local text files as UTF-8 bytes (id = byte + 3, after Llama's UNK 0, BOS 1 and
  EOS 2), each file one document wrapped in BOS ... EOS. Rows are windows at random offsets of
  the concatenated documents, with segment ids and per-document positions.

Both are stateless: row `r` of step `s` is a pure function of (seed, split, s, r). A process
asks only for the rows its devices hold, so the global batch is the same for any number of
processes, and resuming at step s needs no iterator state.

Batches are dicts of int32 numpy arrays [rows, seq_len]: `tokens`, `segment_ids` (0 is
padding), `positions`.
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation")
BYTE_OFFSET = 3  # ids 0, 1, 2 are UNK, BOS, EOS as in Llama's tokenizer
BOS, EOS = 1, 2


def _row_rng(seed: int, split: str, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), step, row])


class MarkovSource:
    """A stationary first-order Markov chain with Dirichlet(alpha) transition rows."""

    def __init__(self, num_states: int, alpha: float, seed: int, split: str):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
        self.seed, self.split = seed, split
        rng = np.random.default_rng([seed, 1234])  # the chain itself is the same for all splits
        self.transitions = rng.dirichlet(np.full(num_states, alpha), size=num_states)
        self.cumulative = np.cumsum(self.transitions, axis=1)
        eigvals, eigvecs = np.linalg.eig(self.transitions.T)
        stationary = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1))])
        self.stationary = stationary / stationary.sum()
        self.vocab_size = num_states

    @property
    def entropy_rate(self) -> float:
        """Nats per token: the loss of a model that knows the chain."""
        p = self.transitions
        row_entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def rows(self, step: int, row_indices: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        uniforms = np.stack(
            [_row_rng(self.seed, self.split, step, r).random(seq_len) for r in row_indices]
        )
        n = len(row_indices)
        tokens = np.empty((n, seq_len), np.int32)
        state = np.searchsorted(np.cumsum(self.stationary), uniforms[:, 0]).clip(
            0, self.vocab_size - 1
        )
        tokens[:, 0] = state
        for t in range(1, seq_len):
            state = (
                (self.cumulative[state] < uniforms[:, t, None])
                .sum(axis=1)
                .clip(0, self.vocab_size - 1)
            )
            tokens[:, t] = state
        return {
            "tokens": tokens,
            "segment_ids": np.ones((n, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
        }


def split_files(paths: Sequence[str], split: str, validation_fraction: float) -> list[str]:
    """Assigns each file to a split by a hash of its name: stable as files come and go."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    buckets = 10_000
    held_out = {
        p
        for p in paths
        if zlib.crc32(os.path.basename(p).encode()) % buckets < validation_fraction * buckets
    }
    return [p for p in paths if (p in held_out) == (split == "validation")]


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching comma-separated glob patterns (`**` recurses)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files: set[str] = set()
    for pattern in patterns:
        matches = [
            p
            for p in glob.glob(os.path.expanduser(pattern.strip()), recursive=True)
            if os.path.isfile(p)
        ]
        if not matches:
            raise FileNotFoundError(f"No files match {pattern!r}")
        files.update(matches)
    return sorted(files)


class TextBytesSource:
    """UTF-8 bytes of local text files, one document per file."""

    vocab_size = 256 + BYTE_OFFSET

    def __init__(
        self,
        patterns: str | Sequence[str],
        seed: int,
        split: str,
        validation_fraction: float = 0.05,
    ):
        files = split_files(expand_patterns(patterns), split, validation_fraction)
        if not files:
            raise ValueError(
                f"No files for the {split!r} split of {patterns!r}: "
                "add files or change data.validation_fraction"
            )
        self.seed, self.split, self.files = seed, split, files
        docs = []
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            if data:
                docs.append(
                    np.concatenate(
                        [[BOS], np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET, [EOS]]
                    )
                )
        if not docs:
            raise ValueError(f"All {len(files)} files of the {split!r} split are empty")
        lengths = np.array([len(d) for d in docs])
        self.stream = np.concatenate(docs).astype(np.int32)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.num_documents = len(docs)

    def rows(self, step: int, row_indices: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        n = len(row_indices)
        out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
        for i, r in enumerate(row_indices):
            start = int(_row_rng(self.seed, self.split, step, r).integers(0, len(self.stream)))
            window = np.arange(start, start + seq_len) % len(self.stream)  # wraps around the end
            doc = np.searchsorted(self.doc_starts, window, side="right") - 1
            out["tokens"][i] = self.stream[window]
            boundary = (np.diff(doc, prepend=doc[0]) != 0) | (np.diff(window, prepend=start) < 0)
            out["segment_ids"][i] = 1 + np.cumsum(boundary)
            out["positions"][i] = window - self.doc_starts[doc]
        return out
