"""The grain pipeline: shuffled, process-sharded, tokenized, packed, batched, resumable.

record indices -> global shuffle (seeded, reshuffled each epoch) -> every epoch repeated ->
this process's share (records i, i + P, i + 2P, ...) -> read and tokenize ahead, on threads
(BOS/EOS around each document) -> pack: each document's tokens poured into rows of `seq_len`
(a document longer than what is left of a row continues in the next) -> batches of this
process's rows.

Packed rows carry `segment_ids` (1, 2, ... per document piece in the row, 0 for padding) and
`positions` (from 0 at each piece). A document's continuation in the next row restarts its
positions at 0: rotary attention depends only on distances between tokens, and a token sees
only its own row, so this is the same computation with smaller, more precise angles.

Time is linear in the tokens and memory bounded whatever the document lengths: documents of
up to `PIECE_CHARS` characters (almost all) are tokenized ahead on threads; a longer one is
only noted ahead (its record index), then read when the packer reaches it and tokenized a
piece at a time (`Tokenizer.encode_pieces`) as rows are cut. The pipeline so holds the
read-ahead of short documents' tokens, the current long document's text and one piece of its
tokens, and a few batches (bench/data_throughput.py measures one 18 MB document).

The iterator's state (`get_state`/`set_state`) is a small dict that goes into each
checkpoint: grain's state of the record stream before the current document, and how many of
that document's tokens are already in rows. A resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from llamax.data.corpus import record_text
from llamax.data.tokenizer import PIECE_CHARS, Tokenizer

# Read-ahead: threads that read and tokenize, and the documents they may run ahead by. Each
# thread holds one record while it works on it, whatever its size, so the threads bound the
# memory of long documents (grain's defaults, 16 threads and 500 documents, are for slow
# remote reads of small records). Two threads tokenize 1.5M tokens/s (docs/performance.md),
# hundreds of times what a TPU host trains on.
READ_AHEAD = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)


class PackedDataset(grain.IterDataset):
    """Rows of `seq_len` tokens packed from a stream of text records."""

    def __init__(self, parent: grain.IterDataset, tokenize, seq_len: int):
        super().__init__(parent)
        self.tokenize, self.seq_len = tokenize, seq_len

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self._parent.__iter__(), self.tokenize, self.seq_len)

    def __str__(self) -> str:
        return f"PackedDataset(seq_len={self.seq_len})"


class _PackedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, tokenize, seq_len: int):
        super().__init__(parent)
        self.tokenize, self.seq_len = tokenize, seq_len
        self._document_state = parent.get_state()  # the stream before the current document
        self._pieces: Iterator[np.ndarray] = iter(())
        self._buffer = np.zeros(0, np.int32)  # tokens of the current piece not yet in a row
        self._consumed = 0  # tokens of the current document already in rows
        self._exhausted = False

    def _next_tokens(self) -> bool:
        """Refills the buffer from the current document, else from the next one; False when
        the stream has ended. Returns True with `_new_document` set at a document start."""
        while not self._buffer.size:
            piece = next(self._pieces, None)
            if piece is not None:
                self._buffer = piece
                continue
            state = self._parent.get_state()
            try:
                record = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return False
            self._document_state, self._consumed = state, 0
            self._pieces, self._new_document = self.tokenize(record), True
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._exhausted:
            raise StopIteration
        t = self.seq_len
        tokens, segment_ids = np.zeros(t, np.int32), np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        filled, segment, self._new_document = 0, 0, False
        while filled < t and self._next_tokens():
            if self._new_document or segment == 0:  # a row starts a piece of its own
                segment, offset, self._new_document = segment + 1, 0, False
            take = min(t - filled, self._buffer.size)
            tokens[filled : filled + take] = self._buffer[:take]
            segment_ids[filled : filled + take] = segment
            positions[filled : filled + take] = offset + np.arange(take)
            self._buffer, self._consumed = self._buffer[take:], self._consumed + take
            filled, offset = filled + take, offset + take
        if filled == 0:
            raise StopIteration
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._document_state, "consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document_state, self._consumed = state["parent"], 0
        self._pieces, self._buffer = iter(()), np.zeros(0, np.int32)
        self._exhausted = False
        skip = int(state["consumed"])
        if skip:
            self._pieces = self.tokenize(next(self._parent))
            while skip:  # the document's tokens already in rows, re-tokenized and dropped
                piece = next(self._pieces)
                drop = min(skip, piece.size)
                self._buffer, skip = piece[drop:], skip - drop
            self._consumed = int(state["consumed"])


class _Documents:
    """Reads and tokenizes documents by record index. `ahead(i)` runs on grain's read-ahead
    threads: a short document's tokens, or for a long one only its index; `pieces(element)`
    runs in the packer: the document's tokens, a piece at a time for a long one."""

    def __init__(self, source, tokenizer_path, text_field, add_bos, add_eos):
        self.source, self.tokenizer_path, self.text_field = source, tokenizer_path, text_field
        self.add_bos, self.add_eos = add_bos, add_eos
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:  # loaded on first use, in whichever thread needs it
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def ahead(self, index) -> dict[str, Any]:
        text = record_text(self.source[int(index)], self.text_field)
        if len(text) > PIECE_CHARS:
            return {"index": int(index)}  # the packer reads it again when it gets there
        return {"tokens": self.tokenizer.encode_array(text, self.add_bos, self.add_eos)}

    def pieces(self, element: dict[str, Any]) -> Iterator[np.ndarray]:
        if "tokens" in element:
            return iter((element["tokens"],))
        text = record_text(self.source[element["index"]], self.text_field)
        return self.tokenizer.encode_pieces(text, self.add_bos, self.add_eos)


def record_indices(
    count: int, seed: int, shard: tuple[int, int], num_epochs: int | None
) -> grain.MapDataset:
    """This process's share (`shard`: its index, the process count) of `count` record indices,
    shuffled over all records (seeded; as `MapDataset.source(records).shuffle(seed)` shuffles
    them), reshuffled and repeated each epoch (`num_epochs=None`: forever)."""
    index, processes = shard
    if not 0 <= index < processes:
        raise ValueError(f"process_index {index} not in [0, {processes})")
    ds = grain.MapDataset.range(count).shuffle(seed=seed).repeat(num_epochs)
    return ds[index::processes]


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
    documents = _Documents(source, tokenizer_path, text_field, add_bos, add_eos)
    ds = record_indices(len(source), seed, (process_index, process_count), num_epochs)
    ds = ds.map(documents.ahead)
    packed = PackedDataset(ds.to_iter_dataset(READ_AHEAD), documents.pieces, seq_len)
    return packed.batch(batch_size, drop_remainder=num_epochs is None)
