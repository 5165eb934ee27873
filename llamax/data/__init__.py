"""Input data: sources configured by the experiment config's `data` section."""

from __future__ import annotations

import ml_collections

from llamax.data.simple import MarkovSource, TextBytesSource

SOURCES = ("markov", "text_bytes")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "markov"  # one of SOURCES
    c.seed = 0  # shuffling and sampling; independent of train.seed (model init)
    # markov: a random chain over `markov_states` symbols, Dirichlet(`markov_alpha`) rows.
    c.markov_states = 32
    c.markov_alpha = 0.3
    # text_bytes: comma-separated glob patterns of local text files (`**` recurses).
    c.files = ""
    c.validation_fraction = 0.05  # share of files held out for the validation split
    return c


def make_source(c: ml_collections.ConfigDict, split: str):
    """The source of one split; it has `vocab_size` and `rows(step, row_indices, seq_len)`."""
    if c.source == "markov":
        return MarkovSource(c.markov_states, c.markov_alpha, c.seed, split)
    if c.source == "text_bytes":
        if not c.files:
            raise ValueError("data.source 'text_bytes' needs data.files (glob patterns)")
        return TextBytesSource(c.files, c.seed, split, c.validation_fraction)
    raise ValueError(f"Unknown data.source {c.source!r}; expected one of {SOURCES}")
