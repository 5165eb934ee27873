"""Records of jsonl files, read in bounded memory: one JSON object a line of `.jsonl` (or
`.jsonl.gz`) files, local or on `gs://`, apart from what the records mean (chat and
preference data use them).

`JsonlRecords` indexes the non-blank lines of the files in one streaming pass over each, a
block at a time, never holding a line whole: per line it keeps only where it is, its length
and its CRC-32 (numpy arrays), so memory grows with the number of records, never with their
bytes. A line is read when asked for (`os.pread`, safe on grain's threads). A `.gz` or a
remote file is streamed once into a local spill file (a temporary directory removed at
exit), and only its lines within `max_bytes` are copied, so a gzip bomb of one giant line
costs neither memory nor disk. A line longer than `max_bytes` is never read: asking for it
raises `BadRecord("too long")`, a record skipped and counted like any other bad one.

`parse` turns a line into a dict, and every way a line can fail into a `BadRecord` with a
short, countable reason: not UTF-8, not JSON, nested too deeply, not an object, or text that
is not valid Unicode (a lone surrogate such as JSON's `"\\ud800"`, which no tokenizer can
encode).

`split` holds a share of the records out for validation by the CRC-32 of each line, so the
same record lands in the same split whatever the files' order.
"""

from __future__ import annotations

import array
import gzip
import json
import os
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from llamax import fs
from llamax.data.tokenizer import lone_surrogate

BLOCK = 1 << 20  # bytes read at a time while indexing
# JSON can escape one byte of text as six (`\u0041`), and a token covers at most the
# tokenizer's longest piece; keys, markup and whitespace of a record that fits a row take
# less than this beyond that.
ESCAPE_BYTES = 6
ALLOWANCE = 1 << 16


class BadRecord(ValueError):
    """A record that cannot be an example; `reason` is its short, countable cause, and its
    message says it once: the reason alone, a detail that begins with it, or "reason: detail"."""

    def __init__(self, reason: str, detail: str = ""):
        if detail and not detail.lower().startswith(reason.lower()):
            detail = f"{reason}: {detail}"
        super().__init__(detail or reason)
        self.reason = reason


def check_unicode(value: Any) -> None:
    """`BadRecord("not valid Unicode")` if any string in a parsed record (its keys too) is not
    valid Unicode; walks the record with a stack of its own, never recursing."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if (at := lone_surrogate(item)) is not None:
                detail = f"a lone surrogate {item[at]!r} at character {at} of a string"
                raise BadRecord("not valid Unicode", detail)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def parse(record: Any) -> dict:
    """A record as a dict: parsed when given as its JSON line (bytes or str); `BadRecord` for
    a line that is not UTF-8, not JSON, nested too deeply, not an object, or holds text that
    is not valid Unicode."""
    if isinstance(record, bytes | bytearray | memoryview):
        try:
            record = bytes(record).decode("utf-8")
        except UnicodeDecodeError as e:
            detail = f"not UTF-8: byte {e.start} is {e.object[e.start]:#x}"
            raise BadRecord("not UTF-8", detail) from None
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except RecursionError:
            raise BadRecord("nested too deeply", "nested too deeply to parse") from None
        except ValueError as e:
            raise BadRecord("not JSON", f"not JSON: {str(e)[:100]}") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed", "a record must be a JSON object")
    check_unicode(record)
    return record


def max_record_bytes(seq_len: int, tokenizer) -> int:
    """The longest line a record that fits a row of `seq_len` tokens can have.

    A token covers at most the tokenizer's longest piece, L bytes of UTF-8 text, and JSON
    writes one byte of text in at most 6 (an escape like `\\u0041`): a line longer than
    6 * L * (seq_len + 1) bytes holds more than seq_len tokens of text, beyond the keys and
    markup the allowance leaves room for. Longer lines are skipped as too long without being
    read, so that memory stays bounded; with `chat_too_long="truncate"` too (a line that long
    could fit a row only if most of it were whitespace the chat format strips, fields that
    are not tokenized, or text a normalizing tokenizer folds)."""
    return ESCAPE_BYTES * tokenizer.max_piece_bytes * (seq_len + 1) + ALLOWANCE


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching comma-separated glob patterns (`**` recurses)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise ValueError("No corpus files given: set data.files to glob patterns")
    files: set[str] = set()
    for pattern in patterns:
        matches = [p for p in fs.glob(pattern.strip()) if fs.isfile(p)]
        if not matches:
            if not any(c in pattern for c in "*?["):  # a name: say what it is instead
                fs.require_file(pattern.strip())
            raise FileNotFoundError(f"No files match {pattern!r}")
        files.update(matches)
    return sorted(files)


def read_records(files: str | Sequence[str], max_bytes: int | None = None) -> JsonlRecords:
    """Every non-blank line of the jsonl(.gz) files the comma-separated glob patterns match
    (`JsonlRecords`); none at all is a `ValueError`."""
    records = JsonlRecords(files, max_bytes)
    if not len(records):
        raise ValueError(f"No records in the files {files!r}")
    return records


class _Spill:
    """A local file the lines of compressed and remote files are copied into, in a temporary
    directory removed when the records are collected or the process exits."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="llamax-records-")
        self.path = os.path.join(self.directory, "lines")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.size = 0
        self._finalizer = weakref.finalize(self, _remove_spill, self.fd, self.directory)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written


def _remove_spill(fd: int, directory: str) -> None:
    os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


class _Indexer:
    """One streaming pass over one file's bytes: the non-blank lines (without their line end,
    `\\n` or `\\r\\n`) as offset, length, CRC-32 and line number, fed a block at a time."""

    def __init__(self, records: JsonlRecords, file: int, spill: _Spill | None):
        self.records, self.file, self.spill = records, file, spill
        self.max_bytes = records.max_bytes
        self.stream = 0  # offset in the file's (decompressed) bytes of the block being read
        self.line = 1
        self._start_line(0)

    def _start_line(self, stream_offset: int) -> None:
        self.start = stream_offset
        self.spill_start = self.spill.size if self.spill else 0
        self.length, self.crc, self.blank, self.held_cr = 0, 0, True, False

    def _feed(self, part: bytes) -> None:
        if not part:
            return
        if self.blank and part.strip():
            self.blank = False
        if self.spill and (self.max_bytes is None or self.length + len(part) <= self.max_bytes):
            self.spill.write(self.spill_start + self.length, part)
        self.crc = zlib.crc32(part, self.crc)
        self.length += len(part)

    def _end_line(self, next_start: int) -> None:
        if not self.blank:
            fits = self.max_bytes is None or self.length <= self.max_bytes
            offset = self.spill_start if self.spill else self.start
            self.records._add(self.file, offset, self.length, self.crc, self.line, fits)
            if self.spill and fits:
                self.spill.size = self.spill_start + self.length
        self.line += 1
        self._start_line(next_start)

    def block(self, data: bytes) -> None:
        parts = data.split(b"\n")
        position = self.stream
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            raw = len(part)
            if self.held_cr:  # a \r at the end of the previous block: a CRLF, or text
                self.held_cr = False
                if part or last:
                    self._feed(b"\r")
            if part.endswith(b"\r"):
                part = part[:-1]
                self.held_cr = last
            self._feed(part)
            position += raw
            if not last:
                position += 1
                self._end_line(position)
        self.stream += len(data)

    def finish(self) -> None:
        self.held_cr = False  # a \r ending the file ends its last line
        if not self.blank:
            self._end_line(self.stream)


class JsonlRecords(Sequence):
    """The non-blank lines (bytes) of the jsonl(.gz) files the comma-separated glob patterns
    match, in sorted path order, indexed in one streaming pass and read on demand (see the
    module's docstring). A line longer than `max_bytes` (None: no limit) is never read:
    indexing it raises `BadRecord("too long")`."""

    def __init__(self, files: str | Sequence[str], max_bytes: int | None = None):
        self.patterns, self.max_bytes = files, max_bytes
        self.paths = expand_patterns(files)
        self._readable: list[str] = []  # per file: the local file its offsets are in
        self._columns = {"file": array.array("i"), "offset": array.array("q"),
                         "length": array.array("q"), "crc": array.array("I"),
                         "line": array.array("q")}  # fmt: skip
        self.too_long = 0  # lines longer than max_bytes
        self._spill: _Spill | None = None
        for file, path in enumerate(self.paths):
            self._index(file, path)
        self._arrays = {k: np.frombuffer(v, v.typecode) if len(v) else np.zeros(0, v.typecode)
                        for k, v in self._columns.items()}  # fmt: skip
        del self._columns
        self.crc32s = self._arrays["crc"]
        if self._spill is not None:
            os.ftruncate(self._spill.fd, self._spill.size)

    def _add(self, file: int, offset: int, length: int, crc: int, line: int, fits: bool):
        for key, value in (("file", file), ("offset", offset), ("length", length),
                           ("crc", crc), ("line", line)):  # fmt: skip
            self._columns[key].append(value)
        self.too_long += not fits

    def _index(self, file: int, path: str) -> None:
        compressed, remote = path.endswith(".gz"), fs.is_remote(path)
        spill = None
        if compressed or remote:
            if self._spill is None:
                self._spill = _Spill()
            spill = self._spill
        self._readable.append(spill.path if spill else fs.expand(path))
        indexer = _Indexer(self, file, spill)
        with fs.open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            try:
                while block := stream.read(BLOCK):
                    indexer.block(block)
            except (OSError, EOFError, zlib.error) as e:
                if not compressed:
                    raise
                raise ValueError(f"{path}: not a readable gzip file ({e})") from None
        indexer.finish()

    def __len__(self) -> int:
        return len(self.crc32s)

    def _position(self, index) -> int:
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {index} of {n}")
        return i % n

    def where(self, index) -> str:
        """`path:line` of a record, for messages."""
        i = self._position(index)
        return f"{self.paths[self._arrays['file'][i]]}:{self._arrays['line'][i]}"

    @property
    def lengths(self) -> np.ndarray:
        """The bytes of each record's line."""
        return self._arrays["length"]

    def __getitem__(self, index) -> bytes:
        if isinstance(index, slice):
            return RecordsView(self, np.arange(len(self))[index])
        i = self._position(index)
        length = int(self._arrays["length"][i])
        if self.max_bytes is not None and length > self.max_bytes:
            raise BadRecord(
                "too long", f"too long: a line of {length:,} bytes, more than the "
                f"{self.max_bytes:,} of any record that fits a row (not read)",
            )  # fmt: skip
        data = _pread(self._readable[self._arrays["file"][i]], int(self._arrays["offset"][i]),
                      length)  # fmt: skip
        if len(data) != length or zlib.crc32(data) != int(self.crc32s[i]):
            raise ValueError(
                f"{self.where(i)}: the file changed after its lines were indexed; restart "
                "with files that do not change while they are read"
            )
        return data


def _pread(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class RecordsView(Sequence):
    """Some of the records of a sequence, by their indices, without copying them."""

    def __init__(self, records: Sequence, indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RecordsView(self.records, self.indices[index])
        return self.records[int(self.indices[int(index)])]

    def where(self, index) -> str:
        return where(self.records, int(self.indices[int(index)]))

    @property
    def crc32s(self) -> np.ndarray:
        return crc32s(self.records)[self.indices]


def where(records: Sequence, index: int) -> str:
    """Where a record is, for messages: `path:line` when the records know it."""
    if hasattr(records, "where"):
        return records.where(index)
    return f"record {index}"


def crc32s(records: Sequence) -> np.ndarray:
    """The CRC-32 of each record's line (known to `JsonlRecords`, computed for a list)."""
    known = getattr(records, "crc32s", None)
    if known is not None:
        return known
    return np.fromiter((zlib.crc32(r) for r in records), np.uint32, len(records))


SPLITS = ("train", "validation")


def split(records: Sequence, name: str, validation_fraction: float) -> RecordsView:
    """The train or validation share of `records` (a view), by the CRC-32 of each line: the
    same record lands in the same split whatever the files' order. An empty share is an
    error that says why and what to do."""
    if name not in SPLITS:
        raise ValueError(f"Unknown split {name!r}; expected train or validation")
    if name == "validation" and validation_fraction == 0:
        raise ValueError(
            "data.validation_fraction is 0, so there is no validation split, and this run "
            "evaluates on one (train.eval_every > 0): set train.eval_every=0 to train without "
            "a held-out loss, or data.validation_fraction to a fraction > 0"
        )
    crcs = crc32s(records)
    held_out = crcs < np.uint64(int(validation_fraction * 2**32))
    chosen = np.flatnonzero(held_out == (name == "validation"))
    if not len(chosen):
        n, distinct = len(records), len(np.unique(crcs))
        of = f"of the {n:,} records ({distinct:,} distinct)"
        fraction = f"data.validation_fraction {validation_fraction}"
        if name == "validation":
            raise ValueError(
                f"no record {of} hashed into the validation share ({fraction}): with few or "
                "duplicated records, raise data.validation_fraction, or set "
                "train.eval_every=0 to train without a held-out loss"
            )
        raise ValueError(
            f"every record {of} hashed into the validation share ({fraction}), none is left "
            "to train on: with few or duplicated records, lower data.validation_fraction "
            "(0 holds none out; then set train.eval_every=0)"
        )
    return RecordsView(records, chosen)


# ----- the records of a prepared tfds dataset -----


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
