"""Chat data for fine-tuning: Meta's format token for token, the answer-only loss mask on
multi-turn dialogs, bad records skipped and counted, packing of whole examples, exact
resume, and the masked loss."""

import json
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config

from llamax import losses, train
from llamax.data import chat, chat_format, make_iterator
from llamax.data import records as records_lib
from llamax.data.tokenizer import Tokenizer
from llamax.metrics import read_metrics

DIALOG = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": " the optimizer? "},
    {"role": "assistant", "content": "adamw"},
    {"role": "user", "content": "and the weights\nnaïve café"},
    {"role": "assistant", "content": " float32 master weights "},
]


def meta_tokens(dialog, tok):
    """Meta's `chat_completion` formatting, written out: the system prompt into the first user
    turn, then BOS [INST] q [/INST] a EOS per exchange, each exchange one encode call."""
    if dialog[0]["role"] == "system":
        first = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}, *dialog[2:]]
    ids, exchanges = [], []
    for q, a in zip(dialog[::2], dialog[1::2], strict=True):
        text = f"[INST] {q['content'].strip()} [/INST] {a['content'].strip()} "
        exchange = tok.encode(text, bos=True, eos=True)
        ids += exchange
        exchanges.append((exchange, a["content"].strip()))
    return ids, exchanges


def test_dialog_tokens_are_metas_and_the_mask_covers_the_answers(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids, mask = chat_format.dialog_tokens(DIALOG, tok)
    want, exchanges = meta_tokens(DIALOG, tok)
    assert ids == want and len(mask) == len(ids)
    start = 0
    for exchange, answer in exchanges:
        m = mask[start : start + len(exchange)]
        # 0 over BOS [INST] ... [/INST], then 1 to the end: the answer and its EOS.
        cut = m.index(1)
        assert m == [0] * cut + [1] * (len(exchange) - cut)
        assert exchange[-1] == tok.eos_id and exchange[0] == tok.bos_id
        assert tok.decode(exchange[cut:-1]).strip() == answer
        assert tok.decode(exchange[1:cut]).endswith("[/INST]")
        start += len(exchange)
    tokens, loss_mask = chat_format.example_tokens({"messages": DIALOG}, tok)
    assert tokens.tolist() == ids and loss_mask.tolist() == mask
    _, everything = chat_format.example_tokens({"messages": DIALOG}, tok, train_on="everything")
    assert everything.all()


def test_an_answer_of_weight_0_is_context_not_a_target(tokenizer_path):
    """OpenAI's fine-tuning key: the tokens are the same, the weighted-out answer's mask 0."""
    tok = Tokenizer(tokenizer_path)
    dialog = [dict(turn) for turn in DIALOG]
    dialog[2]["weight"] = 0
    ids, mask = chat_format.dialog_tokens(dialog, tok)
    want, exchanges = meta_tokens(DIALOG, tok)
    assert ids == want
    first = len(exchanges[0][0])
    assert not any(mask[:first])
    assert mask[first:] == chat_format.dialog_tokens(DIALOG, tok)[1][first:]
    assert any(mask[first:])
    dialog[4]["weight"] = 1
    assert chat_format.example_tokens({"messages": dialog}, tok)[1].tolist() == mask


def test_prompt_completion_pairs(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    record = json.dumps({"prompt": "the model trains on", "completion": " packed documents"})
    tokens, mask = chat_format.example_tokens(record, tok)
    assert tokens.tolist() == tok.encode("the model trains on packed documents", bos=True, eos=True)
    cut = int(np.argmax(mask))
    assert mask[cut:].all() and not mask[:cut].any()
    assert tok.decode(tokens[cut:-1].tolist()).strip() == "packed documents"


@pytest.mark.parametrize(
    "record, reason",
    [("{not json", "not JSON"), ("[1, 2]", "malformed"), ('{"text": "x"}', "malformed"),
     ({"messages": [{"role": "user", "content": "q"}]}, "roles"),
     ({"messages": [{"role": "assistant", "content": "a"}]}, "roles"),
     ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "roles"),
     ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
      "roles"),
     ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
      "empty answer"),
     ({"messages": [{"role": "user", "content": "[INST] q"},
                    {"role": "assistant", "content": "a"}]}, "special tags"),
     ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "malformed"),
     ({"prompt": "p", "completion": ""}, "empty answer"),
     ({"messages": [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0}]}, "no answer to train on"),
     ({"messages": [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 2}]}, "malformed"),
     ({"messages": [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": True}]}, "malformed"),
     ({"messages": [{"role": "user", "content": "q", "weight": 0},
                    {"role": "assistant", "content": "a"}]}, "malformed"),
     ({"prompt": 1, "completion": "c"}, "malformed")],
)  # fmt: skip
def test_bad_records_are_refused_with_their_reason(record, reason, tokenizer_path):
    with pytest.raises(records_lib.BadRecord) as e:
        chat_format.example_tokens(record, Tokenizer(tokenizer_path))
    assert e.value.reason == reason


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the model trains on packed documents with rotary positions".split()
    out = []
    for i in range(n):
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            question = " ".join(rng.choice(words, rng.integers(1, 6)))
            answer = f"{i} " + " ".join(rng.choice(words, 3))
            turns += [{"role": "user", "content": question},
                      {"role": "assistant", "content": answer}]  # fmt: skip
        out.append(json.dumps({"messages": turns}).encode())
    return out


def _batches(records, tokenizer_path, n, seq_len=48, state=None, **kwargs):
    it = iter(chat.make_dataset(records, tokenizer_path, seq_len, 2, seed=3, **kwargs))
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it


def test_packing_keeps_examples_whole_and_apart(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    records = _records(40)
    batches, _ = _batches(records, tokenizer_path, 6)
    examples = {tuple(chat_format.example_tokens(r, tok)[0].tolist()) for r in records}
    for batch in batches:
        assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
        for row in range(2):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
            ids = sorted(set(seg.tolist()) - {0})
            assert ids == list(range(1, len(ids) + 1)) and ids
            pad = seg == 0
            assert not mask[pad].any() and not tokens[pad].any()
            if pad.any():  # padding only at the end of a row
                assert pad[int(np.argmax(pad)) :].all()
            for s in ids:  # each segment is one whole example, positions from 0
                where = seg == s
                assert tuple(tokens[where].tolist()) in examples
                np.testing.assert_array_equal(pos[where], np.arange(where.sum()))


def test_resume_gives_the_same_batches_and_counts_skips(tokenizer_path):
    bad = [b"{oops", json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()]
    long = json.dumps({"prompt": "the model " * 40, "completion": "trains"}).encode()
    records = _records(30) + bad + [long]
    whole, _ = _batches(records, tokenizer_path, 8)
    _, it = _batches(records, tokenizer_path, 3)
    state = it.get_state()
    resumed, it2 = _batches(records, tokenizer_path, 5, state=state)
    for a, b in zip(whole[3:], resumed, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # 8 batches of 2 rows pass through the whole shuffled stream at least once.
    skipped = it2.get_state()["skipped"]
    assert skipped.get("not JSON", 0) >= 1 and skipped.get("roles", 0) >= 1
    assert skipped.get("too long", 0) >= 1


class LlamaxTestChat(tfds.core.GeneratorBasedBuilder):
    """Dialogs in a tfds dataset: a `messages` sequence of {role, content} (RECORDS: split ->
    jsonl records, set by the test before building)."""

    VERSION = tfds.core.Version("1.0.0")
    RECORDS: dict = {}

    def _info(self):
        turn = {"role": tfds.features.Text(), "content": tfds.features.Text()}
        features = tfds.features.FeaturesDict({"messages": tfds.features.Sequence(turn)})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(r) for split, r in self.RECORDS.items()}

    def _generate_examples(self, records):
        for i, record in enumerate(records):
            yield i, json.loads(record)


class LlamaxTestChatJson(LlamaxTestChat):
    """Records kept as JSON text in a `text` feature (here prompt/completion pairs)."""

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _generate_examples(self, records):
        for i, record in enumerate(records):
            yield i, {"text": record.decode()}


def _pairs(n, seed):
    rng = np.random.default_rng(seed)
    return [json.dumps({"prompt": f"Q{i}: " + " ".join(rng.choice(list("abcde"), 4)) + " =",
                        "completion": f" {i * 7}"}).encode() for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("builder", [LlamaxTestChat, LlamaxTestChatJson])
def test_chat_data_from_a_tfds_dataset(builder, tmp_path, tokenizer_path):
    """A prepared tfds dataset's splits give the examples (tokens and masks) of their records,
    each whole, every record of the split reached: dialogs as a sequence feature, and pairs
    as JSON in a text feature."""
    make = _records if builder is LlamaxTestChat else _pairs
    builder.RECORDS = {"train": make(24, 0), "validation": make(6, 1)}
    builder(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    c = load_config("tiny", **{
        "data.source": "chat", "data.tfds_name": builder.name,
        "data.tfds_data_dir": str(tmp_path), "data.tokenizer": tokenizer_path,
    })  # fmt: skip
    tok = Tokenizer(tokenizer_path)
    for split, records in builder.RECORDS.items():
        expected = {}
        for r in records:
            tokens, mask = chat_format.example_tokens(r, tok)
            expected[tuple(tokens.tolist())] = mask.tolist()
        rows, seen = make_iterator(c.data, split, 128, range(2)), set()
        for _ in range(40):
            batch = next(rows)
            for row in range(2):
                seg = batch["segment_ids"][row]
                for s in set(seg.tolist()) - {0}:
                    tokens = tuple(batch["tokens"][row][seg == s].tolist())
                    assert batch["loss_mask"][row][seg == s].tolist() == expected[tokens]
                    seen.add(tokens)
            if seen == set(expected):
                break
        assert seen == set(expected), split
    if builder is LlamaxTestChatJson:  # neither messages, nor a pair, nor the text field
        c.data.text_field = "dialog"
        with pytest.raises(ValueError, match=r"\['text'\]; these records need `messages` or"):
            make_iterator(c.data, "train", 48, range(2))


@pytest.mark.parametrize("files, tfds_name", [("", ""), ("chat.jsonl", "my_chat")])
def test_chat_data_needs_files_or_a_tfds_dataset(files, tfds_name):
    from llamax import data

    c = load_config("tiny", **{"data.source": "chat", "data.files": files,
                               "data.tfds_name": tfds_name})  # fmt: skip
    with pytest.raises(ValueError, match="needs data.files .* or data.tfds_name .* one of"):
        data.check(c.data)


def test_data_with_no_usable_record_is_an_error_not_a_hang(tokenizer_path):
    records = [b"{oops", json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()]
    with pytest.raises(ValueError, match="none of the 2 records is usable"):
        _batches(records, tokenizer_path, 1)


def test_truncate_keeps_the_first_seq_len_tokens(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    answer = " ".join(["trains"] * 60)
    record = json.dumps({"prompt": "the model", "completion": " " + answer}).encode()
    batches, it = _batches([record], tokenizer_path, 1, too_long="truncate")
    full = chat_format.example_tokens(record, tok)[0]
    np.testing.assert_array_equal(batches[0]["tokens"][0], full[:48])
    assert batches[0]["loss_mask"][0][-1] == 1 and not it.get_state()["skipped"]
    with pytest.raises(StopIteration):  # dropped: nothing left to make a row of
        _batches([record], tokenizer_path, 1, num_epochs=1)


def test_the_loss_counts_masked_in_targets_only(rng):
    b, t, v = 2, 10, 7
    logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 0, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 0, 1, 1, 0, 0]])
    nll, _, count = losses.next_token_loss(logits, tokens, segments, loss_mask=mask)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = [-logp[r, i - 1, tokens[r, i]] for r in range(b) for i in range(1, t)
            if mask[r, i] and segments[r, i] == segments[r, i - 1] != 0]  # fmt: skip
    assert count == len(want) == 11  # row 0: targets 2 3 5 8 9; row 1: 1 2 3 4 6 7
    np.testing.assert_allclose(nll, sum(want), rtol=1e-5)


@pytest.mark.slow
def test_train_on_chat_data(tmp_path, tokenizer_path):
    """llamax-train's loop on dialogs: the data's fields reach the step, the loss falls, the
    tokens trained on are the answers', the tokenizer is copied, the held-out loss is on
    the validation share."""
    files = tmp_path / "chat.jsonl"
    files.write_bytes(b"\n".join(_records(200)) + b"\n")
    c = load_config("tiny", **{
        "task": "sft", "data.source": "chat", "data.files": str(files),
        "data.tokenizer": tokenizer_path, "data.validation_fraction": 0.1,
        "model.vocab_size": 600, "train.seq_len": 64,
        "train.steps": 12, "train.log_every": 4, "train.eval_every": 12,
        "optimizer.learning_rate": 3e-3,
    })  # fmt: skip
    train.run(c, str(tmp_path / "run"))
    records = read_metrics(str(tmp_path / "run"))
    assert records[-1]["loss"] < records[0]["loss"]
    assert 0 < records[0]["target_tokens"] < c.train.batch_size * c.train.seq_len / 2
    assert "eval_loss" in records[-1]
    assert (tmp_path / "run" / "tokenizer.model").exists()
    rows = make_iterator(c.data, "validation", 64, range(2))
    assert set(next(rows)) == {"tokens", "segment_ids", "positions", "loss_mask"}


def _pair_line(i):
    return json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}",
                       "rejected": "no idea"}).encode()  # fmt: skip


HOSTILE = {  # a line, and the reason it is skipped for
    "nested too deeply": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not valid Unicode": b'{"prompt": "q \\ud800 here", "completion": " a", "chosen": "a", '
                         b'"rejected": "b", "messages": [{"role": "user", "content": "\\udfff"},'
                         b' {"role": "assistant", "content": "a"}]}',
    "not UTF-8": b'{"prompt": "caf\xe9", "completion": " a", "chosen": "a", "rejected": "b"}',
}  # fmt: skip


@pytest.mark.parametrize("source", ["chat", "preference"])
def test_hostile_lines_are_skipped_and_counted_during_iteration(source, tokenizer_path):
    """JSON nested 100k deep (a RecursionError that used to kill the run), a lone surrogate
    escaped in JSON and a byte that is not UTF-8 (sentencepiece's "Unable to cast"): each one
    skipped record with its reason, in a pass that packs every good one."""
    from llamax.data import preference

    good = _records(6) if source == "chat" else [_pair_line(i) for i in range(6)]
    lines = good[:3] + list(HOSTILE.values()) + good[3:]
    if source == "chat":
        it = chat.make_dataset(lines, tokenizer_path, 128, 1, seed=0, num_epochs=1)
    else:
        it = preference.make_dataset(lines, tokenizer_path, 128, 1, seed=0, num_epochs=1)
    it = iter(it)
    segments = sum(len(set(b["segment_ids"][0].tolist()) - {0}) for b in it)
    assert segments == (6 if source == "chat" else 12)  # a pair is two segments
    assert it.get_state()["skipped"] == {reason: 1 for reason in HOSTILE}


@pytest.mark.parametrize("reason, line", list(HOSTILE.items()))
def test_parse_turns_every_hostile_line_into_a_bad_record(reason, line):
    with pytest.raises(records_lib.BadRecord) as e:
        records_lib.parse(line)
    assert e.value.reason == reason and str(e.value).startswith(reason)


def test_a_bad_records_message_says_its_reason_once(tokenizer_path, caplog):
    assert str(records_lib.BadRecord("empty answer")) == "empty answer"
    assert str(records_lib.BadRecord("malformed", "prompt must be a string")) == (
        "malformed: prompt must be a string"
    )
    assert str(records_lib.BadRecord("roles", "Roles must be ...")) == "Roles must be ..."
    empty = json.dumps({"prompt": "p", "completion": " "}).encode()
    with caplog.at_level(logging.WARNING, logger="llamax"):
        _batches(_records(4) + [empty], tokenizer_path, 1, seq_len=256, num_epochs=1)
    assert "(empty answer);" in caplog.text and "empty answer: empty answer" not in caplog.text


def test_the_skip_counts_of_no_usable_record_add_up_to_the_records(tokenizer_path):
    """One whole pass of this process's share, all skipped: the error, with counts that add
    up to that share (it used to say 51 of 50), and the share of each of several processes."""
    bad = [json.dumps({"text": f"not a chat record {i}"}).encode() for i in range(50)]
    match = r"none of the 50 records is usable \(skipped: \{'malformed': 50\}"
    with pytest.raises(ValueError, match=match):
        _batches(bad, tokenizer_path, 1)
    match = r"none of the 25 records process 1 of 2 reads \(of 50\) is usable .*'malformed': 25\}"
    with pytest.raises(ValueError, match=match):
        _batches(bad, tokenizer_path, 1, shard=(1, 2))


def test_a_usable_record_among_bad_ones_is_never_taken_for_none(tokenizer_path):
    """Skips in a row across two passes outnumber the records (here 2 bad of 3: 4 in a row
    when one pass ends and the next begins with both), yet a usable record is there: no
    error, however long it runs."""
    bad = [b"{oops", json.dumps({"prompt": "p", "completion": ""}).encode()]
    it = iter(chat.make_dataset(_records(1) + bad, tokenizer_path, 128, 1, seed=3))
    for _ in range(30):  # dozens of passes; counting skips in a row raised in the 13th
        next(it)
    assert set(it.get_state()["skipped"]) == {"not JSON", "empty answer"}


def _crc_line(below: bool, fraction=0.05):
    """A chat line whose CRC-32 hashes it into the validation share (`below`) or not."""
    for i in range(10_000):
        line = json.dumps({"prompt": f"q{i}", "completion": " a"}).encode()
        if (zlib.crc32(line) < fraction * 2**32) == below:
            return line
    raise AssertionError("no such line")


@pytest.mark.parametrize(
    "lines, fraction, split, message",
    [(_records(50), 0.0, "validation",
      r"data.validation_fraction is 0, so there is no validation split.*set train.eval_every=0"),
     ([_crc_line(False)] * 50, 0.05, "validation",
      r"no record of the 50 records \(1 distinct\) hashed into the validation share "
      r"\(data.validation_fraction 0.05\): with few or duplicated records, raise "
      r"data.validation_fraction, or set train.eval_every=0"),
     ([_crc_line(True)] * 50, 0.05, "train",
      r"every record of the 50 records \(1 distinct\) hashed into the validation share.*none "
      r"is left to train on: .*lower data.validation_fraction")],
)  # fmt: skip
def test_an_empty_split_says_why_and_what_to_do(lines, fraction, split, message, tmp_path,
                                                tokenizer_path):  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    c = load_config("tiny", **{"data.source": "chat", "data.files": str(path),
                               "data.tokenizer": tokenizer_path,
                               "data.validation_fraction": fraction})  # fmt: skip
    with pytest.raises(ValueError, match=message):
        make_iterator(c.data, split, 48, range(2))


def test_the_data_is_summarized_when_read_and_after_its_first_pass(tmp_path, tokenizer_path,
                                                                   caplog):  # fmt: skip
    """What was read (records, files, held out, too long to read), then after the first pass
    what it made: examples, the rows they fill, the skips by reason."""
    long = json.dumps({"prompt": "the model " * 20_000, "completion": " x"}).encode()
    lines = _records(30) + [b"{oops", long]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    c = load_config("tiny", **{"data.source": "chat", "data.files": str(path),
                               "data.tokenizer": tokenizer_path,
                               "data.validation_fraction": 0.2})  # fmt: skip
    held_out = sum(zlib.crc32(line) < 0.2 * 2**32 for line in lines)
    train_lines = [line for line in lines if zlib.crc32(line) >= 0.2 * 2**32]
    assert b"{oops" in train_lines and long in train_lines  # the test's premise
    with caplog.at_level(logging.INFO, logger="llamax"):
        it = make_iterator(c.data, "train", 256, range(1))
        assert f"data: chat train split: {len(train_lines)} of the 32 records of 1 file(s) " \
               f"({held_out} held out: data.validation_fraction 0.2); 1 of them lines over " in \
               caplog.text  # fmt: skip
        while "a pass over" not in caplog.text:
            next(it)
    one_pass = records_lib.split(records_lib.read_records(str(path)), "train", 0.2)
    rows = sum(1 for _ in chat.make_dataset(one_pass, tokenizer_path, 256, 1, seed=0,
                                            num_epochs=1))  # fmt: skip
    skipped = "2 records skipped ({'not JSON': 1, 'too long': 1})"
    assert (
        f"data: chat train split: a pass over the {len(train_lines)} records: "
        f"{len(train_lines) - 2} examples packed into {rows} rows, {skipped}"
    ) in caplog.text


def test_text_that_is_not_valid_unicode_is_a_bad_record_wherever_it_comes_from(tokenizer_path):
    """Parsed records are checked when parsed; a dialog or a response given as Python strings
    (generation's prompts, scoring's responses) is refused as a BadRecord when tokenized."""
    from llamax.data import preference

    tok = Tokenizer(tokenizer_path)
    with pytest.raises(
        records_lib.BadRecord, match=r"not valid Unicode: a lone surrogate '\\ud800'"
    ):
        chat_format.dialog_tokens([{"role": "user", "content": "q \ud800"}], tok)
    with pytest.raises(records_lib.BadRecord) as e:
        preference.response_tokens("q", "a \udfff", tok)
    assert e.value.reason == "not valid Unicode"
    with pytest.raises(records_lib.BadRecord) as e:
        chat_format.example_tokens({"prompt": "p", "completion": " \ud800"}, tok)
    assert e.value.reason == "not valid Unicode"
