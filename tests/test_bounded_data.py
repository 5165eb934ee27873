"""Fine-tuning data read in bounded memory: a jsonl file's lines indexed in one streaming pass
and read on demand, a record too long for a row skipped unread, a gzip file that expands to
hundreds of megabytes (one giant line, or many lines) read a block at a time."""

import gc
import gzip
import json
import os
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import chat_records, load_config

from llamax.data import make_iterator, records
from llamax.data import records as records_lib
from llamax.data.tokenizer import Tokenizer


def _lines(n, seed=0):
    return [json.dumps(r).encode() for r in chat_records(n, seed)]


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_the_index_holds_the_lines_splitlines_gives(tmp_path, monkeypatch, block):
    """The lines `bytes.splitlines` gave (blank ones left out), with their CRC-32s (the split
    depends on them), across block boundaries: LF and CRLF ends, a CR at a block's end, blank
    and whitespace-only lines, no newline at the end; gzipped the same."""
    monkeypatch.setattr(records, "BLOCK", block)
    lines = _lines(12)
    data = (b"\n".join(lines[:4]) + b"\r\n" + b"\r\n".join(lines[4:8]) + b"\n\n  \t\n\r\n"
            + b"\n".join(lines[8:]))  # fmt: skip
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    got = records.JsonlRecords(f"{tmp_path}/a.jsonl,{tmp_path}/*.gz")
    want = [line for line in data.splitlines() if line.strip()] * 2
    assert list(got) == want == lines * 2
    np.testing.assert_array_equal(got.crc32s, [zlib.crc32(line) for line in want])
    assert got.where(0) == f"{tmp_path}/a.jsonl:1" and got.where(12) == f"{tmp_path}/b.jsonl.gz:1"
    last_line = data.count(b"\n") + 1
    assert got.where(11) == f"{tmp_path}/a.jsonl:{last_line}"
    old_split = [r for r in want if zlib.crc32(r) < int(0.3 * 2**32)]  # the split as it was
    assert list(records_lib.split(got, "validation", 0.3)) == old_split


def test_a_broken_gzip_file_is_an_error_naming_it(tmp_path):
    whole = gzip.compress(b"\n".join(_lines(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file"):
        records_lib.read_records(str(tmp_path / "cut.jsonl.gz"))


def test_a_file_changed_after_indexing_is_an_error_not_a_wrong_record(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(_lines(3)) + b"\n")
    got = records_lib.read_records(str(path))
    path.write_bytes(b"\n".join(_lines(3, seed=1)) + b"\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the file changed after"):
        got[0]


def _peak(function) -> tuple[float, object]:
    """(peak bytes Python and numpy allocated while `function` ran, its result)."""
    tracemalloc.start()
    try:
        result = function()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _pass(c, rows=2, batches=40):
    it = make_iterator(c.data, "train", 48, range(rows))
    for _ in range(batches):
        next(it)
    return it.get_state()["skipped"]


def test_a_record_far_longer_than_a_row_is_skipped_unread(tmp_path, tokenizer_path):
    """A 20 MB and a 200 MB chat record among ordinary ones: skipped and counted as too long
    without being read or tokenized (they used to take minutes and gigabytes, then a
    MemoryError); the run's memory stays that of the same data without them."""
    good = _lines(40)
    big = b'{"prompt": "' + b"the model " * 2_000_000 + b'", "completion": " trains"}'
    (tmp_path / "plain.jsonl").write_bytes(b"\n".join(good) + b"\n")
    with open(tmp_path / "big.jsonl", "wb") as f:
        f.write(b"\n".join(good[:20] + [big]) + b"\n")
        f.write(
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "'
        )
        for _ in range(100):  # 200 MB, written a piece at a time
            f.write(b"\\u0041" * 333_334)
        f.write(b'"}]}\n' + b"\n".join(good[20:]) + b"\n")
    overrides = {"data.source": "chat", "data.tokenizer": tokenizer_path,
                 "data.validation_fraction": 0.0}  # fmt: skip
    plain = load_config("tiny", **overrides, **{"data.files": str(tmp_path / "plain.jsonl")})
    with_big = load_config("tiny", **overrides, **{"data.files": str(tmp_path / "big.jsonl")})
    baseline, skipped = _peak(lambda: _pass(plain))
    assert not skipped
    start = time.perf_counter()
    peak, skipped = _peak(lambda: _pass(with_big))
    assert time.perf_counter() - start < 20
    assert set(skipped) == {"too long"}  # once a pass
    assert peak - baseline < 8e6, (peak, baseline)  # the smaller record alone is 20 MB
    limit = records.max_record_bytes(48, Tokenizer(tokenizer_path))
    assert max(map(len, good)) < limit < len(big)
    assert records_lib.read_records(str(tmp_path / "big.jsonl"), limit).too_long == 2


def _gzip_of(chunk: bytes, times: int) -> bytes:
    """A gzip file that expands to `chunk` `times` over (a member repeated: instant to make)."""
    return gzip.compress(chunk) * times


def test_a_gzip_that_expands_to_hundreds_of_megabytes_is_read_in_bounded_memory(tmp_path):
    """One giant line (what a gzip bomb of an 8 GB record is, smaller): indexed a block at a
    time, never held, nor copied to disk; many ordinary lines expanding to 100 MB: spilled to a
    local file and read on demand, memory O(records) (a few bytes each), never O(bytes)."""
    (tmp_path / "bomb.jsonl.gz").write_bytes(_gzip_of(b"x" * (1 << 20), 100))
    peak, bomb = _peak(lambda: records_lib.read_records(str(tmp_path / "bomb.jsonl.gz"), 1 << 16))
    assert len(bomb) == 1 and bomb.too_long == 1 and bomb.lengths[0] == 100 << 20
    assert bomb._spill.size == 0 and peak < 8e6, peak
    with pytest.raises(records_lib.BadRecord, match="too long: a line of 104,857,600 bytes"):
        bomb[0]

    line = json.dumps({"prompt": "the model " * 1000, "completion": " trains"}).encode()
    (tmp_path / "many.jsonl.gz").write_bytes(_gzip_of((line + b"\n") * 100, 100))
    peak, many = _peak(lambda: records_lib.read_records(str(tmp_path / "many.jsonl.gz"), 1 << 16))
    assert len(many) == 10_000 and not many.too_long and peak < 8e6, peak
    assert many[0] == many[9_999] == line and many.where(9_999).endswith("many.jsonl.gz:10000")
    spill = many._spill.directory
    del many, bomb
    gc.collect()
    assert not os.path.exists(spill)  # the spill goes with the records


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """A GCS API on 127.0.0.1 (tests/gcs_server.py) with the bucket `llamax-test`, used by this
    process through `STORAGE_EMULATOR_HOST` (credential discovery off)."""
    from test_gcs import start_emulator

    from llamax import fs

    server, port = start_emulator(tmp_path)
    try:
        for key, value in {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:1",
                           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "llamax-test",
                           "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json"),
                           }.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        fs.honour_storage_emulator()
        yield "gs://llamax-test"
    finally:
        monkeypatch.undo()
        fs.honour_storage_emulator()  # what it set for this emulator undone
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_records_in_a_bucket_are_streamed_once_and_read_locally(bucket, tmp_path):
    """A jsonl and a jsonl.gz on gs://: each streamed once into the local spill file, the
    lines the same as a local copy's, a line too long for a row neither read nor copied."""
    from llamax import fs

    lines = _lines(30)
    long = json.dumps({"prompt": "x" * 100_000, "completion": " y"}).encode()
    data = b"\n".join(lines[:15] + [long] + lines[15:]) + b"\n"
    fs.write_bytes(f"{bucket}/chat/a.jsonl", data)
    fs.write_bytes(f"{bucket}/chat/b.jsonl.gz", gzip.compress(data))
    got = records_lib.read_records(f"{bucket}/chat/*", max_bytes=1 << 16)
    assert len(got) == 62 and got.too_long == 2
    assert [got[i] for i in range(len(got)) if i % 31 != 15] == lines * 2
    assert got._spill.size == 2 * sum(map(len, lines))  # the long line was not copied
    assert got.where(46) == f"{bucket}/chat/b.jsonl.gz:16"
    with pytest.raises(records_lib.BadRecord, match="too long"):
        got[46]


def test_the_validation_split_reuses_the_train_splits_index(tmp_path, tokenizer_path,
                                                            monkeypatch):  # fmt: skip
    """A run reads its files once for both splits (one pass over a large .gz, not two); files
    changed since are indexed again."""
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(_lines(40)) + b"\n")
    calls = []
    read = records_lib.read_records
    monkeypatch.setattr(records_lib, "read_records", lambda *a: calls.append(a) or read(*a))
    c = load_config("tiny", **{"data.source": "chat", "data.files": str(path),
                               "data.tokenizer": tokenizer_path,
                               "data.validation_fraction": 0.2})  # fmt: skip
    train = make_iterator(c.data, "train", 128, range(1))
    validation = make_iterator(c.data, "validation", 128, range(1))
    next(train), next(validation)
    assert len(calls) == 1
    path.write_bytes(b"\n".join(_lines(41)) + b"\n")
    next(make_iterator(c.data, "train", 128, range(1)))
    assert len(calls) == 2


def test_a_data_file_that_is_not_a_file_says_what_it_is(tmp_path):
    from llamax.data import records

    with pytest.raises(ValueError, match="/dev/zero is a character device"):
        records.JsonlRecords("/dev/zero")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        records.JsonlRecords(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No files match"):
        records.JsonlRecords(str(tmp_path / "*.jsonl"))
