"""Requests beyond the model are refused before anything is allocated, with one `error:` line
giving the numbers: a prompt and its new tokens past the window (`max_seq_len`), a scored
response past it, K samples beyond the host's memory; batch sizes larger than the work are
clamped to it. And the commands' rough edges: a prompt that is not UTF-8, an existing output,
eval's reasons when no pair is usable, chat answers without the chat format's trailing
space, the progress bar's ETA and plain log lines off a terminal, the LoRA
parameter line, and `--config.KEY=VALUE` overrides of `sample --finetune`; the model and
sampling flags the commands share, and their one config loader. (`--help`:
tests/test_configs.py.)"""

import io
import json
import logging
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, WORDS, load_config, run_cli
from test_rejection import FINETUNE_CONFIG

import llamax
from llamax import generation, inference, loading, metrics, rejection
from llamax.cli import generate as generate_cli
from llamax.cli import reward as reward_cli
from llamax.data.tokenizer import Tokenizer

WINDOW = 256  # the tiny preset's max_seq_len, the tiny_lm and tiny_rm fixtures'


def _long_text(n_words=400):
    return " ".join(WORDS[i % 20] for i in range(n_words))


def _forbid_loading(monkeypatch):
    """Loading a checkpoint's weights fails the test: what is refused is refused before."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(loading, "load_with_tokenizer", boom)
    monkeypatch.setattr(loading, "load_pretrained", boom)


@pytest.fixture
def no_model_load(monkeypatch):
    _forbid_loading(monkeypatch)


def _one_error(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


# ----- the window -----


def test_score_refuses_a_response_longer_than_the_window(tiny_rm, tmp_path, capsys,
                                                         no_model_load):  # fmt: skip
    records = [{"prompt": "What is it?", "response": "green 3"},
               {"prompt": "And this?", "response": _long_text()}]  # fmt: skip
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "scored.jsonl"
    start = time.perf_counter()
    code = reward_cli.main(["score", "--checkpoint", tiny_rm, "--input", str(path),
                            "--output", str(out)])  # fmt: skip
    line = _one_error(capsys, "llamax-reward")
    assert code == 2 and time.perf_counter() - start < 5
    assert "answers.jsonl:2: " in line and f"window of {WINDOW} tokens (max_seq_len)" in line, line
    n = int(line.split("are ")[1].split(" tokens")[0].replace(",", ""))
    assert n > WINDOW and not out.exists()


@pytest.mark.slow
def test_eval_skips_pairs_longer_than_the_window_and_says_why_none_is_usable(
    tiny_rm, tmp_path, capsys, monkeypatch
):
    good = {"prompt": "Which colour?", "chosen": "green 3", "rejected": "blue 4",
            "rating": "better"}  # fmt: skip
    long = {**good, "rejected": _long_text()}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [good, long, good]) + "{oops\n")
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", tiny_rm, "--pairs", str(pairs), "--output", str(out)]
    # A batch larger than the work: two pairs, four rows, one call.
    assert reward_cli.main([*args, "--batch-size", "1000000000"]) == 0
    result = json.loads((out / "accuracy.json").read_text())
    assert result["pairs"] == 2 and result["skipped"] == {"too long": 1, "not JSON": 1}

    # No usable pair: the reasons and their counts, before the model is loaded.
    pairs.write_text(json.dumps(long) + "\n{oops\n" + json.dumps(long) + "\n")
    _forbid_loading(monkeypatch)
    assert reward_cli.main([*args[:-1], str(tmp_path / "eval2")]) == 2
    line = _one_error(capsys, "llamax-reward")
    assert "no usable preference pair" in line and str(pairs) in line
    assert "3 skipped (1 not JSON, 2 too long)" in line, line
    assert not (tmp_path / "eval2").exists()


def test_generate_refuses_new_tokens_beyond_the_window(tiny_lm, capsys, no_model_load):
    start = time.perf_counter()
    code = generate_cli.main(["--checkpoint", tiny_lm, "--prompt", "the model",
                              "--max-new-tokens", "1000000000"])  # fmt: skip
    line = _one_error(capsys, "llamax-generate")
    assert code == 2 and time.perf_counter() - start < 5
    assert "1,000,000,000 new tokens" in line and f"window of {WINDOW} tokens" in line, line
    tok = Tokenizer(os.path.join(tiny_lm, "tokenizer.model"))
    n = len(tok.encode("the model", bos=True))
    assert f"ask for at most {WINDOW - n} new tokens" in line

    # A prompt that fills the window leaves no room at all.
    assert generate_cli.main(["--checkpoint", tiny_lm, "--prompt", _long_text(),
                              "--max-new-tokens", "8"]) == 2  # fmt: skip
    assert "shorten the prompt" in _one_error(capsys, "llamax-generate")


def test_the_library_refuses_what_the_model_or_the_memory_cannot_take(monkeypatch):
    config = llamax.LlamaConfig.preset("tiny")
    model = llamax.Llama(config)
    params = None  # never reached: each request is refused before anything runs
    with pytest.raises(ValueError, match="more than the model's window of 256 tokens"):
        llamax.generate(model, params, [[1] * 200], max_new_tokens=57)
    with pytest.raises(ValueError, match="top_k 1,000 is more than the model's vocabulary"):
        llamax.generate(model, params, [[1, 5]], top_k=1000, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        llamax.generate(model, params, [[1, 5]], temperature=float("nan"))
    # Within the window, beyond the memory: the estimate (KV cache, logits, attention scores)
    # against what the device can hold, in bytes, and what to lower. The engine's buffers: 64
    # slots of the prompts' bucket (128) and 112 new tokens, one prompt's bucket.
    need = inference.generation_bytes(model, 64, 100, 100)
    cache = 2 * config.n_layers * (64 * 240 + 128) * config.kv_heads * config.head_dim * 4
    assert need["KV cache"] == cache and need["prefill logits"] == 128 * config.vocab_size * 4
    monkeypatch.setattr(inference, "available_memory", lambda host=False: (10**6, "the test's"))
    with pytest.raises(ValueError) as e:
        llamax.generate(model, params, [[1] * 100] * 64, max_new_tokens=100)
    message = str(e.value)
    assert "generating 64 rows of up to 200 tokens needs about" in message
    assert f"KV cache {inference.format_bytes(cache)}" in message
    assert "more than the test's (976.6 KiB)" in message and "--batch-size" in message


def test_sampling_settings_are_checked_in_one_place():
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0"):
        inference.SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        inference.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        inference.SamplingConfig(seed=2**63)

    class Flags:
        max_new_tokens, temperature, top_p, top_k, seed = 8, -1.0, 1.0, -2, 0

    with pytest.raises(ValueError) as e:
        inference.SamplingConfig.from_flags(Flags)
    assert str(e.value) == ("--temperature must be a finite number >= 0, got -1.0; --top-k "
                            "must be an integer >= 0 (0: no cut), got -2")  # fmt: skip


# ----- batch sizes and K -----


def test_score_clamps_a_huge_batch_and_refuses_an_existing_output(tiny_rm, tmp_path, capsys):
    records = [{"prompt": f"What is {i}?", "response": f"It is {i}."} for i in range(3)]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, small = tmp_path / "scored.jsonl", tmp_path / "small.jsonl"
    args = ["score", "--checkpoint", tiny_rm, "--input", str(path)]
    assert reward_cli.main([*args, "--output", str(out), "--batch-size", "1000000000"]) == 0
    assert reward_cli.main([*args, "--output", str(small), "--batch-size", "1"]) == 0
    got, want = ([json.loads(line)["score"] for line in open(p)] for p in (out, small))
    np.testing.assert_allclose(got, want, atol=1e-5)
    capsys.readouterr()

    # An existing output is refused before the model is loaded, and left as it was.
    before = out.read_bytes()
    start = time.perf_counter()
    assert reward_cli.main([*args, "--output", str(out)]) == 2
    line = _one_error(capsys, "llamax-reward")
    assert f"--output {out} exists; remove it or choose another path" in line
    assert out.read_bytes() == before and time.perf_counter() - start < 2


def _prompts(tmp_path, n=3):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1?"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return str(path)


def _round_args(tiny_lm, tiny_rm, prompts, output, *more):
    return ["sample", "--policy", tiny_lm, "--checkpoint", tiny_rm, "--prompts", prompts,
            "--k", "2", "--max-new-tokens", "4", "--seed", "3", "--keep-truncated",
            "--output", str(output), *more]  # fmt: skip


def test_sample_refuses_k_beyond_memory_before_loading_anything(
    tiny_lm, tiny_rm, tmp_path, capsys, no_model_load
):
    args = _round_args(tiny_lm, tiny_rm, _prompts(tmp_path), tmp_path / "round.jsonl")
    args[args.index("--k") + 1] = "1000000000"
    start = time.perf_counter()
    assert reward_cli.main(args) == 2
    line = _one_error(capsys, "llamax-reward")
    assert time.perf_counter() - start < 5
    assert "a round of 3 prompts x 1,000,000,000 samples of up to 4 new tokens" in line, line
    assert "this host's available memory" in line and "lower --k" in line
    assert not (tmp_path / "round.jsonl").exists()

    # Beyond the policy's window: the prompt named, before anything is loaded.
    args[args.index("--k") + 1] = "2"
    args[args.index("--max-new-tokens") + 1] = "1000"
    assert reward_cli.main(args) == 2
    line = _one_error(capsys, "llamax-reward")
    assert "prompt 0: a prompt of" in line and "window of 256 tokens" in line, line

    # Existing outputs are refused first.
    (tmp_path / "report.json").write_text("{}")
    args = _round_args(tiny_lm, tiny_rm, _prompts(tmp_path), tmp_path / "round.jsonl",
                       "--report", str(tmp_path / "report.json"))  # fmt: skip
    assert reward_cli.main(args) == 2
    assert "--report" in _one_error(capsys, "llamax-reward")


@pytest.mark.slow
def test_sample_clamps_a_huge_batch_to_the_rounds_rows(tiny_lm, tiny_rm, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    out, same = tmp_path / "huge.jsonl", tmp_path / "six.jsonl"
    assert reward_cli.main([*_round_args(tiny_lm, tiny_rm, prompts, out),
                            "--batch-size", "1000000000"]) == 0  # fmt: skip
    # 3 prompts x 2 samples: 6 rows, the one call a batch of 6 makes too.
    assert reward_cli.main([*_round_args(tiny_lm, tiny_rm, prompts, same),
                            "--batch-size", "6"]) == 0  # fmt: skip
    assert out.read_text() == same.read_text() and len(out.read_text().splitlines()) == 3


# ----- the prompt's text -----


@pytest.mark.parametrize("flags", [["--prompt", "green \udcff"],
                                   ["--chat", "--prompt", "ok", "--system", "\udcff"]])  # fmt: skip
def test_a_prompt_that_is_not_utf8_is_one_error_line(tiny_lm, capsys, flags, no_model_load):
    assert generate_cli.main(["--checkpoint", tiny_lm, *flags]) == 2
    line = _one_error(capsys, "llamax-generate")
    flag = "--system" if "--system" in flags else "--prompt"
    assert f"{flag} is not valid UTF-8 text" in line and "'\\udcff'" in line, line


@pytest.mark.slow
def test_an_undecodable_byte_on_the_command_line_is_one_error_line(tiny_lm):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = run_cli("generate", b"--checkpoint", tiny_lm.encode(), b"--prompt", b"green \xff 3",
                   env=env, timeout=120, text=False)  # fmt: skip
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2, err
    assert "llamax-generate: error: --prompt is not valid UTF-8 text" in err
    assert "Traceback" not in err and "Unable to cast" not in err


# ----- chat answers end without the chat format's space -----


def test_chat_answers_are_stripped_of_the_space_before_eos(tiny_lm, tokenizer_path, capsys,
                                                          monkeypatch):  # fmt: skip
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("green 3 ", bos=False)
    assert tok.decode(ids) == "green 3 "  # what a chat model trained on Meta's format emits
    assert generation.answer_text(tok, ids) == "green 3"

    def answers(engine, prompts, sampling, eos_id=2, **kwargs):  # the model says ids, EOS
        return [inference.Completion([*ids, eos_id], np.zeros(len(ids) + 1), "eos")] * len(prompts)

    monkeypatch.setattr(inference.Engine, "generate", answers)
    args = ["--checkpoint", tiny_lm, "--prompt", "which colour?"]
    assert generate_cli.main([*args, "--chat"]) == 0
    assert capsys.readouterr().out == "green 3\n"
    assert generate_cli.main(args) == 0  # plain generation prints what the model produced
    assert capsys.readouterr().out == "green 3 \n"

    # Rejection sampling's responses too: the data written holds the answer alone.
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600)
    model = llamax.Llama(config)
    params = llamax.model.init_params(model, jax.random.key(0))
    samples = rejection.sample(model, params, tok, ["which colour?"], 2, batch_size=4)
    assert samples.texts == [["green 3", "green 3"]]


# ----- the training log -----


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _train_log(tmp_path, **overrides):
    from llamax import setup

    c = load_config("tiny", **{"train.steps": 10, **overrides})
    c.train.progress_bar = True
    s = setup.build(c, setup.make_mesh(c))
    return metrics.TrainLog(str(tmp_path / "run"), s, start_step=0)


def _step_metrics():
    return {k: jnp.asarray(1.0) for k in ("loss", "learning_rate", "grad_norm", "param_norm",
                                          "target_tokens")}  # fmt: skip


def test_the_progress_bar_times_from_the_end_of_the_compiling_step(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    train_log = _train_log(tmp_path)
    time.sleep(1.5)  # the first step compiles
    for step in (1, 2, 3):
        train_log.add(step, _step_metrics())
    bar = train_log.progress.format_dict
    assert bar["n"] == 3 and bar["total"] == 10
    assert bar["elapsed"] < 1.0, bar  # the compile is not counted in the rate nor the ETA
    train_log.close()

    # Off a terminal, no bar at all: the logged steps' plain lines only.
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    train_log = _train_log(tmp_path / "other")
    for step in (1, 2):
        train_log.add(step, _step_metrics())
    assert train_log.progress is None
    train_log.close()


@pytest.mark.slow
def test_a_training_log_file_holds_plain_lines(tmp_path):
    """llamax-train with its progress bar on (the default) and stderr a file: one line per
    logged step, no carriage return."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as f:
        done = run_cli("train", f"--config={REPO}/configs/tiny.py",
                       f"--workdir={tmp_path / 'run'}", "--config.train.steps=3",
                       "--config.train.log_every=1", "--config.train.eval_every=0",
                       env=env, stderr=f)  # fmt: skip
    text = log_file.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    assert re.findall(r"(?:^|\] )step (\d+): loss", text, re.M) == ["1", "2", "3"], text


def test_a_lora_run_logs_its_trainable_parameters_and_its_base(tmp_path, caplog, tiny_lm):
    overrides = {"model.vocab_size": 600, "lora.rank": 4, "lora.alpha": 8.0,
                 "lora.targets": "wq,wv,w2", "lora.base_dtype": "nf4"}  # fmt: skip
    caplog.set_level(logging.INFO, logger="llamax")
    from llamax import setup

    c = load_config("tiny", **overrides)
    c.init_from = tiny_lm
    train_log = metrics.TrainLog(str(tmp_path / "run"), setup.build(c, setup.make_mesh(c)), 0)
    train_log.close()
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600)
    d, q, kv, h = config.dim, config.n_heads * config.head_dim, config.kv_heads * config.head_dim, \
        config.hidden_dim  # fmt: skip
    adapters = config.n_layers * 4 * ((d + q) + (d + kv) + (h + d))  # r (in + out) each
    total = config.num_params() + adapters
    want = (f"LoRA: {adapters:,} trainable parameters ({adapters / total:.2%} of {total:,}: "
            f"{adapters:,} in the adapters); frozen base in nf4")  # fmt: skip
    assert want in caplog.messages, caplog.messages


# ----- sample --finetune --config.KEY=VALUE -----


def test_sample_finetune_takes_config_overrides(tiny_lm, tiny_rm, tmp_path, capsys,
                                               monkeypatch):  # fmt: skip
    from llamax import train

    config = tmp_path / "finetune.py"
    config.write_text(FINETUNE_CONFIG)
    prompts, out = _prompts(tmp_path), tmp_path / "round.jsonl"
    base = _round_args(tiny_lm, tiny_rm, prompts, out, "--finetune", str(config),
                       "--workdir", str(tmp_path / "w"))  # fmt: skip
    for more, problem in [
        (["--config.train.stepz=1"], "--config.train.stepz: no config key 'train.stepz'"),
        (["--config.train.steps=x"], "flag --config.train.steps=x: invalid literal for int()"),
        (["--config.init_from=/x"], "--config.init_from: the round sets it"),
    ]:  # fmt: skip
        assert reward_cli.main([*base, *more]) == 2
        assert problem in _one_error(capsys, "llamax-reward")
        assert not out.exists()
    with pytest.raises(SystemExit):  # overrides without --finetune: argparse's error
        reward_cli.main([*base[: base.index("--finetune")], "--config.train.steps=1"])
    assert "overrides go with sample --finetune" in capsys.readouterr().err

    trained = []
    monkeypatch.setattr(train, "run", lambda c, workdir: trained.append((c, workdir)))
    more = ["--config.train.steps=1", "--config.optimizer.learning_rate", "1e-4"]
    assert reward_cli.main([*base, *more]) == 0
    ((c, workdir),) = trained
    assert c.train.steps == 1 and c.optimizer.learning_rate == 1e-4
    assert c.init_from == tiny_lm and c.data.files == str(out) and workdir == str(tmp_path / "w")


# ----- JSON output never holds NaN -----


def test_json_outputs_are_strict(tmp_path):
    from llamax import evaluate, fs

    with pytest.raises(ValueError, match="not JSON compliant"):
        fs.write_json(str(tmp_path / "x.json"), {"score": float("nan")})
    assert not (tmp_path / "x.json").exists()
    results = {"results": [{"perplexity": float("inf")}, {"perplexity": 3.5}]}
    evaluate.write_json(str(tmp_path / "ppl.json"), results)
    text = (tmp_path / "ppl.json").read_text()
    assert json.loads(text) == {"results": [{"perplexity": None}, {"perplexity": 3.5}]}
    assert "Infinity" not in text and "NaN" not in text


def test_a_reward_model_giving_nan_scores_writes_nothing(tmp_path, tokenizer_path, capsys):
    """A reward model whose scores are NaN (its weights hold NaN): score and eval stop with
    one error line each and write no `"score": NaN`, which is not JSON."""
    from conftest import random_params, write_checkpoint

    config = llamax.LlamaConfig.preset("tiny", vocab_size=600, head="score")
    params = random_params(config, seed=3)
    params["score"] = params["score"] * float("nan")
    rm = write_checkpoint(str(tmp_path / "rm"), config, params, tokenizer_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "What is it?", "response": "green 3"}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "What is it?", "chosen": "green 3",
                                 "rejected": "no idea"}) + "\n")  # fmt: skip
    capsys.readouterr()
    code = reward_cli.main(["score", "--checkpoint", rm, "--input", str(answers), "--output",
                            str(tmp_path / "scored.jsonl")])  # fmt: skip
    assert code == 2 and "non-finite score" in _one_error(capsys, "llamax-reward")
    code = reward_cli.main(["eval", "--checkpoint", rm, "--pairs", str(pairs), "--output",
                            str(tmp_path / "eval")])  # fmt: skip
    assert code == 2 and "non-finite scores to 1 of 1 pairs" in _one_error(capsys, "llamax-reward")
    assert not (tmp_path / "scored.jsonl").exists() and not (tmp_path / "eval").exists()


# ----- one set of model and sampling flags, one config loader -----


@pytest.mark.parametrize("argv, problem", [
    (["eval", "perplexity", "--lengths", "16", "--output", "x", "--batch-size", "0"],
     "argument --batch-size: must be a positive integer, got '0'"),
    (["reward", "score", "--input", "x", "--output", "y", "--batch-size", "-3"],
     "argument --batch-size: must be a positive integer, got '-3'"),
    (["reward", "sample", "--policy", "p", "--prompts", "x", "--output", "y", "--batch-size",
      "x"], "argument --batch-size: must be a positive integer, got 'x'"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be a positive integer, got 0"),
    (["reward", "sample", "--policy", "p", "--prompts", "x", "--output", "y", "--top-p", "2"],
     r"--top-p must lie in (0, 1], got 2.0"),
])  # fmt: skip
def test_the_commands_share_their_model_and_sampling_flags(argv, problem, capsys,
                                                           no_model_load):  # fmt: skip
    from llamax.cli import eval as eval_cli

    main = {"eval": eval_cli.main, "reward": reward_cli.main, "generate": generate_cli.main}
    with pytest.raises(SystemExit) as e:
        main[argv[0]]([*argv[1:], "--checkpoint", "ckpt"])
    assert e.value.code == 2 and problem in capsys.readouterr().err


def test_one_config_loader_reads_config_files_as_llamax_train_does(tmp_path):
    """`CONFIG.py:ARG` passes ARG to get_config, the config is locked, and overrides are typed
    as their keys; a missing file, a file that fails, an unknown key and a bad value are
    each one error naming it."""
    from llamax.cli import load_config

    path = tmp_path / "finetune.py"
    path.write_text(FINETUNE_CONFIG.replace("def get_config():", "def get_config(steps='2'):")
                    .replace("= 2, 8, 128", "= int(steps), 8, 128"))  # fmt: skip
    assert load_config(str(path)).train.steps == 2
    c = load_config(f"{path}:5", ["--config.optimizer.learning_rate", "1e-4",
                                  "--config.train.seq_len=64"])  # fmt: skip
    assert (c.train.steps, c.optimizer.learning_rate, c.train.seq_len) == (5, 1e-4, 64)
    with pytest.raises(AttributeError):
        c.train.stepz = 1  # locked, as llamax-train's
    for spec, overrides, error, problem in [
        (str(tmp_path / "nope.py"), [], FileNotFoundError, "--finetune: no config file"),
        (str(path), ["--config.train.stepz=1"], ValueError,
         "--config.train.stepz: no config key 'train.stepz' in --finetune"),
        (str(path), ["--config.train.steps=x"], ValueError,
         "flag --config.train.steps=x: invalid literal for int()"),
        (f"{path}:x", [], ValueError, "cannot load the config file"),
    ]:  # fmt: skip
        with pytest.raises(error, match=re.escape(problem)):
            load_config(spec, overrides, "--finetune")
