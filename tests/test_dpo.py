"""DPO as a training run: the objective on packed preference pairs equals the paper's formula
computed by hand on each response alone; at the reference the loss is log 2 and every margin
0; llamax-train runs it from a language model (full, and LoRA with the base as reference)."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import load_config, random_params

import llamax
from llamax import experiment, losses

CONFIG = llamax.LlamaConfig.preset("tiny", vocab_size=600)


def _pair(i):
    a, b = i % 7, (i * 3) % 5
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
            "rejected": ["I do not know.", "No idea, sorry."][i % 2]}  # fmt: skip


def _batch(tokenizer_path, n=8, rows=2, pairs_per_row=2):
    from llamax.data import preference

    records = [json.dumps(_pair(i)).encode() for i in range(n)]
    it = preference.make_dataset(records, tokenizer_path, 256, rows, 0, pairs_per_row=2)
    return {k: jax.numpy.asarray(v) for k, v in next(iter(it)).items()}


def _logp_alone(forward, params, tokens, mask):
    """log pi(response) of one sequence run alone (`forward`: the model's jitted apply, one
    compile per length), summed in float64 over its masked tokens."""
    logits = np.asarray(forward(params, tokens[None]), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return sum(logp[t - 1, tokens[t]] for t in range(1, len(tokens)) if mask[t])


def test_dpo_objective_equals_the_formula_on_each_response_alone(tokenizer_path):
    batch = _batch(tokenizer_path)
    model = llamax.Llama(CONFIG)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    policy, reference = random_params(CONFIG, seed=1), random_params(CONFIG, seed=2)
    beta = 0.3
    objective = jax.jit(lambda p, b, r: losses.dpo_objective(p, model, b, r, beta, 2))
    total, (_, count, sums) = objective(policy, batch, reference)
    want, pairs, right, margins = 0.0, 0, 0, 0.0
    seg, tok, mask = (np.asarray(batch[k]) for k in ("segment_ids", "tokens", "loss_mask"))
    for row in range(seg.shape[0]):
        for k in range(2):
            lp = {}
            for which, s in (("c", 2 * k + 1), ("r", 2 * k + 2)):
                where = seg[row] == s
                for name, p in (("pi", policy), ("ref", reference)):
                    lp[which, name] = _logp_alone(forward, p, tok[row][where], mask[row][where])
            margin = beta * ((lp["c", "pi"] - lp["c", "ref"]) - (lp["r", "pi"] - lp["r", "ref"]))
            want += math.log1p(math.exp(-margin))
            pairs, right, margins = pairs + 1, right + int(margin > 0), margins + margin
    assert count == pairs == 4
    np.testing.assert_allclose(total, want, rtol=1e-4)
    np.testing.assert_allclose(sums["reward_margin"], margins, rtol=1e-4, atol=1e-4)
    assert sums["reward_accuracy"] == right


def test_dpo_at_the_reference_is_log_2_with_zero_margins(tokenizer_path):
    batch = _batch(tokenizer_path)
    model, params = llamax.Llama(CONFIG), random_params(CONFIG, seed=3)
    total, (_, count, sums) = losses.dpo_objective(params, model, batch, params, 0.1, 2)
    np.testing.assert_allclose(total / count, math.log(2), rtol=1e-6)
    for name in ("reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy"):
        assert sums[name] == 0.0, name
    assert sums["chosen_logp"] < 0 and sums["rejected_logp"] < 0

    # The reference is not differentiated: the gradient is the policy's alone.
    def loss(reference):
        return losses.dpo_objective(params, model, batch, reference, 0.1, 2)[0]

    grad = jax.jit(jax.grad(loss))(params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad))


def test_dpo_needs_a_reference_and_a_start():
    with pytest.raises(ValueError, match="reference"):
        losses.dpo_objective({}, None, {}, None)
    c = load_config("tiny", **{"task": "dpo", "data.source": "preference"})
    with pytest.raises(ValueError, match="set init_from"):
        experiment.check(c)
    c.init_from, c.dpo.beta = "x", 0.0
    with pytest.raises(ValueError, match="dpo.beta"):
        experiment.check(c)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_dpo_trains_a_language_model_from_its_reference(tmp_path, tokenizer_path, tiny_lm, rank):
    """llamax-train on preference pairs with a language model: step 0's loss is log 2 with
    zero margins (the policy is the reference), then the chosen responses gain on the
    rejected ones; the reference stays the start (LoRA: the base, adapters off)."""
    from llamax import loading, train
    from llamax.metrics import read_metrics

    files = tmp_path / "pairs.jsonl"
    files.write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(200)))
    c = load_config("tiny", **{
        "task": "dpo", "model.vocab_size": 600, "data.source": "preference",
        "data.files": str(files), "data.tokenizer": tokenizer_path, "data.pairs_per_row": 2,
        "train.seq_len": 128, "train.steps": 6, "train.log_every": 1,
        "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 1, "dpo.beta": 0.5,
        "lora.rank": rank, "lora.alpha": 8.0, "lora.targets": "wq,wk,wv,wo,w1,w2,w3",
    })  # fmt: skip
    c.init_from = tiny_lm
    train.run(c, str(tmp_path / "dpo"))
    records = read_metrics(str(tmp_path / "dpo"))
    assert (tmp_path / "dpo" / "tokenizer.model").exists()  # for llamax-generate, -reward
    np.testing.assert_allclose(records[0]["loss"], math.log(2), atol=1e-5)
    assert abs(records[0]["reward_margin"]) < 1e-4
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert records[-1]["reward_margin"] > 0 and records[-1]["reward_accuracy"] > 0.5
    _, start = loading.load_pretrained(tiny_lm)
    _, trained = loading.load_pretrained(str(tmp_path / "dpo"))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         start, trained)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0


def test_accumulated_dpo_steps_equal_one_big_batch(tokenizer_path):
    """Gradient accumulation sums DPO's extra metrics with the loss: the same step on 2
    micro-batches as on one."""
    import optax

    from llamax import step

    batch = _batch(tokenizer_path, n=16, rows=4)
    model, params = llamax.Llama(CONFIG), random_params(CONFIG, seed=4)
    reference = random_params(CONFIG, seed=5)
    tx = optax.sgd(0.1)
    state = step.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                            opt_state=tx.init(params), beside={"reference": reference})  # fmt: skip
    loss_fn = lambda *a, **k: losses.dpo_objective(*a, beta=0.2, pairs_per_row=2, **k)  # noqa: E731
    train_step = jax.jit(step.train_step, static_argnames=("model", "tx", "schedule", "loss_fn",
                                                          "grad_accum_steps"))  # fmt: skip
    out = [train_step(state, batch, model=model, tx=tx, schedule=lambda _: 0.1,
                      loss_fn=loss_fn, grad_accum_steps=a) for a in (1, 2)]  # fmt: skip
    (one, m1), (two, m2) = out
    for name in ("loss", "grad_norm", "reward_accuracy", "reward_margin", "chosen_logp"):
        np.testing.assert_allclose(m1[name], m2[name], rtol=1e-4, err_msg=name)
    assert m1["target_tokens"] == 8 and float(m1["reward_margin"]) != 0.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one.params, two.params)
