"""Reward models: a Llama with a score head equals transformers' LlamaForSequenceClassification
(one label) in float32, read at each sequence's last token, padded or packed; the converter
carries it to and from Hugging Face and refuses what cannot hold it."""

import json

import jax
import numpy as np
import pytest
from conftest import random_params

import llamax
from llamax import losses
from llamax.data.ratings import MARGINS, RATINGS

CONFIG = llamax.LlamaConfig.preset("tiny", head="score")
TOL = 1e-4


def hf_reward_model(state_dict=None, config=CONFIG):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForSequenceClassification

    from llamax.convert.hf import hf_config

    model = LlamaForSequenceClassification(
        HFConfig(**hf_config(config), attn_implementation="eager")
    )
    if state_dict is None:  # random weights large enough that errors show (conftest.hf_model)
        torch.manual_seed(0)
        state_dict = {
            k: 1.0 + 0.2 * torch.randn_like(v) if k.endswith("norm.weight")
            else 0.15 * torch.randn_like(v)
            for k, v in model.state_dict().items()
        }  # fmt: skip
    model.load_state_dict({k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v))
                           for k, v in state_dict.items()})  # fmt: skip
    return model.eval().float()


def hf_scores(model, tokens):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits


def _sequences(rng, lengths, width):
    """Rows right-padded with 0 (the exported pad id), real tokens never 0."""
    tokens = np.zeros((len(lengths), width), np.int32)
    segments = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, CONFIG.vocab_size, n)
        segments[i, :n] = 1
    return tokens, segments


def test_scores_equal_transformers_sequence_classification(rng):
    from llamax.convert.hf import params_to_hf

    params = random_params(CONFIG, seed=3)
    assert set(params) == {"tok_embeddings", "layers", "norm", "score"}
    assert params["score"].shape == (CONFIG.dim, 1)
    assert CONFIG.num_params() == sum(x.size for x in jax.tree.leaves(params))
    hf = hf_reward_model(params_to_hf(params, CONFIG))
    tokens, segments = _sequences(rng, [16, 11, 5], 16)
    scores = llamax.Llama(CONFIG).apply({"params": params}, tokens, segment_ids=segments)
    assert scores.shape == tokens.shape
    ours, present = losses.segment_last_values(scores, segments, 1)
    assert present.all()
    np.testing.assert_allclose(ours[:, 0], hf_scores(hf, tokens)[:, 0].numpy(), atol=TOL)


def test_packed_sequences_read_like_separate_rows(rng):
    """Two sequences packed in one row (segments 1, 2, then padding) give the scores each has
    alone: what lets chosen and rejected responses share a row."""
    params = random_params(CONFIG, seed=4)
    model = llamax.Llama(CONFIG)
    a, b = rng.integers(3, CONFIG.vocab_size, 9), rng.integers(3, CONFIG.vocab_size, 6)
    row = np.zeros((1, 20), np.int32)
    segments, positions = np.zeros_like(row), np.zeros_like(row)
    row[0, :9], row[0, 9:15] = a, b
    segments[0, :9], segments[0, 9:15] = 1, 2
    positions[0, :9], positions[0, 9:15] = np.arange(9), np.arange(6)
    packed = model.apply({"params": params}, row, positions, segments)
    got, present = losses.segment_last_values(packed, segments, 3)
    assert present.tolist() == [[True, True, False]]
    alone = [model.apply({"params": params}, x[None])[0, -1] for x in (a, b)]
    np.testing.assert_allclose(got[0, :2], alone, atol=TOL)


def test_reward_model_converts_to_and_from_hugging_face(tmp_path, rng):
    from transformers import LlamaForSequenceClassification

    from llamax import convert, loading

    hf = hf_reward_model()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert.convert("hf", "llamax", str(tmp_path / "hf"), str(tmp_path / "llamax"))
    model, params = loading.load_pretrained(str(tmp_path / "llamax"))
    assert model.config.head == "score"
    tokens, segments = _sequences(rng, [12, 7], 12)
    ours = losses.segment_last_values(
        model.apply({"params": params}, tokens, segment_ids=segments), segments, 1
    )[0][:, 0]
    np.testing.assert_allclose(ours, hf_scores(hf, tokens)[:, 0].numpy(), atol=TOL)

    convert.convert("llamax", "hf", str(tmp_path / "llamax"), str(tmp_path / "back"))
    back = LlamaForSequenceClassification.from_pretrained(tmp_path / "back", dtype="float32")
    np.testing.assert_allclose(hf_scores(back, tokens).numpy(), hf_scores(hf, tokens), atol=TOL)
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["pad_token_id"] == 0 and saved["num_labels"] == 1
    with pytest.raises(ValueError, match="Meta's format holds language models only"):
        convert.convert("llamax", "meta", str(tmp_path / "llamax"), str(tmp_path / "meta"))
    assert not (tmp_path / "meta").exists()
    with pytest.raises(ValueError, match="is a reward model .*needs a language model"):
        loading.load_with_tokenizer(str(tmp_path / "llamax"), "unused")


@pytest.mark.parametrize(
    "change, message",
    [({"num_labels": 3, "id2label": {"0": "a", "1": "b", "2": "c"}}, "with 3 labels"),
     ({"architectures": ["LlamaForTokenClassification"]}, "Unknown Llama architecture")],
)  # fmt: skip
def test_hugging_face_heads_llamax_cannot_hold_are_named(change, message):
    from llamax.convert.hf import config_from_hf, hf_config

    with pytest.raises(ValueError, match=message):
        config_from_hf({**hf_config(CONFIG), **change})


def test_unknown_head_is_named():
    with pytest.raises(ValueError, match="head must be one of"):
        llamax.LlamaConfig.preset("tiny", head="value")


# ----- preference pairs and the reward model's training -----


def _pair(i, rating="better"):
    """A question; the chosen answer gives it, the rejected one declines (learnable fast)."""
    a, b = i % 7, (i * 3) % 5
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
            "rejected": ["I do not know.", "No idea, sorry."][i % 2], "rating": rating}  # fmt: skip


def test_a_pair_is_two_segments_in_the_chat_format(tokenizer_path):
    from llamax.data import chat_format, preference
    from llamax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "and 3+3?"}]  # fmt: skip
    ex = preference.pair_example(
        {"prompt": prompt, "chosen": "6", "rejected": "seven", "rating": "slightly better"}, tok
    )
    for segment, response in ((1, "6"), (2, "seven")):
        ids, mask = chat_format.dialog_tokens(
            [*prompt, {"role": "assistant", "content": response}], tok
        )
        where = ex["segments"] == segment
        assert ex["tokens"][where].tolist() == ids and ids[-1] == tok.eos_id
        np.testing.assert_array_equal(ex["positions"][where], np.arange(len(ids)))
        # The loss mask is the last answer's (and its EOS), not the earlier answer "4"'s.
        answer = tok.encode(f" {response} ", bos=False, eos=True)
        got = ex["tokens"][where][ex["loss_mask"][where] == 1].tolist()
        assert got[-len(answer) :] == answer[-len(got) :] and sum(mask) > len(got)
    assert set(ex["rating"].tolist()) == {3}  # "slightly better" is index 2, stored + 1


@pytest.mark.parametrize(
    "record, reason",
    [({"prompt": "q", "chosen": "a"}, "malformed"),
     ({"prompt": "q", "chosen": "a", "rejected": " "}, "empty answer"),
     ({"prompt": "q", "chosen": "a", "rejected": "a "}, "identical responses"),
     ({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "much better"}, "rating"),
     ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "chosen": "a", "rejected": "b"}, "roles"),
     ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": False,
       "rejected_safe": True}, "unsafe chosen over safe"),
     ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": "no"}, "malformed")],
)  # fmt: skip
def test_bad_pairs_are_refused_with_their_reason(record, reason, tokenizer_path):
    from llamax.data import preference
    from llamax.data.records import BadRecord
    from llamax.data.tokenizer import Tokenizer

    with pytest.raises(BadRecord) as e:
        preference.pair_example(record, Tokenizer(tokenizer_path))
    assert e.value.reason == reason


def test_the_reward_loss_reads_each_pair_at_its_last_tokens(tokenizer_path):
    """Two pairs packed in each row; the loss equals Llama 2's formula on the scores at each
    response's last token, with the margins of their ratings."""
    from llamax.data import preference

    records = [json.dumps(_pair(i, r)).encode()
               for i, r in enumerate(["better", None, "significantly better", 3] * 2)]  # fmt: skip
    it = iter(preference.make_dataset(records, tokenizer_path, 256, 2, seed=0, pairs_per_row=2))
    batch = {k: jax.numpy.asarray(v) for k, v in next(it).items()}
    assert int(batch["segment_ids"].max()) == 4
    config = CONFIG.replace(vocab_size=600)
    model, params = llamax.Llama(config), random_params(config, seed=5)
    total, (_, count, sums) = losses.reward_loss(params, model, batch, "large", 0.1, 2)
    scores = np.asarray(model.apply({"params": params}, batch["tokens"], batch["positions"],
                                    batch["segment_ids"]))  # fmt: skip
    want, pairs, right = 0.0, 0, 0
    seg, rating = np.asarray(batch["segment_ids"]), np.asarray(batch["rating"])
    for row in range(2):
        for k in range(2):
            ends = [np.flatnonzero(seg[row] == s)[-1] for s in (2 * k + 1, 2 * k + 2)]
            c, r = scores[row, ends[0]], scores[row, ends[1]]
            level = rating[row, ends[0]] - 1
            m = 0.0 if level < 0 else MARGINS["large"][level]
            want += np.log1p(np.exp(-(c - r - m))) + 0.1 * (c + r) ** 2
            pairs, right = pairs + 1, right + int(c > r)
    assert count == pairs == 4
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert sums["accuracy"] == right


def write_language_model(path, tokenizer_path):
    """A tiny language model (vocab 600) at the scale training starts from: weights of the
    default init's 0.02, written, not trained. A new score head on its body scores near 0 and
    a reward model's first loss is log 2 (on `tiny_lm`'s larger weights the last tokens of two
    responses differ enough that a new head's scores differ too: about 0.61)."""
    from conftest import write_checkpoint

    config = llamax.LlamaConfig.preset("tiny", vocab_size=600)
    return write_checkpoint(path, config, random_params(config, seed=21, std=0.02), tokenizer_path)


@pytest.mark.slow
def test_a_reward_model_trains_from_a_language_model(tmp_path, tokenizer_path):
    """llamax-train with model.head=score on preference pairs, from a language model's
    checkpoint: the body is the language model's, the loss starts at log 2 (a new head scores
    near 0) and falls, and the trained model ranks held-out pairs."""
    from conftest import load_config

    from llamax import loading, train
    from llamax.data.tokenizer import Tokenizer
    from llamax.metrics import read_metrics

    lm = write_language_model(str(tmp_path / "lm"), tokenizer_path)
    files = tmp_path / "pairs.jsonl"
    files.write_text("".join(json.dumps(_pair(i, None)) + "\n" for i in range(300)))
    c = load_config("tiny", **{
        "task": "reward", "model.vocab_size": 600, "model.head": "score",
        "data.source": "preference",
        "data.files": str(files), "data.tokenizer": tokenizer_path, "data.pairs_per_row": 2,
        "reward.margins": "none", "train.seq_len": 128, "train.steps": 12, "train.log_every": 1,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 3,
    })  # fmt: skip
    c.init_from = lm
    train.run(c, str(tmp_path / "rm"))
    records = read_metrics(str(tmp_path / "rm"))
    np.testing.assert_allclose(records[0]["loss"], np.log(2), atol=0.05)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    _, base = loading.load_pretrained(lm)
    model, params = loading.load_pretrained(str(tmp_path / "rm"))
    assert model.config.head == "score" and "output" not in params

    tok = Tokenizer(tokenizer_path)
    from llamax.data import preference

    forward = jax.jit(lambda p, *x: model.apply({"params": p}, *x))  # compiled per length
    right = 0
    for i in range(300, 340):
        ex = preference.pair_example(_pair(i, None), tok)
        scores = forward(params, ex["tokens"][None], ex["positions"][None], ex["segments"][None])
        (values, _) = losses.segment_last_values(scores, ex["segments"][None], 2)
        right += int(values[0, 0] > values[0, 1])
    assert right >= 36, right


def test_pairs_from_a_tfds_dataset(tmp_path, tokenizer_path):
    """A prepared tfds dataset with prompt, chosen, rejected and rating features gives the
    pairs its records make."""
    import tensorflow_datasets as tfds
    from conftest import load_config

    from llamax.data import make_iterator, preference
    from llamax.data.tokenizer import Tokenizer

    records = [_pair(i, ["better", "significantly better"][i % 2]) for i in range(12)]

    class LlamaxTestPairs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            names = ("prompt", "chosen", "rejected", "rating")
            features = tfds.features.FeaturesDict(dict.fromkeys(names, text))
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(records)}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    LlamaxTestPairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    c = load_config("tiny", **{
        "data.source": "preference", "data.tfds_name": LlamaxTestPairs.name,
        "data.tfds_data_dir": str(tmp_path), "data.tokenizer": tokenizer_path,
    })  # fmt: skip
    tok = Tokenizer(tokenizer_path)
    expected = {tuple(preference.pair_example(r, tok)["tokens"].tolist()) for r in records}
    rows, seen = make_iterator(c.data, "train", 128, range(2)), set()
    for _ in range(12):
        batch = next(rows)
        for row in range(2):
            pair = batch["segment_ids"][row] > 0
            assert set(batch["rating"][row][pair].tolist()) <= {1, 2}
            seen.add(tuple(batch["tokens"][row][pair].tolist()))
    assert seen == expected


# ----- using a reward model: scores, accuracy by rating, llamax-reward -----


def test_scores_and_accuracy_by_rating(tokenizer_path):
    """Scores read in padded batches equal each response scored alone; accuracy per rating
    level is the share of its pairs whose chosen response scores higher."""
    from llamax import reward
    from llamax.data.tokenizer import Tokenizer

    config = CONFIG.replace(vocab_size=600)
    model, params = llamax.Llama(config), random_params(config, seed=6)
    tok = Tokenizer(tokenizer_path)
    levels = ["significantly better", "better", "slightly better", None, 0]
    records = [_pair(i, levels[i % 5]) for i in range(11)]
    records[4]["rejected"] = ""  # skipped: an empty answer
    scores, ratings, skipped = reward.pair_scores(model, params, tok, records, batch_size=4)
    assert skipped == {"empty answer": 1} and scores.shape == (10, 2)
    kept = [r for i, r in enumerate(records) if i != 4]
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))  # compiled per length
    for (chosen, rejected), record in zip(scores, kept, strict=True):
        for got, response in ((chosen, record["chosen"]), (rejected, record["rejected"])):
            tokens, _ = preference_tokens(record["prompt"], response, tok)
            alone = forward(params, tokens[None])[0, -1]
            np.testing.assert_allclose(got, alone, atol=TOL)
    result = reward.accuracy_by_rating(scores, ratings)
    right = scores[:, 0] > scores[:, 1]
    assert result["accuracy"] == pytest.approx(right.mean()) and result["pairs"] == 10
    for i, level in enumerate(RATINGS):
        chosen = ratings == i
        want = right[chosen].mean() if chosen.any() else None
        assert result["by_rating"][level] == {"accuracy": want, "pairs": int(chosen.sum())}
    assert result["unrated_pairs"] == int((ratings < 0).sum()) == 2


def preference_tokens(prompt, response, tok):
    from llamax.data import preference

    return preference.response_tokens(prompt, response, tok)


def test_llamax_reward_scores_and_evaluates(tmp_path, tokenizer_path, capsys):
    """`llamax-reward score` writes each record with the score transformers' sequence
    classifier gives it; `eval` writes the accuracy table and its plot; a bad record is an
    error naming its line, and nothing is written."""
    import torch

    from llamax import convert
    from llamax.cli import reward as reward_cli
    from llamax.data.tokenizer import Tokenizer

    config = CONFIG.replace(vocab_size=600)
    hf = hf_reward_model(config=config)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    rm = str(tmp_path / "rm")
    convert.convert("hf", "llamax", str(tmp_path / "hf"), rm, tokenizer=tokenizer_path)
    answers = [{"prompt": f"What is {i} plus 1?", "response": f"It is {i + 1}.", "id": i}
               for i in range(5)]  # fmt: skip
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = str(tmp_path / "scored.jsonl")
    assert reward_cli.main(["score", "--checkpoint", rm, "--input",
                            str(tmp_path / "answers.jsonl"), "--output", out]) == 0  # fmt: skip
    scored = [json.loads(line) for line in open(out)]
    tok = Tokenizer(tokenizer_path)
    for record, answer in zip(scored, answers, strict=True):
        assert {k: record[k] for k in answer} == answer
        tokens, _ = preference_tokens(answer["prompt"], answer["response"], tok)
        with torch.no_grad():
            want = hf(input_ids=torch.as_tensor(tokens[None], dtype=torch.long)).logits[0, 0]
        assert record["score"] == pytest.approx(float(want), abs=TOL)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(_pair(i, ["better", None][i % 2])) + "\n"
                             for i in range(6)) + "{oops\n")  # fmt: skip
    report = tmp_path / "eval"
    assert reward_cli.main(["eval", "--checkpoint", rm, "--pairs", str(pairs),
                            "--output", str(report)]) == 0  # fmt: skip
    result = json.loads((report / "accuracy.json").read_text())
    assert result["pairs"] == 6 and result["skipped"] == {"not JSON": 1}
    assert result["by_rating"]["better"]["pairs"] == 3 and result["unrated_pairs"] == 3
    assert (report / "accuracy.png").stat().st_size > 0
    assert "overall:" in capsys.readouterr().out

    (tmp_path / "bad.jsonl").write_text(json.dumps(answers[0]) + "\n" + '{"prompt": "q"}\n')
    bad_out = tmp_path / "bad_scored.jsonl"
    assert reward_cli.main(["score", "--checkpoint", rm, "--input", str(tmp_path / "bad.jsonl"),
                            "--output", str(bad_out)]) == 2  # fmt: skip
    assert "bad.jsonl:2: malformed" in capsys.readouterr().err and not bad_out.exists()


def test_scoring_stays_within_the_window_and_the_work(rng):
    """A batch larger than the sequences scores them in one call of as many rows; a sequence
    longer than the model's window is refused, never scored past it."""
    from llamax import reward

    model, params = llamax.Llama(CONFIG), random_params(CONFIG, seed=3)
    sequences = [rng.integers(3, CONFIG.vocab_size, n).astype(np.int32) for n in (5, 70, 9)]
    small = reward.score_sequences(model, params, sequences, batch_size=2)
    huge = reward.score_sequences(model, params, sequences, batch_size=10**9)
    np.testing.assert_allclose(huge, small, atol=TOL)
    too_long = [*sequences, np.ones(CONFIG.max_seq_len + 1, np.int32)]
    with pytest.raises(ValueError, match="sequence 3 is 257 tokens, longer than the reward "
                       r"model's window of 256 tokens \(max_seq_len\)"):  # fmt: skip
        reward.score_sequences(model, params, too_long, batch_size=10**9)


def test_pairs_longer_than_the_window_are_skipped_and_no_usable_pair_says_why(tokenizer_path):
    from llamax import reward
    from llamax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    long = " ".join(["the model trains"] * 200)
    records = [_pair(0, "better"), {**_pair(1, None), "chosen": long}, "{oops", _pair(2, 0)]
    sequences, ratings, skipped = reward.pair_sequences(records, tok, CONFIG.max_seq_len)
    assert skipped == {"too long": 1, "not JSON": 1} and ratings.tolist() == [1, 0]
    assert len(sequences) == 4 and max(len(x) for x in sequences) <= CONFIG.max_seq_len
    with pytest.raises(ValueError) as e:
        reward.pair_sequences(records[1:3], tok, CONFIG.max_seq_len)
    assert str(e.value) == ("no usable preference pair to evaluate: 2 skipped (1 not JSON, "
                            "1 too long)")  # fmt: skip


def test_a_pair_preferring_an_unsafe_response_to_a_safe_one_is_left_out(tokenizer_path):
    """Llama 2's rule: chosen unsafe and rejected safe is dropped and counted; every other
    labelling (and none) is kept, so one set of pairs trains either reward model."""
    from llamax import reward
    from llamax.data.tokenizer import Tokenizer

    labels = [(False, True), (True, False), (False, False), (True, True), (None, None),
              (False, None), (None, True)]  # fmt: skip
    records = [{**_pair(i), "chosen_safe": c, "rejected_safe": r}
               for i, (c, r) in enumerate(labels)]  # fmt: skip
    sequences, ratings, skipped = reward.pair_sequences(records, Tokenizer(tokenizer_path),
                                                        CONFIG.max_seq_len)  # fmt: skip
    assert skipped == {"unsafe chosen over safe": 1}
    assert len(ratings) == len(labels) - 1 and len(sequences) == 2 * (len(labels) - 1)
