"""A synthetic source: a random first-order Markov chain over a small alphabet.

Its entropy rate is known exactly, so a test can check that training reaches it. The source
is stateless: row `r` of step `s` is a pure function of (seed, split, s, r). A process asks
only for the rows its devices hold, so the global batch is the same for any number of
processes.

Batches are dicts of int32 numpy arrays [rows, seq_len]: `tokens`, `segment_ids` (0 is
padding), `positions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation")


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
