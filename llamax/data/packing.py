"""Whole examples packed into rows, resumable: what chat and preference data share.

`packed_dataset` maps each of this process's shuffled record indices to an example
(`encode(record, tokenizer)`, a dict of int32 arrays) or a counted skip, and packs whole
examples, in order, one after the other into rows of `seq_len` (`PackedExamples`); an
example that does not fit in what is left of a row starts the next one (the rest of the row
is padding, segment 0). Each example is one segment or more (ids 1, 2, ...) with positions
from 0 in each, so nothing is attended or predicted across examples. An example longer than
a row is skipped as "too long", or with `too_long="truncate"` cut to its first `seq_len`
tokens if a trained token is among them. The iterator's state is grain's state of the record
stream before the example waiting for the next row, and the skip counts: a resumed run sees
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import grain
import numpy as np

from llamax.data import records as records_lib
from llamax.data.pipeline import READ_AHEAD, record_indices
from llamax.data.records import BadRecord
from llamax.data.tokenizer import Tokenizer

log = logging.getLogger("llamax")


class _Examples:
    """(stream position, record index) -> an example (`encode(record, tokenizer)`: a dict of
    int32 arrays with `tokens` and `loss_mask`) or {"skip": reason, ...}, each with its
    position in the stream ("at"); runs on grain's threads."""

    def __init__(self, records, tokenizer_path, seq_len, encode, too_long):
        self.records, self.tokenizer_path, self.seq_len = records, tokenizer_path, seq_len
        self.encode, self.too_long = encode, too_long
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _skip(self, position: int, index: int, reason: str, detail: str) -> dict[str, Any]:
        where = records_lib.where(self.records, index)
        return {"skip": reason, "at": position, "where": where, "detail": detail}

    def __call__(self, position, index) -> dict[str, Any]:
        position, index = int(position), int(index)
        try:
            example = self.encode(self.records[index], self.tokenizer)
        except BadRecord as e:
            return self._skip(position, index, e.reason, str(e))
        n = example["tokens"].size
        if n > self.seq_len:
            if self.too_long == "drop" or not example["loss_mask"][: self.seq_len].any():
                detail = f"too long: {n} tokens > seq_len {self.seq_len}"
                return self._skip(position, index, "too long", detail)
            example = {k: v[: self.seq_len] for k, v in example.items()}
        return {**example, "at": position}


class PackedExamples(grain.IterDataset):
    """Rows of `seq_len` tokens packed from whole examples, at most `per_row` of them a row.

    An example is int32 arrays of one length: `tokens`, `loss_mask`, any of `fields`, and
    optionally `segments` (its parts, numbered from 1: a preference pair is two, chosen and
    rejected) with `positions` (restarting at each part); without them it is one segment with
    positions from 0. Segment ids run on across a row's examples. Each element carries its
    position in this process's stream of `records` record indices ("at", `shard`: this
    process's index and the process count), from which the packer knows where each pass over
    the records ends: it logs the first whole pass (examples, rows, skips), and a whole pass
    with no usable record is an error when another would follow (of `passes`; None: forever),
    where repeating it would never make a row. `name` begins its messages."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, fields=(), per_row=None,
                 records: int | None = None, shard=(0, 1), name: str = "data",
                 passes: int | None = None):  # fmt: skip
        super().__init__(parent)
        self.seq_len, self.fields, self.per_row = seq_len, tuple(fields), per_row
        self.records, self.shard, self.name, self.passes = records, tuple(shard), name, passes

    def __iter__(self) -> _PackedExamplesIterator:
        return _PackedExamplesIterator(
            self._parent.__iter__(), self.seq_len, self.fields, self.per_row, self.records,
            self.shard, self.name, self.passes,
        )  # fmt: skip

    def __str__(self) -> str:
        return f"PackedExamples(seq_len={self.seq_len})"


class _Pass:
    """What one pass over this process's share of the records gave: examples, skips by
    reason, and the rows its examples went into; `whole`: whether the iterator saw it from
    its first record."""

    def __init__(self, number: int, whole: bool):
        self.number, self.whole = number, whole
        self.examples = self.rows = 0
        self.last_row = -1  # the last row an example of it went into
        self.skipped: collections.Counter = collections.Counter()
        self.report = False  # to be logged once its last example is in a row


class _PackedExamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, fields=(), per_row=None,
                 records: int | None = None, shard=(0, 1), name: str = "data",
                 passes: int | None = None):  # fmt: skip
        super().__init__(parent)
        self.seq_len, self.fields, self.per_row, self.records = seq_len, fields, per_row, records
        self.shard, self.name, self.passes = shard, name, passes
        self._pending: dict | None = None  # an example waiting for the next row
        self._pending_state = None  # the stream's state before it
        self.skipped: collections.Counter = collections.Counter()
        self._pass: _Pass | None = None
        self._rows = 0  # rows made
        self._summarized = False

    def _pass_of(self, at: int) -> int:
        """The pass over the records that stream position `at` of this process belongs to."""
        index, processes = self.shard
        return (index + at * processes) // self.records

    def _count(self, element: dict) -> None:
        """Counts an element in its pass; at the last element of a pass seen whole, reports
        it (the first time) or refuses data of which no record is usable."""
        if not self.records:
            return
        at = element["at"]
        number = self._pass_of(at)
        if self._pass is None or self._pass.number != number:
            whole = at == 0 or self._pass_of(at - 1) != number
            self._pass = _Pass(number, whole)
        if "skip" in element:
            self._pass.skipped[element["skip"]] += 1
        else:
            self._pass.examples += 1
        if self._pass.whole and self._pass_of(at + 1) != number:
            self._pass_done(self._pass, last_is_example="skip" not in element)

    def _records_read(self, done: _Pass) -> str:
        index, processes = self.shard
        if processes == 1:
            return f"the {self.records:,} records"
        share = done.examples + sum(done.skipped.values())
        return f"the {share:,} records process {index} of {processes} reads (of {self.records:,})"

    def _pass_done(self, done: _Pass, last_is_example: bool) -> None:
        if not done.examples and (self.passes is None or done.number + 1 < self.passes):
            raise ValueError(
                f"{self.name}: none of {self._records_read(done)} is usable (skipped: "
                f"{dict(done.skipped)}; the warnings above say why)"
            )
        if done.examples and not self._summarized:
            self._summarized = done.report = True
            if not last_is_example:
                self._report(done)

    def _report(self, done: _Pass) -> None:
        skipped = sum(done.skipped.values())
        reasons = f" ({dict(done.skipped)})" if skipped else ""
        log.info(
            "%s: a pass over %s: %d examples packed into %d rows, %d records skipped%s",
            self.name, self._records_read(done), done.examples, done.rows, skipped, reasons,
        )  # fmt: skip
        done.report = False

    def _placed(self) -> None:
        """Counts the row of an example just placed in it (an example of the current pass)."""
        done = self._pass
        if done is None:
            return
        if done.last_row != self._rows:
            done.rows, done.last_row = done.rows + 1, self._rows
        if done.report and self._pass_of(self._pending["at"] + 1) != done.number:
            self._report(done)

    def _take(self) -> dict | None:
        while self._pending is None:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                return None
            if "skip" in element:
                self.skipped[element["skip"]] += 1
                total = sum(self.skipped.values())
                if total <= 10 or total % 1000 == 0:
                    log.warning(
                        "%s: skipped %s (%s); %d skipped so far: %s",
                        self.name, element["where"], element["detail"], total, dict(self.skipped),
                    )  # fmt: skip
                self._count(element)
                continue
            self._count(element)
            self._pending, self._pending_state = element, state
        return self._pending

    def __next__(self) -> dict[str, np.ndarray]:
        t = self.seq_len
        fields = ("tokens", "segment_ids", "positions", "loss_mask", *self.fields)
        row = {k: np.zeros(t, np.int32) for k in fields}
        filled = segment = examples = 0
        while (example := self._take()) is not None:
            n = example["tokens"].size
            if filled + n > t or examples == self.per_row:
                break  # it starts the next row
            parts = example.get("segments", np.ones(n, np.int32))
            for k in ("tokens", "loss_mask", *self.fields):
                row[k][filled : filled + n] = example[k]
            row["segment_ids"][filled : filled + n] = segment + parts
            row["positions"][filled : filled + n] = example.get("positions", np.arange(n))
            segment += int(parts.max())
            filled += n
            examples += 1
            self._placed()
            self._pending = None
        if filled == 0:
            raise StopIteration
        self._rows += 1
        return row

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self.skipped = collections.Counter(state.get("skipped", {}))
        self._pass = None


def packed_dataset(
    records, tokenizer_path, seq_len, batch_size, seed, shard, num_epochs, encode,
    too_long="drop", fields=(), per_row=None, name="data",
) -> grain.IterDataset:  # fmt: skip
    """Batches of rows packed from the examples `encode(record, tokenizer)` makes of `records`
    (shuffled, sharded, repeated as `record_indices`); see `PackedExamples`."""
    examples = _Examples(records, tokenizer_path, seq_len, encode, too_long)
    ds = record_indices(len(records), seed, shard, num_epochs).map_with_index(examples)
    packed = PackedExamples(ds.to_iter_dataset(READ_AHEAD), seq_len, fields, per_row,
                            len(records), shard, name, num_epochs)  # fmt: skip
    return packed.batch(batch_size, drop_remainder=num_epochs is None)
