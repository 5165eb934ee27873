"""PPO's arithmetic (`llamax.ppo`) against a NumPy transcription of the formulas on random
inputs, against TRL's own PPO statements on identical inputs, and Llama 2's choice of reward
model by hand, the threshold's boundary included."""

import ast
import importlib.util
import math
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from llamax import ppo


def _rollouts(rng, rows=6, length=14):
    """Random per-action arrays and a mask of one contiguous response per row (a prompt
    before it, padding after it, a response of one action among them)."""
    mask = np.zeros((rows, length), bool)
    for r in range(rows):
        start = rng.integers(0, length // 2)
        end = start + 1 if r == 0 else rng.integers(start + 1, length + 1)
        mask[r, start:end] = True
    f = lambda: rng.normal(size=(rows, length)).astype(np.float32)  # noqa: E731
    return mask, f(), f(), f(), rng.normal(size=rows).astype(np.float32)


def _np_whiten(x, mask):
    v = x[mask]
    return (x - v.mean()) / math.sqrt(v.var(ddof=1) + 1e-8)


def _np_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for r in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[r])
        following = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[r, steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[r, t] + gamma * next_value - values[r, t]
            following = delta + gamma * lam * following
            adv[r, t] = following
    returns = np.where(mask, adv + values, 0.0)
    return np.where(mask, _np_whiten(adv, mask), 0.0), returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_rewards_advantages_and_losses_equal_the_formulas(gamma, lam):
    rng = np.random.default_rng(int(gamma * 10 + lam * 100))
    mask, logp, ref, values, scores = _rollouts(rng)
    beta, clip = 0.01, 0.2

    rewards, kl = ppo.kl_rewards(scores, logp, ref, mask, beta)
    want = np.where(mask, -beta * (logp - ref), 0.0)
    for r in range(mask.shape[0]):
        want[r, np.flatnonzero(mask[r])[-1]] += scores[r]
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kl, np.where(mask, logp - ref, 0.0), rtol=1e-6)

    adv, returns = ppo.advantages(rewards, values, mask, gamma, lam)
    want_adv, want_returns = _np_gae(np.asarray(rewards), values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-5)

    new = logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32)
    loss, count, sums = ppo.policy_loss(new, logp, want_adv, mask, clip)
    ratio = np.exp(new - logp)
    a = want_adv
    per = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip, 1 + clip))
    assert count == mask.sum()
    np.testing.assert_allclose(loss, per[mask].sum(), rtol=1e-5)
    clipped = (-a * np.clip(ratio, 1 - clip, 1 + clip)) > (-a * ratio)
    assert sums["clip_fraction"] == clipped[mask].sum()
    np.testing.assert_allclose(sums["approx_kl"], (0.5 * (new - logp) ** 2)[mask].sum(),
                               rtol=1e-5)  # fmt: skip

    predicted = values + rng.normal(scale=0.5, size=values.shape).astype(np.float32)
    loss, count, sums = ppo.value_loss(predicted, values, want_returns, mask, clip)
    v_clip = values + np.clip(predicted - values, -clip, clip)
    plain, clipped = (predicted - want_returns) ** 2, (v_clip - want_returns) ** 2
    np.testing.assert_allclose(loss, 0.5 * np.maximum(plain, clipped)[mask].sum(), rtol=1e-5)
    assert sums["value_clip_fraction"] == (clipped > plain)[mask].sum()

    r, v = want_returns[mask], values[mask]
    explained = 1 - np.var(r - v, ddof=1) / np.var(r, ddof=1)
    np.testing.assert_allclose(ppo.explained_variance(values, want_returns, mask), explained,
                               rtol=1e-5)  # fmt: skip
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(ppo.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_at_the_start_the_ratio_is_one_and_nothing_is_clipped():
    """Old and new log-probabilities the same (iteration 0): ratio exactly 1, the loss
    -mean(A), no clipping, approximate KL exactly 0."""
    rng = np.random.default_rng(0)
    mask, logp, _, _, _ = _rollouts(rng)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    loss, count, sums = ppo.policy_loss(logp, logp, adv, mask)
    np.testing.assert_allclose(loss, -adv[mask].sum(), rtol=1e-6)
    assert sums["clip_fraction"] == 0 and sums["approx_kl"] == 0
    rewards, kl = ppo.kl_rewards(np.zeros(mask.shape[0]), logp, logp, mask, 0.01)
    assert float(jnp.abs(kl).max()) == 0.0 and float(jnp.abs(rewards).max()) == 0.0


def test_the_safety_model_decides_on_safety_prompts_and_below_the_threshold():
    threshold = ppo.logit(0.15)
    helpful = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    safety = np.array([2.0, threshold - 1e-3, threshold, threshold + 1e-3, -5.0], np.float32)
    is_safety = np.array([True, False, False, False, False])
    chosen, used = ppo.combine_scores(helpful, safety, is_safety)
    # a safety prompt; below the threshold; at it and above it: helpfulness; far below
    np.testing.assert_array_equal(used, [True, True, False, False, True])
    np.testing.assert_allclose(chosen, [2.0, threshold - 1e-3, 3.0, 4.0, -5.0], rtol=1e-6)
    assert math.isclose(1 / (1 + math.exp(-threshold)), 0.15, rel_tol=1e-12)
    chosen, used = ppo.combine_scores(helpful)  # one reward model: helpfulness throughout
    np.testing.assert_array_equal(chosen, helpful)
    assert not np.asarray(used).any()
    x = np.array([3.0, -1.0, 2.0, 10.0], np.float32)
    np.testing.assert_allclose(ppo.whiten(x), (x - x.mean()) / x.std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(ppo.whiten(x, shift_mean=False),
                               (x - x.mean()) / x.std(ddof=1) + x.mean(), rtol=1e-5)  # fmt: skip


# ----- TRL's PPO (0.25, its last release with PPOTrainer) on the same inputs -----


def _trl_source() -> ast.Module:
    spec = importlib.util.find_spec("trl")  # found, not imported (TRL's imports are heavy)
    path = os.path.join(spec.submodule_search_locations[0], "trainer", "ppo_trainer.py")
    with open(path) as f:
        return ast.parse(f.read())


def _statements(tree: ast.AST, first: str, last: str) -> list[ast.stmt]:
    """The statements of the block (a body list inside `tree`) from the assignment of `first`
    to the last assignment of `last`, as TRL wrote them."""

    def assigns(node, name):
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        return any(isinstance(t, ast.Name) and t.id == name for t in targets if t is not None)

    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            starts = [i for i, s in enumerate(body) if assigns(s, first)]
            ends = [i for i, s in enumerate(body) if assigns(s, last)]
            if starts and ends:
                return body[starts[0] : ends[-1] + 1]
    raise AssertionError(f"TRL's PPO has no block from {first!r} to {last!r}")


def _run_trl(statements, namespace: dict) -> dict:
    exec(compile(ast.Module(statements, type_ignores=[]), "trl", "exec"), namespace)
    return namespace


def test_the_same_quantities_as_trls_ppo_on_identical_inputs():
    """Rollouts whose responses fill their window (where TRL's padding masks and llamax's
    mask agree): TRL's statements for the KL-penalized rewards, GAE, whitened advantages and
    returns, and for the clipped policy and value losses and their diagnostics, executed on
    the same arrays as `llamax.ppo`."""
    torch = pytest.importorskip("torch")
    tree = _trl_source()
    helpers = [n for n in tree.body if isinstance(n, ast.FunctionDef)
               and n.name in ("masked_mean", "masked_var", "masked_whiten")]  # fmt: skip
    train = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    rng = np.random.default_rng(7)
    rows, prompt, length = 8, 5, 12
    logp = -rng.gamma(2.0, 0.5, size=(rows, length)).astype(np.float32)
    ref = logp + rng.normal(scale=0.2, size=logp.shape).astype(np.float32)
    values = rng.normal(size=(rows, length)).astype(np.float32)
    scores = rng.normal(size=rows).astype(np.float32)
    args = types.SimpleNamespace(kl_estimator="k1", kl_coef=0.05, whiten_rewards=False, gamma=1.0,
                                 lam=0.95, cliprange=0.2, cliprange_value=0.2)  # fmt: skip
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    full = torch.full((rows,), length - 1)  # no pad token in any response
    ns = _run_trl(helpers, {"torch": torch})
    ns.update(args=args, logprobs=t(logp), ref_logprobs=t(ref), values=t(values),
              scores=t(scores), responses=torch.zeros(rows, length), sequence_lengths=full,
              sequence_lengths_p1=full + 1, padding_mask=torch.zeros(rows, length, dtype=bool),
              padding_mask_p1=torch.zeros(rows, length, dtype=bool))  # fmt: skip
    _run_trl(_statements(train, "logr", "advantages"), ns)

    # The same rollouts in llamax's layout: a row of prompt + response, actions at the
    # positions that predict the response's tokens.
    mask = np.zeros((rows, prompt + length), bool)
    mask[:, prompt - 1 : prompt - 1 + length] = True

    def wide(x):
        out = np.zeros(mask.shape, np.float32)
        out[mask] = np.asarray(x).reshape(-1)
        return out

    rewards, kl = ppo.kl_rewards(scores, wide(logp), wide(ref), mask, args.kl_coef)
    adv, returns = ppo.advantages(rewards, wide(values), mask, args.gamma, args.lam)
    np.testing.assert_allclose(np.asarray(rewards)[mask].reshape(rows, length), ns["rewards"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(kl)[mask].reshape(rows, length), ns["kl"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(adv)[mask].reshape(rows, length), ns["advantages"],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.asarray(returns)[mask].reshape(rows, length), ns["returns"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    # One minibatch of the update: new log-probabilities and values, TRL's loss statements.
    new_logp = logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32)
    vpred = values + rng.normal(scale=0.5, size=values.shape).astype(np.float32)
    logits = rng.normal(size=(rows, length, 9)).astype(np.float32)
    ns.update(new_logprobs=t(new_logp), vpred=t(vpred), mb_values=t(values),
              mb_return=ns["returns"], mb_logprobs=t(logp), mb_advantage=ns["advantages"],
              micro_batch_inds=np.arange(rows), logits=t(logits))  # fmt: skip
    _run_trl(_statements(train, "vpredclipped", "pg_loss"), ns)
    _run_trl(_statements(train, "pg_clipfrac", "approxkl"), ns)

    a = np.asarray(ns["advantages"], np.float32)
    loss, count, sums = ppo.policy_loss(wide(new_logp), wide(logp), wide(a), mask, args.cliprange)
    np.testing.assert_allclose(loss / count, float(ns["pg_loss"]), rtol=1e-5)
    np.testing.assert_allclose(sums["clip_fraction"] / count, float(ns["pg_clipfrac"]), rtol=1e-6)
    np.testing.assert_allclose(sums["approx_kl"] / count, float(ns["approxkl"]), rtol=1e-5)
    r = np.asarray(ns["returns"], np.float32)
    loss, count, sums = ppo.value_loss(wide(vpred), wide(values), wide(r), mask,
                                       args.cliprange_value)  # fmt: skip
    np.testing.assert_allclose(loss / count, float(ns["vf_loss"]), rtol=1e-5)
    np.testing.assert_allclose(sums["value_clip_fraction"] / count, float(ns["vf_clipfrac"]),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(ppo.entropy(logits), ns["entropy"], rtol=1e-5, atol=1e-6)


# ----- the trainer (llamax.ppo_train) on tiny models -----

# A constant learning rate: an iteration's updates do not depend on how many the run has.
PPO = {"task": "ppo", "data.source": "prompts", "model.vocab_size": 600, "train.seq_len": 48,
       "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 0,
       "checkpoint.every": 2, "ppo.rollouts": 16, "ppo.max_new_tokens": 6,
       "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 0,
       "optimizer.end_learning_rate_ratio": 1.0, "data.validation_fraction": 0.2}  # fmt: skip


@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory, tokenizer_path, tiny_lm, tiny_rm):
    """Prompts (a quarter of them safety prompts, and one bad line) and a second reward model
    (the safety one) beside the session's tiny policy and helpfulness reward model."""
    import json

    from conftest import WORDS, random_params, write_checkpoint

    import llamax

    root = tmp_path_factory.mktemp("ppo")
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600, head="score")
    safety = write_checkpoint(str(root / "safety"), config, random_params(config, seed=23),
                              tokenizer_path)  # fmt: skip
    rng = np.random.default_rng(0)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS[:30], 4)) + f" {i}?",
                         "is_safety": i % 4 == 0}) for i in range(60)]  # fmt: skip
    lines.insert(7, '{"prompt": 3}')
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return {"data.files": str(root / "prompts.jsonl"), "data.tokenizer": tokenizer_path,
            "ppo.helpful_rm": tiny_rm, "ppo.safety_rm": safety, "init_from": tiny_lm}  # fmt: skip


def _ppo_config(inputs, **overrides):
    from conftest import load_config

    return load_config("tiny", **{**PPO, **inputs, **overrides})


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_a_ppo_run_resumes_exactly_and_its_first_ratio_is_one(ppo_inputs, tmp_path):
    """4 iterations with the safety rule; stopped after the checkpoint of iteration 2 and
    rerun: the same metrics and the same policy and value model, bit for bit. At the start
    the policy is its reference: the KL is exactly 0 and the first minibatch's ratio exactly 1
    (no clipping, approximate KL 0)."""
    import shutil

    import jax

    from llamax import checkpoint, ppo_train, setup, sharding, train
    from llamax import state as state_lib
    from llamax.metrics import read_metrics

    c = _ppo_config(ppo_inputs, **{"train.steps": 4})
    workdir = str(tmp_path / "run")
    state = train.run(c, workdir)
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    assert first["kl"] == 0.0 and 0 < first["safety_share"] < 1
    assert all(np.isfinite(r["value_loss"]) and r["response_length"] > 0 for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert {"params", "opt_state", "value", "data", "meta"} <= set(
        os.listdir(os.path.join(workdir, "checkpoints", "4")))  # fmt: skip

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    again = train.run(c, resumed)
    keys = ("step", "loss", "grad_norm", "value_loss", "reward", "kl", "entropy")
    assert [[r[k] for k in keys] for r in read_metrics(resumed)] == [
        [r[k] for k in keys] for r in records]  # fmt: skip
    for a, b in zip(_leaves(again.params), _leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    value = ppo_train.value_config(c)
    vs = setup.build(value, setup.make_mesh(value))
    saved = [
        checkpoint.Checkpoints(os.path.join(w, "checkpoints"), others=("value",)).restore_other(
            4, "value", vs.abstract, vs.shardings)
        for w in (workdir, resumed)
    ]  # fmt: skip
    for a, b in zip(_leaves(saved[0].params), _leaves(saved[1].params), strict=True):
        np.testing.assert_array_equal(a, b)

    # The first minibatch of a new run: ratio exactly 1.
    s = setup.build(c, setup.make_mesh(c))
    start, vstart = state_lib.initial(s), state_lib.initial(vs)
    it = ppo_train.Iteration(c, s, vs)
    prompts = _prompts(c)
    engine = it.engine(start)
    done = engine.generate([x.tokens for x in prompts], it.sampling(1), eos_id=2)
    rows = it.rows(prompts, done)
    with sharding.use_mesh(s.mesh):
        scored = it.score(start, vstart, prompts, rows)
        assert np.abs(scored["kl"]).max() == 0.0
        fields = {**rows, **scored}
        batch = s.global_batch({k: fields[k][: c.train.batch_size] for k in s.fields})
        _, (_, count, sums) = jax.jit(s.task.loss(c), static_argnums=1)(
            s.full_params(start), s.model, batch)  # fmt: skip
    assert count > 0 and float(sums["approx_kl"]) == 0.0 and float(sums["clip_fraction"]) == 0.0


def _prompts(c):
    from llamax import data

    return data.prompt_stream(c.data, "train", c.train.seq_len - c.ppo.max_new_tokens).take(
        c.ppo.rollouts)  # fmt: skip


@pytest.mark.slow
def test_a_lora_ppo_run_leaves_its_base_and_trains_adapters_and_heads(ppo_inputs, tmp_path):
    """LoRA on the policy (its reference: the base with the adapters off) and on the value
    model (its score head trains beside the adapters): the bases stay bit-identical, the
    adapters move, the held-out reward is evaluated, and the checkpoint holds adapters only."""
    import jax

    from llamax import loading, lora, train
    from llamax.metrics import read_metrics

    c = _ppo_config(ppo_inputs, **{"train.steps": 2, "lora.rank": 4, "lora.base_dtype": "float32",
                                   "train.eval_every": 1, "ppo.eval_prompts": 4})  # fmt: skip
    state = train.run(c, str(tmp_path / "run"))
    _, base = loading.load_pretrained(ppo_inputs["init_from"])
    frozen, _ = lora.split(jax.tree.map(np.asarray, base))
    for a, b in zip(_leaves(state.frozen), _leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    adapters = [x for path, x in jax.tree_util.tree_leaves_with_path(state.params)
                if "lora_b" in jax.tree_util.keystr(path)]  # fmt: skip
    assert adapters and all(np.abs(np.asarray(x)).max() > 0 for x in adapters)
    records = read_metrics(str(tmp_path / "run"))
    assert all("eval_reward" in r and np.isfinite(r["eval_reward"]) for r in records)
    assert records[0]["kl"] == 0.0 and records[1]["kl"] != 0.0
    saved = os.listdir(os.path.join(tmp_path, "run", "checkpoints", "2", "params"))
    assert saved  # the adapters (a LoRA run's checkpoint), merged by llamax-convert


@pytest.mark.slow
def test_early_stopping_ends_the_run_saved(ppo_inputs, tmp_path, caplog):
    """With nothing learned (a learning rate of 1e-12, below float32's resolution) the
    held-out reward never beats its first value: with patience 1 the run stops after the
    second evaluation, its state saved."""
    from llamax import train
    from llamax.metrics import read_metrics

    c = _ppo_config(ppo_inputs, **{"train.steps": 5, "train.eval_every": 1, "ppo.patience": 1,
                                   "ppo.eval_prompts": 4, "optimizer.learning_rate": 1e-12,
                                   "checkpoint.every": 0})  # fmt: skip
    with caplog.at_level("INFO", logger="llamax"):
        train.run(c, str(tmp_path / "run"))
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2]
    assert os.listdir(os.path.join(tmp_path, "run", "checkpoints")) == ["2"]
    assert "stopped after step 2: early stopping: 1 evaluations" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [({"ppo.helpful_rm": ""}, "set ppo.helpful_rm"),
     ({"ppo.rollouts": 12}, "must be a multiple of train.batch_size"),
     ({"ppo.max_new_tokens": 48}, "leaves no room for a prompt"),
     ({"ppo.clip": 0}, "ppo.clip must be a number in (0, 1]"),
     ({"data.source": "chat"}, "task 'ppo' reads data.source 'prompts'"),
     ({"init_from": ""}, "set init_from")],
)  # fmt: skip
def test_bad_ppo_configs_are_refused_naming_the_key(ppo_inputs, overrides, message):
    from llamax import experiment

    with pytest.raises(ValueError) as e:
        experiment.check(_ppo_config(ppo_inputs, **overrides))
    assert message in str(e.value)


def test_a_language_model_is_no_reward_model_and_prompts_train_only_ppo(ppo_inputs, tmp_path):
    from llamax import train

    c = _ppo_config(ppo_inputs, **{"ppo.safety_rm": ppo_inputs["init_from"]})
    with pytest.raises(ValueError, match="ppo.safety_rm .* the 'lm' head, not a reward model"):
        train.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    c = _ppo_config(ppo_inputs, **{"task": "sft"})
    with pytest.raises(ValueError, match="task 'sft' reads data.source 'chat'"):
        train.run(c, str(tmp_path / "run"))


def test_prompts_are_shuffled_per_epoch_resumable_and_bad_ones_counted(ppo_inputs, caplog):
    """Each epoch a new order of every usable prompt; a stream set to a saved state draws
    what the original drew next; the bad record is skipped, counted and logged once."""
    from conftest import load_config

    from llamax import data

    c = load_config("tiny", **{**PPO, **ppo_inputs, "data.validation_fraction": 0.0})
    stream = data.prompt_stream(c.data, "train", 40)
    with caplog.at_level("WARNING", logger="llamax"):
        first = [p.index for p in stream.take(60)]
    assert sorted(first) == [i for i in range(61) if i != 7]  # the whole epoch, once
    assert stream.skipped == {"malformed": 1} and caplog.text.count("skipping") == 1
    state = stream.get_state()
    after = [p.index for p in stream.take(30)]
    assert after != first[:30]  # another order in the next epoch
    again = data.prompt_stream(c.data, "train", 40)
    again.set_state(state)
    assert [p.index for p in again.take(30)] == after
    safety = [p.is_safety for p in stream.take(60)]
    assert 0 < sum(safety) < len(safety)
