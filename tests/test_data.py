"""The tfds corpus and the grain pipeline: packing, determinism, process shards, resume."""

import gzip
import json
import logging

import numpy as np
import pytest

from llamax import losses, train
from llamax.data import corpus, pipeline
from llamax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def built(text_corpus, tmp_path_factory):
    directory, docs = text_corpus
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = corpus.build_corpus(f"{directory}/*.txt,{directory}/*.jsonl", data_dir, "text", 0.2)
    return builder, docs


def _texts(source):
    return sorted(source[i]["text"].decode() for i in range(len(source)))


def test_corpus_splits_hold_every_document_once(built):
    builder, docs = built
    train_docs = _texts(corpus.data_source(builder, "train"))
    valid_docs = _texts(corpus.data_source(builder, "validation"))
    assert sorted(train_docs + valid_docs) == sorted(docs)
    assert 0 < len(valid_docs) < len(train_docs)
    # Prepared once: building again reuses it.
    again = corpus.build_corpus(builder.builder_config.files, builder._data_dir_root, "text", 0.2)
    assert again.data_dir == builder.data_dir


def test_bad_input_is_skipped_counted_and_logged(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("a good document")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    lines = [json.dumps({"text": "fine"}), "{not json", json.dumps({"body": "no text"}), ""]
    with gzip.open(tmp_path / "mixed.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="llamax"):
        builder = corpus.build_corpus(str(tmp_path / "*"), str(tmp_path / "tfds"), "text", 0.0)
    assert _texts(corpus.data_source(builder, "train")) == ["a good document", "fine"]
    log = caplog.text
    assert "skipped 1 empty documents" in log
    assert "skipped 1 files that are not UTF-8" in log and "latin1.txt (byte 3)" in log
    assert "skipped 1 lines that are not JSON" in log and "mixed.jsonl.gz:2" in log
    assert "skipped 1 records without a string 'text' field" in log


def test_missing_files_and_empty_split_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No files match"):
        corpus.build_corpus(str(tmp_path / "*.txt"), str(tmp_path / "tfds"))
    (tmp_path / "one.txt").write_text("only document")
    builder = corpus.build_corpus(str(tmp_path / "*.txt"), str(tmp_path / "tfds"), "text", 0.0)
    with pytest.raises(ValueError, match="no 'validation' split .*validation_fraction > 0"):
        corpus.data_source(builder, "validation")  # validation_fraction 0: no such split
    (tmp_path / "two.txt").write_text("")
    with pytest.raises(ValueError, match="no usable documents"):
        corpus.build_corpus(str(tmp_path / "two.txt"), str(tmp_path / "tfds"), "text", 0.0)


def test_a_tfds_data_dir_in_a_bucket_is_refused_with_the_way_out():
    from llamax import data
    from llamax.experiment import default_config

    c = default_config().data
    c.tfds_data_dir = "gs://bucket/tensorflow_datasets"
    with pytest.raises(ValueError, match="ArrayRecord .* local files only.*gcsfuse"):
        data.check(c)
    with pytest.raises(ValueError, match="gcsfuse"):
        list(data.documents(tfds_name="pg19", tfds_data_dir=c.tfds_data_dir))


def _epoch(source, tokenizer_path, seq_len=32, batch=4, seed=0, index=0, count=1):
    ds = pipeline.make_dataset(
        source, tokenizer_path, seq_len, batch, seed, index, count, num_epochs=1
    )
    return list(ds)


def _stream(batches):
    """Valid tokens of every row in order: packing must reproduce the documents end to end."""
    return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])


def test_packing_loses_and_duplicates_nothing(built, tokenizer_path):
    builder, _ = built
    source = corpus.data_source(builder, "train")
    tok = Tokenizer(tokenizer_path)
    batches = _epoch(source, tokenizer_path)
    stream = _stream(batches)
    all_docs = [tok.encode_array(source[i]["text"].decode()) for i in range(len(source))]
    assert len(stream) == sum(len(d) for d in all_docs)
    # Documents come back whole, in the shuffled order, each wrapped in BOS ... EOS.
    ends = np.flatnonzero(stream == 2) + 1
    pieces = np.split(stream, ends[:-1])
    assert sorted(map(tuple, pieces)) == sorted(map(tuple, all_docs))
    for b in batches:
        for row_tokens, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"], strict=True):
            for s in np.unique(seg[seg > 0]):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
            # The loss sees no prediction across a document boundary or into padding.
            _, _, count = losses.next_token_loss(
                np.zeros((1, len(seg), 4)), row_tokens[None] % 4, seg[None]
            )
            assert int(count) == sum((seg == s).sum() - 1 for s in np.unique(seg[seg > 0]))
            starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
            for start in starts:  # a piece starts a document (BOS) or continues one
                assert seg[start] == 0 or pos[start] == 0


def test_same_seed_same_batches(built, tokenizer_path):
    source = corpus.data_source(built[0], "train")
    a, b = _epoch(source, tokenizer_path, seed=3), _epoch(source, tokenizer_path, seed=3)
    c = _epoch(source, tokenizer_path, seed=4)
    np.testing.assert_array_equal(_stream(a), _stream(b))
    assert not np.array_equal(_stream(a), _stream(c))


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_cover_the_records_of_one(built, tokenizer_path, processes):
    source = corpus.data_source(built[0], "train")
    whole = _stream(_epoch(source, tokenizer_path, batch=1))
    shards = [
        _stream(_epoch(source, tokenizer_path, batch=1, index=i, count=processes))
        for i in range(processes)
    ]
    docs = lambda s: sorted(map(tuple, np.split(s, np.flatnonzero(s == 2)[:-1] + 1)))  # noqa: E731
    together = sorted(d for shard in shards for d in docs(shard))
    assert together == docs(whole)  # every record exactly once, no overlap


def test_resume_from_state_gives_the_same_batches(built, tokenizer_path):
    source = corpus.data_source(built[0], "train")
    ds = pipeline.make_dataset(source, tokenizer_path, 16, 2, seed=0)  # repeats forever
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]
    resumed = iter(pipeline.make_dataset(source, tokenizer_path, 16, 2, seed=0))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(7)], strict=True):
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.slow
def test_training_on_tfds_corpus(text_corpus, tokenizer_path, tmp_path):
    from conftest import load_config

    directory, _ = text_corpus
    overrides = {
        "data.source": "tfds", "data.files": f"{directory}/*", "data.tokenizer": tokenizer_path,
        "data.tfds_data_dir": str(tmp_path / "tfds"), "data.validation_fraction": 0.2,
        "model.vocab_size": 640, "train.steps": 6, "train.log_every": 3, "train.eval_every": 6,
    }  # fmt: skip
    config = load_config("tiny", **overrides)
    train.run(config, str(tmp_path / "run"))
    from llamax.metrics import read_metrics

    records = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [3, 6] and np.isfinite(records[-1]["eval_loss"])

    config = load_config("tiny", **{**overrides, "model.vocab_size": 256})
    with pytest.raises(
        ValueError, match=r"tokenizer has 600 ids, more than the model's vocab_size \(256\)"
    ):
        train.run(config, str(tmp_path / "bad"))


def test_broken_files_and_invalid_text_are_skipped_with_their_names(tmp_path, caplog):
    """A lone surrogate escaped in JSON, a truncated .jsonl.gz (the documents before the break
    are kept), a .gz that is not gzip, a truncated .txt.gz: skipped, counted and logged."""
    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(200)]
    (tmp_path / "surrogate.jsonl").write_text(
        json.dumps({"text": "fine"}) + "\n" + '{"text": "bad \\ud800 here"}\n'
    )
    whole = gzip.compress(("\n".join(good) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all")
    letters = np.random.default_rng(0).choice(list(b"abcdefgh "), 10_000).astype(np.uint8)
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(letters.tobytes())[:500])
    with caplog.at_level(logging.WARNING, logger="llamax"):
        builder = corpus.build_corpus(str(tmp_path / "*"), str(tmp_path / "tfds"), "text", 0.0)
    texts = _texts(corpus.data_source(builder, "train"))
    assert "fine" in texts and not any("\ud800" in t for t in texts)
    assert 0 < sum(t.startswith("document") for t in texts) < 200  # those before the cut
    log = caplog.text
    assert "records that are not valid Unicode" in log and "surrogate.jsonl:2" in log
    assert "skipped 2 truncated or corrupt files" in log and "cut.jsonl.gz after" in log
    assert "files named .gz that are not gzip" in log and "fake.jsonl.gz" in log


def _documents(n, seed, max_words=400):
    rng = np.random.default_rng(seed)
    words = "the model trains on packed documents naïve 東京 12 3.5 x".split()
    return [{"text": " ".join(rng.choice(words, rng.integers(1, max_words))).encode()}
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("seq_len, batch", [(16, 2), (7, 3), (128, 1)])
def test_packing_equals_grains_concat_then_split(tokenizer_path, seq_len, batch):
    """llamax's packer against grain's own ConcatThenSplit over the same tokenized stream."""
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    docs = _documents(40, seed=seq_len)
    tok = Tokenizer(tokenizer_path)
    order = grain.MapDataset.source(docs).shuffle(seed=1).repeat(None)
    tokenized = order.map(lambda r: {"tokens": tok.encode_array(r["text"].decode())})
    reference = ConcatThenSplitIterDataset(
        tokenized.to_iter_dataset(), length_struct={"tokens": seq_len}
    ).batch(batch, drop_remainder=True)
    ours = pipeline.make_dataset(docs, tokenizer_path, seq_len, batch, seed=1)
    for want, got, _ in zip(reference, ours, range(60), strict=False):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["segment_ids"], want["tokens_segment_ids"])
        np.testing.assert_array_equal(got["positions"], want["tokens_positions"])


def test_long_documents_are_tokenized_in_pieces_and_resume_inside_one(tokenizer_path, monkeypatch):
    """Documents far longer than a piece (made 64 characters here): the same batches as
    whole-document tokenization, and a state saved in the middle of one resumes exactly."""
    docs = _documents(6, seed=0, max_words=3000)
    it = iter(pipeline.make_dataset(docs, tokenizer_path, 32, 2, seed=0))
    whole = [next(it) for _ in range(40)]
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 64)
    monkeypatch.setattr("llamax.data.tokenizer.PIECE_CHARS", 64)
    assert len(list(Tokenizer(tokenizer_path).encode_pieces(docs[0]["text"].decode()))) > 20
    it = iter(pipeline.make_dataset(docs, tokenizer_path, 32, 2, seed=0))
    pieced = [next(it) for _ in range(40)]
    for a, b in zip(whole, pieced, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    it = iter(pipeline.make_dataset(docs, tokenizer_path, 32, 2, seed=0))
    for _ in range(13):
        next(it)
    state = it.get_state()
    assert state["consumed"] > 0  # in the middle of a document
    resumed = iter(pipeline.make_dataset(docs, tokenizer_path, 32, 2, seed=0))
    resumed.set_state(state)
    for want in pieced[13:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_a_corpus_too_small_to_hold_one_out_says_what_to_do(tmp_path):
    """One document and a validation fraction: nothing can be held out, and the error says
    the way to train on it (no validation split, no held-out loss)."""
    (tmp_path / "one.txt").write_text("only document")
    with pytest.raises(ValueError, match=r"no usable documents for one of its splits .*add "
                       r"documents; with data.validation_fraction 0.05 each split needs one: set "
                       r"data.validation_fraction=0 \(and train.eval_every=0"):  # fmt: skip
        corpus.build_corpus(str(tmp_path / "one.txt"), str(tmp_path / "tfds"), "text", 0.05)
