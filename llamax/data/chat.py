"""Chat and prompt/completion data for supervised fine-tuning: Meta's chat format with a loss
mask per token, packed into rows, resumable.

Records are JSON objects, one per line of `.jsonl` (or `.jsonl.gz`) files, or the examples of
a prepared tfds dataset (`TfdsRecords`: the same fields as features, or one JSON record in a
text feature):
- a dialog, `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`:
  an optional system prompt, then user and assistant turns alternating, ending with the
  assistant's; formatted token for token as Meta's `Llama.chat_completion` formats the
  dialogs it is given (`dialog_tokens`, which generation uses too): the system prompt inside
  `<<SYS>>` in the first user turn, each exchange `BOS [INST] question [/INST] answer EOS`;
- a prompt/completion pair, `{"prompt": ..., "completion": ...}`: `BOS prompt completion EOS`,
  the texts as they are (no chat markup).

The loss mask is 1 on the tokens the model is trained to predict: each answer (completion)
and the EOS that closes it; 0 on system and user turns, the `[INST]` markup, the BOS, and
padding. `train_on="everything"` puts 1 on every token of the example.

The files are read in bounded memory (`records.JsonlRecords`): their lines are indexed in one
streaming pass and read when an example needs them; a line too long for any example that fits
a row (`records.max_record_bytes`) is never read.

Bad records are skipped, counted by reason and logged with their file and line: a line that
is not UTF-8, not JSON, nested too deeply or not an object, text that is not valid Unicode,
roles out of order or unknown, an empty answer, special tags in the text, a line too long to
read, and, with `too_long="drop"`, an example longer than a row (`too_long="truncate"` keeps
its first `seq_len` tokens, if an answer token is among them). A whole pass over this
process's share of the records with no usable one is an error that counts them by reason.

Packing: whole examples, in shuffled order, one after the other into rows of `seq_len`; an
example that does not fit in what is left of a row starts the next one (the rest of the
row is padding, segment 0). Each example is a segment (ids 1, 2, ...) with positions from
0, so nothing is attended or predicted across examples. The iterator's state is grain's
state of the record stream before the example waiting for the next row, and the skip counts:
a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import collections
import gzip
import io
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import grain
import numpy as np

from llamax import fs
from llamax.data import records as records_lib
from llamax.data.pipeline import READ_AHEAD, record_indices
from llamax.data.records import BadRecord, JsonlRecords, parse
from llamax.data.tokenizer import NotUnicode, Tokenizer

log = logging.getLogger("llamax")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
TRAIN_ON = ("answers", "everything")
TOO_LONG = ("drop", "truncate")


def _encode(tokenizer: Tokenizer, text: str, bos: bool, eos: bool) -> list[int]:
    """`tokenizer.encode`, text that is not valid Unicode a bad record."""
    try:
        return tokenizer.encode(text, bos=bos, eos=eos)
    except NotUnicode as e:
        raise BadRecord("not valid Unicode", e.detail) from None


def exchanges(dialog: Sequence[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """A dialog as (question, answer) pairs and the last question still awaiting an answer
    (None when it ends with an answer), the system prompt merged into the first question."""
    if not isinstance(dialog, list | tuple) or not dialog:
        raise BadRecord("malformed", "the messages must be a non-empty list")
    for turn in dialog:
        if not (isinstance(turn, dict) and isinstance(turn.get("content"), str)):
            raise BadRecord("malformed", "each message needs a role and a string content")
        if any(tag in turn["content"] for tag in SPECIAL_TAGS):
            detail = f"Special tags {SPECIAL_TAGS} are not allowed in a message"
            raise BadRecord("special tags", detail)
    dialog = list(dialog)
    if dialog[0].get("role") == "system":
        if len(dialog) < 2:
            raise BadRecord("roles", "a system prompt needs a user turn after it")
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1].get("role"), "content": first}, *dialog[2:]]
    roles = [turn.get("role") for turn in dialog]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise BadRecord("roles", f"Roles must be (system), user, assistant, user, ...; got {roles}")
    pairs = [(q["content"], a["content"]) for q, a in zip(dialog[::2], dialog[1::2], strict=False)]
    last = dialog[-1]["content"] if roles[-1] == "user" else None
    return pairs, last


def dialog_tokens(dialog: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a dialog in Meta's chat format, and the loss mask (1 on each answer and its
    EOS). A dialog ending with a user turn ends with that question awaiting its answer (what
    generation continues); one ending with the assistant's is a whole training example."""
    pairs, last = exchanges(dialog)
    ids: list[int] = []
    mask: list[int] = []
    for question, answer in pairs:
        prompt = f"{B_INST} {question.strip()} {E_INST}"
        whole = _encode(tokenizer, f"{prompt} {answer.strip()} ", True, True)
        # The answer starts where the prompt's own tokens stop matching the whole exchange's
        # (the space before the answer always starts a new piece in Llama's tokenizer).
        head = _encode(tokenizer, prompt, True, False)
        cut = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), None)
        cut = min(len(head), len(whole) - 1) if cut is None else cut
        ids += whole
        mask += [0] * cut + [1] * (len(whole) - cut)
    if last is not None:
        question = _encode(tokenizer, f"{B_INST} {last.strip()} {E_INST}", True, False)
        ids += question
        mask += [0] * len(question)
    return ids, mask


def example_tokens(
    record: Any, tokenizer: Tokenizer, train_on: str = "answers"
) -> tuple[np.ndarray, np.ndarray]:
    """One record (a dialog or a prompt/completion pair, parsed or as its JSON line) as int32
    tokens and its int32 loss mask; `BadRecord` for one that cannot be an example."""
    record = parse(record)
    if "messages" in record:
        pairs, last = exchanges(record["messages"])
        if last is not None:
            raise BadRecord("roles", "a training dialog must end with the assistant's turn")
        if any(not answer.strip() for _, answer in pairs):
            raise BadRecord("empty answer")
        ids, mask = dialog_tokens(record["messages"], tokenizer)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise BadRecord("malformed", "prompt and completion must be strings")
        if not completion.strip():
            raise BadRecord("empty answer")
        head = _encode(tokenizer, prompt, True, False)
        ids = _encode(tokenizer, prompt + completion, True, True)
        cut = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), None)
        cut = min(len(head), len(ids) - 1) if cut is None else cut
        mask = [0] * cut + [1] * (len(ids) - cut)
    else:
        raise BadRecord("malformed", 'a record needs "messages", or "prompt" and "completion"')
    if train_on == "everything":
        mask = [1] * len(ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def read_file(path: str) -> bytes:
    """A file's bytes, gunzipped when it ends in .gz; a broken gzip file is a ValueError. The
    whole file in memory: for small files (prompts); training data is read as
    `read_records`."""
    data = fs.read_bytes(path)
    if path.endswith(".gz"):
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    return data


def read_records(files: str, max_bytes: int | None = None) -> JsonlRecords:
    """Every non-blank line of the jsonl(.gz) files the comma-separated glob patterns match,
    in sorted path order, read on demand in bounded memory (parsed later, so that a bad line
    is one skipped record); a line longer than `max_bytes` raises `BadRecord("too long")`
    when it is asked for (`records.JsonlRecords`)."""
    records = JsonlRecords(files, max_bytes)
    if not len(records):
        raise ValueError(f"No records in the files {files!r}")
    return records


def split_records(records: Sequence[bytes], split: str, validation_fraction: float) -> Sequence:
    """The train or validation share (a view of `records`), by a hash of each record's text:
    the same record lands in the same split whatever the files' order. An empty share is an
    error that says why and what to do (`records.split`)."""
    return records_lib.split(records, split, validation_fraction)


def _plain(value):
    """A tfds value as JSON would have it: text (UTF-8 bytes) as str, numpy scalars as Python
    numbers, arrays as lists, and a sequence of a FeaturesDict (which tfds returns as a dict
    of arrays) as a list of dicts."""
    if isinstance(value, dict):
        columns = {k: _plain(v) for k, v in value.items()}
        if len({len(c) for c in columns.values()}) > 1:
            raise BadRecord("malformed", f"the sequence's features differ in length: {columns}")
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    if isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim):
        return [_plain(x) for x in value]
    value = value.item() if isinstance(value, np.ndarray | np.generic) else value
    return value.decode("utf-8") if isinstance(value, bytes) else value


class TfdsRecords(Sequence):
    """One split of a prepared tfds dataset (random access, ArrayRecord) as records: each
    example with one of the `accepted` sets of features as a dict of them (`_plain` values),
    or else the JSON record held in its text feature `text_field`."""

    def __init__(self, source, text_field: str = "text", name: str = "the tfds dataset",
                 accepted=({"messages"}, {"prompt", "completion"})):  # fmt: skip
        self.source, self.text_field, self.accepted = source, text_field, accepted
        features = set(source[0])
        if not any(a <= features for a in accepted) and text_field not in features:
            wanted = " or ".join(", ".join(f"`{f}`" for f in sorted(a)) for a in accepted)
            raise ValueError(
                f"{name} has the features {sorted(features)}; these records need {wanted}, or a "
                f"text feature data.text_field ({text_field!r}) holding one JSON record"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        example = self.source[int(index)]
        try:
            if any(a <= set(example) for a in self.accepted):
                return {k: _plain(v) for k, v in example.items()}
            return _plain(example[self.text_field])
        except UnicodeDecodeError as e:
            raise BadRecord("not UTF-8", f"not UTF-8: {e}") from None


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


def _chat_example(record, tokenizer: Tokenizer, train_on: str) -> dict[str, np.ndarray]:
    tokens, mask = example_tokens(record, tokenizer, train_on)
    return {"tokens": tokens, "loss_mask": mask}


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


def make_dataset(
    records: Sequence[bytes],
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    num_epochs: int | None = None,
    train_on: str = "answers",
    too_long: str = "drop",
    name: str = "data",
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows of examples for this process (`shard`: its index,
    the process count), with the fields `tokens`, `segment_ids`, `positions`, `loss_mask`;
    `num_epochs=None` repeats forever; `name` begins the log lines and errors."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.chat_train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"data.chat_too_long must be one of {TOO_LONG}, got {too_long!r}")
    encode = partial(_chat_example, train_on=train_on)
    return packed_dataset(records, tokenizer_path, seq_len, batch_size, seed, shard, num_epochs,
                          encode, too_long, name=name)  # fmt: skip


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
