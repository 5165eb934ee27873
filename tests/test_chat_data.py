"""Chat data for fine-tuning: Meta's format token for token, the answer-only loss mask on
multi-turn dialogs, bad records skipped and counted, packing of whole examples, exact
resume, and the masked loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config

from llamax import losses, train
from llamax.data import chat, make_iterator
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
    ids, mask = chat.dialog_tokens(DIALOG, tok)
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
    tokens, loss_mask = chat.example_tokens({"messages": DIALOG}, tok)
    assert tokens.tolist() == ids and loss_mask.tolist() == mask
    _, everything = chat.example_tokens({"messages": DIALOG}, tok, train_on="everything")
    assert everything.all()


def test_prompt_completion_pairs(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    record = json.dumps({"prompt": "the model trains on", "completion": " packed documents"})
    tokens, mask = chat.example_tokens(record, tok)
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
     ({"prompt": 1, "completion": "c"}, "malformed")],
)  # fmt: skip
def test_bad_records_are_refused_with_their_reason(record, reason, tokenizer_path):
    with pytest.raises(chat.BadRecord) as e:
        chat.example_tokens(record, Tokenizer(tokenizer_path))
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
    examples = {tuple(chat.example_tokens(r, tok)[0].tolist()) for r in records}
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
            tokens, mask = chat.example_tokens(r, tok)
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
    full = chat.example_tokens(record, tok)[0]
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
        "data.source": "chat", "data.files": str(files), "data.tokenizer": tokenizer_path,
        "data.validation_fraction": 0.1, "model.vocab_size": 600, "train.seq_len": 64,
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
