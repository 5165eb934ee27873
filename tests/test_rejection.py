"""Rejection sampling (Llama 2's section 3.2.3), one round: K samples per prompt are K random
streams (K equal greedy answers at temperature 0), the kept response is the argmax of the
reward model's scores computed here independently, the written file is chat SFT data whose
loss mask covers exactly the kept answer, the report is its hand computation, a bad prompt
line is an error naming it, and `llamax-reward sample` runs a round and its fine-tune."""

import json
import os

import numpy as np
import pytest
from conftest import random_params, write_checkpoint

import llamax
from llamax import generation, rejection, reward
from llamax.data import chat, chat_format, preference
from llamax.data import records as records_lib
from llamax.data.tokenizer import Tokenizer

LM = llamax.LlamaConfig.preset("tiny", vocab_size=600)
RM = LM.replace(head="score")
PROMPTS = [
    "What is the model?",
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "which optimizer?"}],
    [{"role": "user", "content": "the weights?"}, {"role": "assistant", "content": "float32"},
     {"role": "user", "content": "and the cache?"}],
]  # fmt: skip
SAMPLING = {"temperature": 1.0, "max_new_tokens": 6, "seed": 1}
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tokenizer_path):
    """(policy, reward model): each (model, params, tokenizer), random weights."""
    tok = Tokenizer(tokenizer_path)
    policy = (llamax.Llama(LM), random_params(LM, seed=11), tok)
    return policy, (llamax.Llama(RM), random_params(RM, seed=12), tok)


@pytest.fixture(scope="module")
def a_round(models):
    policy, reward_model = models
    return rejection.run_round(policy, reward_model, PROMPTS, k=4, batch_size=6,
                               keep_truncated=True, **SAMPLING)  # fmt: skip


def test_k_samples_are_distinct_streams_and_greedy_is_k_copies(models, a_round):
    model, params, tok = models[0]
    # 12 rows in calls of 6: prompt 1's samples are spread over two calls, each its own key.
    samples = a_round.samples
    assert samples.texts == rejection.sample(model, params, tok, PROMPTS, 4, batch_size=6,
                                             **SAMPLING).texts  # fmt: skip
    for texts in samples.texts:
        assert len(texts) == 4 and len(set(texts)) == 4, texts
    assert samples.truncated.shape == (3, 4)
    other = rejection.sample(model, params, tok, PROMPTS, 4, batch_size=6,
                             **{**SAMPLING, "seed": 2})  # fmt: skip
    assert all(a != b for x, y in zip(samples.texts, other.texts, strict=True)
               for a, b in zip(x, y, strict=True))  # fmt: skip

    # One prompt in calls of 2 rows: a call's rows draw independently, and the calls do not
    # share a key (the same key would repeat the first call's two samples).
    apart = rejection.sample(model, params, tok, PROMPTS[:1], 4, batch_size=2, **SAMPLING)
    assert len(set(apart.texts[0])) == 4, apart.texts

    greedy = rejection.sample(model, params, tok, PROMPTS, 2, batch_size=6,
                              **{**SAMPLING, "temperature": 0.0})  # fmt: skip
    ids = [generation.chat_tokens(preference.prompt_messages(p), tok) for p in PROMPTS]
    alone = generation.generate(model, params, ids, max_new_tokens=6, eos_id=tok.eos_id)
    assert greedy.texts == [[generation.answer_text(tok, x)] * 2 for x in alone]
    assert len({t[0] for t in greedy.texts}) == 3


def test_the_kept_response_is_the_argmax_of_the_reward_models_scores(a_round, models):
    rm, rm_params, tok = models[1]
    assert len(a_round.records) == 3
    best_of = []
    for i, prompt in enumerate(PROMPTS):
        texts = a_round.samples.texts[i]
        assert len(set(texts)) == 4
        # Each response re-tokenized here and scored alone (a row of its own): the reward
        # model's score at the last token of prompt + response in the chat format.
        sequences = [preference.response_tokens(prompt, text, tok)[0] for text in texts]
        assert all(x[-1] == tok.eos_id for x in sequences)
        alone = reward.score_sequences(rm, rm_params, sequences, batch_size=1).tolist()
        np.testing.assert_allclose(a_round.scores[i], alone, atol=TOL)
        assert len(set(np.round(alone, 4))) == 4
        record = a_round.records[i]
        assert record["messages"][-1] == {"role": "assistant",
                                          "content": texts[int(np.argmax(alone))]}  # fmt: skip
        assert record["messages"][:-1] == preference.prompt_messages(prompt)
        assert record["score"] == pytest.approx(max(alone), abs=TOL)
        assert record["prompt_index"] == i
        best_of.append(alone)
    best_of = np.asarray(best_of)
    report = a_round.report
    assert {k: report[k] for k in ("prompts", "samples_per_prompt", "samples", "scored",
                                   "kept", "skipped", "unscored")} == {
        "prompts": 3, "samples_per_prompt": 4, "samples": 12, "scored": 12, "kept": 3,
        "skipped": 0, "unscored": {}}  # fmt: skip
    assert report["mean_reward"] == pytest.approx(best_of.mean(), abs=TOL)
    assert report["mean_best_reward"] == pytest.approx(best_of.max(1).mean(), abs=TOL)
    assert report["max_reward"] == pytest.approx(best_of.max(), abs=TOL)
    assert report["min_reward"] == pytest.approx(best_of.min(), abs=TOL)
    assert report["truncated"] == int(a_round.samples.truncated.sum())


def test_unusable_responses_get_no_score_and_a_prompt_without_one_is_skipped(models, tmp_path):
    rm, rm_params, tok = models[1]
    texts = [["", "  ", "", "\n"], ["a good answer", "", "[INST] tags", "the model trains"],
             ["the cache", "the cache", "", ""]]  # fmt: skip
    scores, unscored = rejection.score(rm, rm_params, tok, PROMPTS, texts, batch_size=2)
    assert unscored == {"empty answer": 7, "special tags": 1}
    assert np.isnan(scores[0]).all() and np.isnan(scores[1, 1:3]).all()
    records, report = rejection.select(PROMPTS, texts, scores)
    assert [r["prompt_index"] for r in records] == [1, 2]
    kept = [scores[1, 0], scores[1, 3]]
    assert records[0]["messages"][-1]["content"] == texts[1][int(np.argmax(kept)) * 3]
    assert records[1]["messages"][-1]["content"] == "the cache"  # the first of equal scores
    assert scores[2, 0] == scores[2, 1]
    valid = scores[~np.isnan(scores)]
    assert report["kept"] == 2 and report["skipped"] == 1 and report["scored"] == valid.size == 4
    assert report["mean_reward"] == pytest.approx(valid.mean())
    assert report["mean_best_reward"] == pytest.approx((max(kept) + scores[2, 0]) / 2)

    # A policy that only ever says EOS: every prompt skipped, nothing to write.
    model, params, _ = models[0]
    silent = {**params, "output": params["output"].at[:, tok.eos_id].add(1e3)}
    empty = rejection.run_round((model, silent, tok), models[1], PROMPTS, k=2, batch_size=6,
                                **SAMPLING)  # fmt: skip
    assert empty.samples.texts == [["", ""]] * 3
    assert empty.records == [] and empty.report["skipped"] == 3
    assert empty.report["unscored"] == {"empty answer": 6} and empty.report["mean_reward"] is None
    out = tmp_path / "round.jsonl"
    with pytest.raises(ValueError, match="nothing to fine-tune on"):
        rejection.write_dataset(str(out), empty.records)
    assert not out.exists()


def test_the_data_written_reads_back_as_sft_examples_on_the_kept_answers(
    a_round, models, tmp_path, tokenizer_path
):
    tok = models[0][2]
    path = str(tmp_path / "round.jsonl")
    rejection.write_dataset(path, a_round.records)
    lines = records_lib.read_records(path)
    assert [json.loads(line) for line in lines] == a_round.records
    expected = {}
    for line, record, prompt in zip(lines, a_round.records, PROMPTS, strict=True):
        tokens, mask = chat_format.example_tokens(line, tok)
        # Before the answer: the prompt the policy was given, masked as chat SFT masks it
        # (nothing for a question; a dialog's earlier answers are answers too). Then the kept
        # answer and its EOS, all masked in.
        messages = preference.prompt_messages(prompt)
        head = generation.chat_tokens(messages, tok)
        assert tokens[: len(head)].tolist() == head
        assert mask[: len(head)].tolist() == chat_format.dialog_tokens(messages, tok)[1]
        assert mask[: len(head)].any() == (len(messages) > 2)
        assert mask[len(head) :].all() and tokens[-1] == tok.eos_id
        answer = record["messages"][-1]["content"]
        assert tok.decode(tokens[len(head) : -1].tolist()).strip() == answer.strip()
        expected[tuple(tokens.tolist())] = mask.tolist()
    # Through the training data path: packed rows whose loss mask is each kept answer's.
    seen = {}
    for batch in chat.make_dataset(lines, tokenizer_path, 128, 1, seed=0, num_epochs=1):
        for s in range(1, int(batch["segment_ids"].max()) + 1):
            where = batch["segment_ids"][0] == s
            seen[tuple(batch["tokens"][0][where].tolist())] = batch["loss_mask"][0][where].tolist()
    assert seen == expected


def test_a_bad_prompt_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "prompts.jsonl"
    for body, problem in [
        ('{"prompt": "ok"}\n\n{"prompt": [{"role": "assistant", "content": "x"}]}\n',
         "line 3: Roles must be"),
        ('{"prompt": "ok"}\n{"question": "x"}\n', 'line 2: malformed: a record needs a "prompt"'),
        ('{oops\n', "line 1: not JSON"),
        ('{"prompt": "[INST] x"}\n', "line 1: Special tags"),
        ("\n", "no prompts"),
    ]:  # fmt: skip
        path.write_text(body)
        with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
            rejection.read_prompts(str(path))
    path.write_text('{"prompt": "a", "id": 7}\n\n{"prompt": [{"role": "user", "content": "b"}]}')
    assert rejection.read_prompts(str(path)) == [
        {"prompt": "a", "id": 7}, {"prompt": [{"role": "user", "content": "b"}]}]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory, tokenizer_path):
    """(policy, reward model) as llamax checkpoints with their tokenizer, and a prompts file."""
    root = tmp_path_factory.mktemp("rejection")
    lm = write_checkpoint(str(root / "lm"), LM, models[0][1], tokenizer_path)
    rm = write_checkpoint(str(root / "rm"), RM, models[1][1], tokenizer_path)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                               for i, p in enumerate(PROMPTS)))  # fmt: skip
    return lm, rm, str(prompts)


def _sample_args(checkpoints, output, *more):
    lm, rm, prompts = checkpoints
    return ["sample", "--policy", lm, "--checkpoint", rm, "--prompts", prompts, "--k", "4",
            "--batch-size", "6", "--max-new-tokens", "6", "--seed", "1", "--keep-truncated",
            "--output", str(output), *more]  # fmt: skip


def test_llamax_reward_sample_writes_the_round_and_its_report(
    checkpoints, a_round, tmp_path, capsys
):
    from llamax.cli import reward as reward_cli

    out, report_path = tmp_path / "round1.jsonl", tmp_path / "round1.json"
    assert reward_cli.main(_sample_args(checkpoints, out, "--report", str(report_path))) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2]
    # The library's round, from the checkpoints: the same samples, the same choice.
    for record, want in zip(records, a_round.records, strict=True):
        assert record["messages"] == want["messages"]
        assert record["score"] == pytest.approx(want["score"], abs=TOL)
    report = json.loads(report_path.read_text())
    for key in ("mean_reward", "mean_best_reward", "max_reward", "min_reward"):
        assert report[key] == pytest.approx(a_round.report[key], abs=TOL)
    assert report["mean_best_reward"] == pytest.approx(np.mean([r["score"] for r in records]))
    assert report["samples"] == 12 and report["kept"] == 3 and report["skipped"] == 0
    assert report["policy"] == checkpoints[0] and report["reward_model"] == checkpoints[1]
    assert report["temperature"] == 1.0 and report["seed"] == 1
    printed = capsys.readouterr().out
    assert f"mean reward {report['mean_reward']:.4f}" in printed
    assert f"max {report['max_reward']:.4f}" in printed

    # A bad line: an error naming it, nothing written.
    bad_prompts = tmp_path / "bad_prompts.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    bad = tmp_path / "bad.jsonl"
    args = _sample_args((*checkpoints[:2], str(bad_prompts)), bad, "--report", str(bad) + ".json")
    assert reward_cli.main(args) == 2
    assert "line 2: malformed" in capsys.readouterr().err
    assert not bad.exists() and not os.path.exists(str(bad) + ".json")
    # A reward model where the policy goes, and the other way round: refused by name.
    lm, rm, prompts = checkpoints
    assert reward_cli.main(_sample_args((lm, lm, prompts), bad)) == 2
    assert "needs a reward model" in capsys.readouterr().err and not bad.exists()
    assert reward_cli.main(_sample_args((rm, rm, prompts), bad)) == 2
    assert "needs a language model" in capsys.readouterr().err and not bad.exists()


FINETUNE_CONFIG = """from llamax.experiment import chat_sft_recipe


def get_config():
    c = chat_sft_recipe("tiny")
    c.model.vocab_size = 600
    c.train.steps, c.train.batch_size, c.train.seq_len = 2, 8, 128
    c.train.eval_every, c.train.progress_bar, c.train.log_every = 0, False, 1
    c.data.validation_fraction = 0.0
    return c
"""


@pytest.mark.slow
def test_llamax_reward_sample_then_fine_tunes_the_policy_on_the_round(checkpoints, tmp_path):
    """`--finetune CONFIG --workdir DIR`: after the data is written, the config trains the
    policy (`init_from`) on it (`data.files`), as llamax-train would."""
    from llamax.cli import reward as reward_cli
    from llamax.metrics import read_metrics

    config = tmp_path / "finetune.py"
    config.write_text(FINETUNE_CONFIG)
    out, run = tmp_path / "round1.jsonl", tmp_path / "run"
    args = _sample_args(checkpoints, out, "--finetune", str(config), "--workdir", str(run))
    assert reward_cli.main(args) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["init_from"] == checkpoints[0] and recorded["data"]["source"] == "chat"
    assert recorded["data"]["files"] == str(out) and recorded["data"]["tfds_name"] == ""
    assert [m["step"] for m in read_metrics(str(run))] == [1, 2]
    assert (run / "tokenizer.model").read_bytes() == open(checkpoints[0] + "/tokenizer.model",
                                                          "rb").read()  # fmt: skip


def test_a_fine_tune_that_cannot_run_is_refused_before_sampling(checkpoints, tmp_path, capsys):
    from llamax.cli import reward as reward_cli

    config = tmp_path / "finetune.py"
    config.write_text(FINETUNE_CONFIG)
    out = tmp_path / "round1.jsonl"
    for more, problem in [
        (["--policy-adapters", "x"], "LoRA adapters are not part of"),
        (["--finetune", str(tmp_path / "nope.py")], "no config file"),
    ]:  # fmt: skip
        flags = ["--finetune", str(config), "--workdir", str(tmp_path / "w"), *more]
        assert reward_cli.main(_sample_args(checkpoints, out, *flags)) == 2
        assert problem in capsys.readouterr().err and not out.exists()
    config.write_text(FINETUNE_CONFIG.replace("vocab_size = 600", "vocab_size = 640"))
    assert reward_cli.main(_sample_args(checkpoints, out, "--finetune", str(config),
                                        "--workdir", str(tmp_path / "w"))) == 2  # fmt: skip
    assert "vocab_size 640 (policy: 600)" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        reward_cli.main(_sample_args(checkpoints, out, "--finetune", str(config)))
    assert "--finetune and --workdir go together" in capsys.readouterr().err
    config.write_text(FINETUNE_CONFIG)
    glob_out = tmp_path / "round*.jsonl"
    assert reward_cli.main(_sample_args(checkpoints, glob_out, "--finetune", str(config),
                                        "--workdir", str(tmp_path / "w"))) == 2  # fmt: skip
    assert "reads '*?[,' as patterns" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["finetune.py"]  # nothing sampled, nothing written


def test_answers_cut_off_by_max_new_tokens_are_not_kept_by_default(models, a_round):
    """A truncated sample written as a whole answer (closed by EOS) would teach stopping
    mid-answer: without keep_truncated it gets no score, counted as "truncated"."""
    cut = np.zeros_like(a_round.samples.truncated)
    cut[:, :2] = True  # the first two samples of each prompt stopped by max_new_tokens
    cut[0, :] = True  # and every sample of the first prompt
    samples = rejection.Samples(a_round.samples.texts, cut)
    strict = rejection.finish_round(models[1], PROMPTS, samples, batch_size=6)
    assert strict.report["unscored"] == {"truncated": int(cut.sum())}
    assert np.isnan(strict.scores[cut]).all()
    np.testing.assert_allclose(strict.scores[~cut], a_round.scores[~cut], atol=TOL)
    assert strict.report["skipped"] == 1 and [r["prompt_index"] for r in strict.records] == [1, 2]
    for record in strict.records:
        i = record["prompt_index"]
        best = 2 + int(np.argmax(a_round.scores[i, 2:]))
        assert record["messages"][-1]["content"] == a_round.samples.texts[i][best]


def test_the_rounds_counts_add_up_in_its_log_line_and_its_report(models, a_round, caplog):
    """Every sample is scored or counted once, by one reason; the one log line says what the
    report holds. A response too long for the reward model's window is not scored."""
    import logging

    texts = [list(t) for t in a_round.samples.texts]
    texts[0][0] = " "  # an empty answer
    texts[1][1] = " ".join(["the model trains"] * 200)  # past the window (256 tokens)
    cut = np.zeros_like(a_round.samples.truncated)
    cut[2, :3] = True  # stopped by max_new_tokens
    caplog.set_level(logging.INFO, logger="llamax")
    strict = rejection.finish_round(models[1], PROMPTS, rejection.Samples(texts, cut), 6)
    report = strict.report
    assert report["unscored"] == {"empty answer": 1, "too long": 1, "truncated": 3}
    assert report["scored"] + sum(report["unscored"].values()) == report["samples"] == 12
    assert int(np.isnan(strict.scores).sum()) == 5
    lines = [m for m in caplog.messages if m.startswith("rejection sampling:")]
    assert lines == ["rejection sampling: 7 of 12 responses scored, 5 without a score "
                     "(1 empty answer, 1 too long, 3 truncated)"]  # fmt: skip


def test_a_round_never_decodes_more_rows_than_it_has(models, monkeypatch):
    """A batch larger than the round gives the engine as many slots as the round has samples,
    and the same samples (each sample's stream is its own)."""
    from llamax import inference

    model, params, tok = models[0]
    want = rejection.sample(model, params, tok, PROMPTS, 2, batch_size=6, **SAMPLING)
    slots = []
    generate = inference.Engine.generate

    def counted(engine, prompts, sampling, **kwargs):
        slots.append(kwargs["slots"])
        return generate(engine, prompts, sampling, **kwargs)

    monkeypatch.setattr(inference.Engine, "generate", counted)
    huge = rejection.sample(model, params, tok, PROMPTS, 2, batch_size=10**9, **SAMPLING)
    small = rejection.sample(model, params, tok, PROMPTS, 2, batch_size=4, **SAMPLING)
    assert slots == [6, 4] and huge.texts == want.texts == small.texts
    with pytest.raises(ValueError, match="a round of 3 prompts x 1,000,000,000 samples"):
        rejection.sample(model, params, tok, PROMPTS, 10**9, batch_size=8, **SAMPLING)
    assert slots == [6, 4]  # refused before any generation


def test_the_fine_tunes_config_trains_the_policy_on_the_rounds_chat_data(tmp_path):
    """Whatever the config file trained, the round's fine-tune is chat SFT of the policy on
    the round's data, tokenized with the policy's tokenizer."""
    from llamax import experiment

    c = experiment.default_config()
    c.task, c.data.source, c.data.tfds_name = "lm", "tfds", "pg19"
    out = str(tmp_path / "round.jsonl")
    tuned = rejection.finetune_config(c, out, "runs/sft", "runs/sft/tokenizer.model")
    assert (tuned.task, tuned.data.source, tuned.data.files, tuned.data.tfds_name) == (
        "sft", "chat", out, "")  # fmt: skip
    assert tuned.init_from == "runs/sft" and tuned.data.tokenizer == "runs/sft/tokenizer.model"
    assert c.task == "lm" and c.data.source == "tfds"  # a copy: the config given is unchanged
    with pytest.raises(ValueError, match="reads '\\*\\?\\[,' as patterns"):
        rejection.finetune_config(c, str(tmp_path / "round*.jsonl"), "runs/sft", "t.model")
