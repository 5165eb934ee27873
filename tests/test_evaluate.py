"""Long-context evaluation: windows, perplexity against transformers, passkey prompts and
scoring, and `llamax-eval` on a converted checkpoint."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_model, llamax_params_from

import llamax
from llamax import convert, evaluate
from llamax.cli import eval as eval_cli
from llamax.data.tokenizer import Tokenizer


@pytest.mark.parametrize(
    "n, length, stride", [(100, 16, 16), (100, 16, 5), (57, 10, 1), (33, 8, 7)]
)
def test_windows_score_each_token_once(n, length, stride):
    scored = []
    for start, first in evaluate.windows(n, length, stride):
        assert start + length <= n
        scored += [start + i + 1 for i in range(first, length - 1)]  # predicted token indices
    assert len(scored) == len(set(scored))  # never twice
    end = max(scored) + 1
    if stride < length:  # overlapping windows leave no token after the first one out
        assert sorted(scored) == list(range(1, end))
    else:  # disjoint windows cannot predict the first token of each
        assert set(range(1, end)) - set(scored) == set(range(length, end, length))


def test_window_errors():
    with pytest.raises(ValueError, match="cannot fill one window"):
        evaluate.windows(10, 16, 16)
    with pytest.raises(ValueError, match="stride must be"):
        evaluate.windows(100, 16, 17)


@pytest.mark.parametrize("stride", [None, 6])
def test_perplexity_equals_transformers(stride, rng):
    """The same windows scored by transformers' LlamaForCausalLM (PyTorch) in numpy."""
    config = llamax.LlamaConfig.preset("tiny")
    hf = hf_model(config, weight_std=0.05)
    params = llamax_params_from(hf, config)
    stream = rng.integers(0, config.vocab_size, 70).astype(np.int32)
    length = 16
    ours = evaluate.perplexity(llamax.Llama(config), params, stream, length, stride, batch_size=3)

    nll, count = 0.0, 0
    for start, first in evaluate.windows(len(stream), length, stride or length):
        window = torch.as_tensor(stream[start : start + length][None], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(hf(window).logits[0, :-1].double(), -1).numpy()
        targets = stream[start + 1 : start + length]
        nll -= sum(logp[i, targets[i]] for i in range(first, length - 1))
        count += length - 1 - first
    assert ours["tokens_scored"] == count
    assert math.isclose(ours["perplexity"], math.exp(nll / count), rel_tol=1e-5)


def test_uniform_model_has_perplexity_vocab_size(rng):
    config = llamax.LlamaConfig.preset("tiny")
    params = llamax.model.init_params(llamax.Llama(config), jax.random.key(0))
    params["output"] = jnp.zeros_like(params["output"])  # every logit 0: uniform predictions
    stream = rng.integers(0, config.vocab_size, 50).astype(np.int32)
    result = evaluate.perplexity(llamax.Llama(config), params, stream, 16)
    assert math.isclose(result["perplexity"], config.vocab_size, rel_tol=1e-5)


def test_a_batch_larger_than_the_windows_is_clamped_and_memory_is_checked(rng, monkeypatch):
    config = llamax.LlamaConfig.preset("tiny")
    params = llamax.model.init_params(llamax.Llama(config), jax.random.key(0))
    stream = rng.integers(0, config.vocab_size, 70).astype(np.int32)
    model = llamax.Llama(config)
    one = evaluate.perplexity(model, params, stream, 16, batch_size=1)
    huge = evaluate.perplexity(model, params, stream, 16, batch_size=10**9)
    assert math.isclose(huge["perplexity"], one["perplexity"], rel_tol=1e-5)
    assert huge["windows"] == one["windows"] == 4

    from llamax import inference

    monkeypatch.setattr(inference, "available_memory", lambda host=False: (1000, "the test's"))
    with pytest.raises(
        ValueError,
        match=r"perplexity at 16 tokens, 4 windows a call needs "
        r"about .* more than the test's \(1,000 bytes\): lower --batch-size",
    ):
        evaluate.perplexity(model, params, stream, 16, batch_size=10**9)


def test_passkey_prompt(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    filler = tokenizer.encode(evaluate.FILLER, bos=False)
    needle = tokenizer.encode(evaluate.NEEDLE.format(key=12345), bos=False)
    intro = tokenizer.encode(evaluate.INTRO, bos=False)
    for length in (400, 1000):
        for depth in (0.0, 0.5, 1.0):
            prompt, answer = evaluate.passkey_prompt(tokenizer, length, depth, 12345)
            assert length - len(filler) < len(prompt) + len(answer) <= length
            assert tokenizer.decode(answer) == "12345" and prompt[0] == tokenizer.bos_id
            start = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
            repeats = (start - 1 - len(intro)) // len(filler)
            total = (len(prompt) - len(intro) - len(needle) - 1) // len(filler)
            assert repeats == round(total * depth)
    with pytest.raises(ValueError, match="too short"):
        evaluate.passkey_prompt(tokenizer, 40, 0.5, 12345)


def test_passkey_scores_exactly_the_answer_tokens(tokenizer_path):
    """A trial is right when greedy decoding gives the answer: the engine's greedy flags at
    the answer tokens' predictions, not one before nor after."""
    tokenizer = Tokenizer(tokenizer_path)
    prompt, answer = evaluate.passkey_prompt(tokenizer, 400, 0.5, 54321)
    n = len(prompt) + len(answer)

    def right(wrong):  # every prediction greedy but those of the tokens at `wrong`
        greedy = np.ones(n, bool)  # a sequence with one more token after the answer
        greedy[[w - 1 for w in wrong]] = False
        return evaluate.answer_right(greedy, len(prompt), len(answer))

    assert right([])
    assert right([len(prompt) - 1, n])  # the tokens just before and after the answer
    assert not right([len(prompt)])  # the answer's first token
    assert not right([n - 1])  # its last


def test_passkey_reads_the_models_greedy_predictions(tokenizer_path):
    """The scoring path's greedy flags are the argmax of a full forward at each prediction,
    so a passkey trial succeeds exactly when the model's greedy answer is the key."""
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600, max_seq_len=512)
    model = llamax.Llama(config)
    params = llamax.model.init_params(model, jax.random.key(0))
    tokenizer = Tokenizer(tokenizer_path)
    prompt, answer = evaluate.passkey_prompt(tokenizer, 400, 0.5, 54321)
    logits = model.apply({"params": params}, np.asarray([prompt]))[0, -1]
    first = int(jnp.argmax(logits))
    # The model's own greedy answer (its first token, and then whatever follows it) is a
    # hit; any other answer is a miss.
    engine = llamax.inference.Engine(model, params)
    (_, greedy), (_, other) = engine.greedy_logprobs([prompt + [first], prompt + [first + 1]])
    assert evaluate.answer_right(greedy, len(prompt), 1)
    assert not evaluate.answer_right(other, len(prompt), 1)


@pytest.mark.slow
def test_llamax_eval_on_a_converted_checkpoint(tmp_path, text_corpus, tokenizer_path):
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600, max_seq_len=64)
    model = hf_model(config, weight_std=0.05)
    model.save_pretrained(tmp_path / "hf")
    convert.convert("hf", "llamax", str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                    tokenizer=tokenizer_path)  # fmt: skip
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "eval")
    files = os.path.join(text_corpus[0], "*.txt")
    args = ["--checkpoint", ckpt, "--lengths", "32,64,128", "--output", out]
    assert eval_cli.main(["perplexity", *args, "--text", files, "--batch-size", "2"]) == 0
    result = json.loads(open(os.path.join(out, "perplexity.json")).read())
    assert [r["length"] for r in result["results"]] == [32, 64, 128]
    assert all(1 < r["perplexity"] < math.inf for r in result["results"])
    assert os.path.getsize(os.path.join(out, "perplexity.png")) > 1000

    dynamic = ["--rope-scaling", '{"rope_type": "dynamic", "factor": 2}', "--trials", "2"]
    assert eval_cli.main(["passkey", *args[:3], "400,600", *args[4:], *dynamic]) == 0
    result = json.loads(open(os.path.join(out, "passkey.json")).read())
    assert set(result["accuracy"]) == {"400", "600"} and result["trials"] == 2
    depths = {"0.0", "0.25", "0.5", "0.75", "1.0"}  # the default depths, each over 2 keys
    assert all(set(row) == depths for row in result["accuracy"].values())
    assert all(a in (0.0, 0.5, 1.0) for row in result["accuracy"].values() for a in row.values())
    assert os.path.getsize(os.path.join(out, "passkey.png")) > 1000
    assert not [f for f in os.listdir(out) if ".tmp-" in f]

    assert eval_cli.main(["perplexity", *args, "--text", "nowhere/*.txt"]) == 2
    assert eval_cli.main(["perplexity", *args]) == 2  # no text given
