"""The grain pipeline: shuffled, process-sharded, tokenized, packed, batched, resumable.

record source (tfds ArrayRecord) -> global shuffle (seeded, reshuffled each epoch) -> every
epoch repeated -> this process's share (records i, i + P, i + 2P, ...) -> tokenize (BOS/EOS
around each document) -> pack: concatenate documents and cut rows of `seq_len` tokens (a
document longer than what is left of a row continues in the next) -> batches of this
process's rows.

Packed rows carry `segment_ids` (1, 2, ... per document piece in the row, 0 for padding) and
`positions` (from 0 at each piece). A document's continuation in the next row restarts its
positions at 0: rotary attention depends only on distances between tokens, and a token sees
only its own row, so this is the same computation with smaller, more precise angles.

The iterator's state (`get_state`/`set_state`) is grain's: a small dict that goes into each
checkpoint, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from llamax.data.corpus import record_text
from llamax.data.tokenizer import Tokenizer


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer_path: str, text_field: str, add_bos: bool, add_eos: bool):
        self.tokenizer_path, self.text_field = tokenizer_path, text_field
        self.add_bos, self.add_eos = add_bos, add_eos
        self._tokenizer = None

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        if self._tokenizer is None:  # loaded lazily: the transform may be copied to workers
            self._tokenizer = Tokenizer(self.tokenizer_path)
        text = record_text(record, self.text_field)
        return {"tokens": self._tokenizer.encode_array(text, self.add_bos, self.add_eos)}


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": batch["tokens"].astype(np.int32),
        "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
        "positions": batch["tokens_positions"].astype(np.int32),
    }


def make_dataset(
    source,
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    text_field: str = "text",
    add_bos: bool = True,
    add_eos: bool = True,
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows for one process; `num_epochs=None` repeats forever."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # reshuffles each epoch
    ds = ds[process_index::process_count]
    ds = ds.map(_Tokenize(tokenizer_path, text_field, add_bos, add_eos))
    packed = ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
    return packed.batch(batch_size, drop_remainder=num_epochs is None).map(_rename)
