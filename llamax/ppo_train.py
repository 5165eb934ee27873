"""PPO's trainer (`llamax-train` with `task = "ppo"`): Llama 2-Chat's RLHF (Touvron et al. 2023,
section 3.2.3), an iteration a step:

1. `ppo.rollouts` prompts (`data.source = "prompts"`, `llamax.data.prompts`) answered by the
   policy through the inference engine (`llamax.inference.Engine`) on the training mesh, its
   weights laid out for decoding once per iteration (a copy of the policy, sharded as training
   shards it: no gathered copy per host, unlike Meta's), sampled at `ppo.temperature`;
2. the rollouts scored in the training layout, `train.batch_size` rows a forward: the policy's
   and the reference's log-probabilities of the response, the value model's values, each
   reward model's score at the response's last token; the score of the reward model Llama 2's
   rule chooses (`llamax.ppo.combine_scores`: the safety model on a safety prompt or below
   `ppo.safety_threshold`), whitened over the iteration's rollouts, then the KL-penalized
   rewards, GAE's advantages (whitened) and returns (`llamax.ppo`);
3. `ppo.epochs` passes over the rollouts in shuffled minibatches of `train.batch_size` rows,
   each one update of the policy (the `ppo` task's clipped surrogate) and one of the value
   model (`ppo_value`'s clipped value loss), each by the shared train step.

The loop around it is `llamax.loop.Loop`'s (the workdir and its lock, checkpoints with the
value model's state beside the policy's and the prompt position, resume, metrics, preemption):
an iteration killed at any point resumes to the same result, since every random choice
(rollout sampling, minibatch order) derives from `train.seed` and the iteration's number.
Every `train.eval_every` iterations the greedy answers to `ppo.eval_prompts` held-out prompts
are scored (`eval_reward`), and after `ppo.patience` evaluations without a better one the run
stops early, saved. The policy's checkpoints are a language model's, read as any other
(`llamax-generate`, `llamax-convert`, `init_from`).

One process for now (any number of its devices): the engine's host loop reads rows only this
process holds.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llamax import data as data_lib
from llamax import experiment, fs, loop, lora, losses, ppo, pretrained, setup, sharding
from llamax.data.tokenizer import Tokenizer
from llamax.inference import MAX_SEED, Engine, SamplingConfig
from llamax.model import Llama
from llamax.step import TrainState
from llamax.tasks import ppo as ppo_tasks

log = logging.getLogger("llamax")


def value_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The value model's run config: `c` with task `ppo_value`, started from `ppo.value_from`
    (default: the helpfulness reward model) with that checkpoint's architecture; its LoRA
    settings, optimizer and batches the policy's."""
    v = c.copy_and_resolve_references()
    start = c.ppo.value_from or c.ppo.helpful_rm
    config = pretrained.read_model_config(start)
    with v.unlocked():
        v.task = ppo_tasks.VALUE.name
        v.init_from = start
        for name, value in config.to_dict().items():
            if name == "rope_scaling":
                for key in v.model.rope_scaling:
                    v.model.rope_scaling[key] = (value or {}).get(key)
            elif name in v.model:
                v.model[name] = value
        v.model.head = "score"
    return v


def check_models(c: ml_collections.ConfigDict) -> None:
    """The reward models and the value model read the policy's tokens: their vocabularies
    hold the data's ids and their recorded tokenizer (a run's `tokenizer.model`) is the
    data's."""
    ours = fs.expand(c.data.tokenizer)
    vocab = Tokenizer(ours).vocab_size
    for key in ("ppo.helpful_rm", "ppo.safety_rm", "ppo.value_from"):
        path = c.ppo[key.rpartition(".")[2]]
        if not path:
            continue
        config = pretrained.read_model_config(path)
        if config.vocab_size < vocab:
            raise ValueError(
                f"{key} {path} has {config.vocab_size} ids, fewer than the "
                f"tokenizer's {vocab}: it was trained with another tokenizer"
            )
        theirs = fs.join(fs.expand(path), "tokenizer.model")
        if fs.exists(theirs) and fs.sha256(theirs) != fs.sha256(ours):
            raise ValueError(
                f"{key} {path} was trained with another tokenizer ({theirs} differs "
                f"from data.tokenizer {ours}): it would read other ids"
            )
    if jax.process_count() > 1:
        raise ValueError("task 'ppo' runs on one process (any number of its devices) for now")


def run(c: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains the policy for `c.train.steps` iterations (fewer when early stopping ends the
    run), resuming the workdir's run if it has one; returns the policy's final state."""
    c = experiment.resolve_task(c)
    t, p = c.train, c.ppo
    with loop.Loop(c, workdir) as lp:
        mesh = setup.make_mesh(c, devices)
        policy = setup.build(c, mesh)
        value = setup.build(value_config(c), mesh)
        loop.check_data(c, policy, workdir)
        check_models(c)
        prompt_len = t.seq_len - p.max_new_tokens
        prompts = data_lib.prompt_stream(c.data, "train", prompt_len)
        it = Iteration(c, policy, value)
        held_out = None
        if t.eval_every > 0 and p.eval_prompts > 0:
            held = data_lib.prompt_stream(c.data, "validation", prompt_len).take(p.eval_prompts)
            held_out = HeldOutReward(it, held)
        state = lp.start(
            policy,
            prompts,
            evaluate=held_out,
            tokens_per_step=p.rollouts * t.seq_len,
            others={"value": value},
        )
        value_state = lp.others["value"]
        for step in lp.steps():
            state, value_state, metrics = it(step, state, value_state, prompts.take(p.rollouts))
            lp.step_done(step, state, metrics, others={"value": value_state})
            if held_out is not None and held_out.exhausted(p.patience):
                lp.stop_early(step, state, {"value": value_state}, held_out.why(p.patience))
                break
    return state


class Iteration:
    """One PPO iteration (the module's docstring): `it(step, policy_state, value_state,
    prompts)` -> (the new states, the iteration's metrics)."""

    def __init__(self, c: ml_collections.ConfigDict, policy: setup.Setup, value: setup.Setup):
        self.c, self.policy, self.value = c, policy, value
        self.tokenizer = Tokenizer(fs.expand(c.data.tokenizer))
        mesh = policy.mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        plain = policy.model.execution.replace(weight_quantization="none")
        self.reward_models = {
            name: Llama(b.config, plain) for name, b in policy.task.beside(c).items() if b.config
        }
        rows = policy.batch_shardings["tokens"]

        def logprobs(params, batch, model):  # as the policy's loss computes them
            targets, _ = losses.next_targets(batch["tokens"], batch["segment_ids"])
            nll, _ = losses.model_nll(params, model, batch, targets)
            return -nll

        def scores(params, batch, model):
            return model.apply(
                {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
            )

        batch_in = {k: rows for k in ("tokens", "segment_ids", "positions")}

        def jitted(f, model, params):
            return jax.jit(
                partial(f, model=model), in_shardings=(params, batch_in), out_shardings=replicated
            )

        self._policy_logprobs = jitted(logprobs, policy.model, _full_shardings(policy))
        beside = policy.shardings.beside
        if "reference" in beside:
            self._reference_logprobs = jitted(
                logprobs, Llama(policy.model.config, plain), beside["reference"]
            )
        self._values = jitted(scores, value.model, _full_shardings(value))
        self._scores = {
            name: jitted(scores, m, beside[name]) for name, m in self.reward_models.items()
        }

    # ----- 1. rollouts -----

    def engine(self, state: TrainState) -> Engine:
        """The policy's weights laid out for decoding (a copy, on the training mesh)."""
        return Engine(self.policy.model, self.policy.full_params(state), self.policy.mesh)

    def sampling(self, step: int, greedy: bool = False) -> SamplingConfig:
        p = self.c.ppo
        seed = (self.c.train.seed * 1_000_003 + step) % MAX_SEED  # the iteration's own
        return SamplingConfig(
            max_new_tokens=p.max_new_tokens,
            temperature=0.0 if greedy else p.temperature,
            top_p=p.top_p,
            seed=seed,
        )

    def rows(self, prompts, completions) -> dict[str, np.ndarray]:
        """The rollouts as rows of prompt and response: tokens, segment ids, positions, and
        `actions` 1 at each position that predicts a response token."""
        n, length = len(prompts), self.c.train.seq_len
        out = {
            k: np.zeros((n, length), np.int32)
            for k in ("tokens", "segment_ids", "positions", "actions")
        }
        for r, (prompt, done) in enumerate(zip(prompts, completions, strict=True)):
            ids = [*prompt.tokens, *done.tokens]
            out["tokens"][r, : len(ids)] = ids
            out["segment_ids"][r, : len(ids)] = 1
            out["positions"][r, : len(ids)] = np.arange(len(ids))
            out["actions"][r, len(prompt.tokens) - 1 : len(ids) - 1] = 1
        return out

    # ----- 2. scores -----

    def _forward(self, f, params, rows) -> np.ndarray:
        """`f` over the rollout rows, `train.batch_size` rows a call (the last call's padded
        with empty rows): [rows, seq_len]."""
        b, length, n = self.c.train.batch_size, self.c.train.seq_len, len(rows["tokens"])
        local, out = self.policy.local_rows(), []
        for start in range(0, n, b):
            batch = {}
            for k in ("tokens", "segment_ids", "positions"):
                chunk = np.zeros((b, length), np.int32)
                part = rows[k][start : start + b]
                chunk[: len(part)] = part
                batch[k] = jax.make_array_from_process_local_data(
                    self.policy.batch_shardings["tokens"], chunk[local], (b, length)
                )
            out.append(np.asarray(f(params, batch))[: min(b, n - start)])
        return np.concatenate(out)

    def last_scores(self, state: TrainState, rows) -> dict[str, np.ndarray]:
        """Each reward model's raw score of each row at its response's last token."""
        last = np.asarray(ppo.last_action(rows["actions"]))
        at = np.argmax(last, axis=1) + 1  # the position of the response's last token
        out = {}
        for name, f in self._scores.items():
            per_position = self._forward(f, state.beside[name], rows)
            out[name] = per_position[np.arange(len(at)), at]
        return out

    def reference_logprobs(self, state: TrainState, rows) -> np.ndarray:
        if "reference" in state.beside:
            return self._forward(self._reference_logprobs, state.beside["reference"], rows)
        # LoRA: the base, every adapter at zero
        base, adapters = lora.split(self.policy.full_params(state))
        base = lora.combine(base, jax.tree.map(jnp.zeros_like, adapters))
        return self._forward(self._policy_logprobs, base, rows)

    def score(self, state: TrainState, value_state: TrainState, prompts, rows) -> dict:
        """The rollouts' per-action arrays and per-row scores (host arrays)."""
        p = self.c.ppo
        scores = self.last_scores(state, rows)
        is_safety = np.array([x.is_safety for x in prompts])
        chosen, used_safety = ppo.combine_scores(
            scores["helpful"], scores.get("safety"), is_safety, p.safety_threshold
        )
        value_params = self.value.full_params(value_state)
        out = {
            "old_logprobs": self._forward(
                self._policy_logprobs, self.policy.full_params(state), rows
            ),
            "reference_logprobs": self.reference_logprobs(state, rows),
            "old_values": self._forward(self._values, value_params, rows),
            "scores": {**scores, "chosen": np.asarray(chosen)},
            "used_safety": np.asarray(used_safety),
        }
        mask = rows["actions"].astype(bool)
        rewards, kl = ppo.kl_rewards(
            ppo.whiten(chosen), out["old_logprobs"], out["reference_logprobs"], mask, p.kl_beta
        )
        adv, returns = ppo.advantages(rewards, out["old_values"], mask, p.gamma, p.lam)
        out.update(advantages=np.asarray(adv), returns=np.asarray(returns), kl=np.asarray(kl))
        return out

    # ----- 3. updates -----

    def __call__(self, step: int, state: TrainState, value_state: TrainState, prompts):
        start = time.perf_counter()
        engine = self.engine(state)
        completions = engine.generate(
            [x.tokens for x in prompts],
            self.sampling(step),
            eos_id=self.tokenizer.eos_id,
            slots=self.c.ppo.rollout_slots or None,
        )
        del engine
        rows = self.rows(prompts, completions)
        with sharding.use_mesh(self.policy.mesh):
            scored = self.score(state, value_state, prompts, rows)
            rollout_seconds = time.perf_counter() - start
            state, value_state, metrics = self.update(step, state, value_state, rows, scored)
        metrics.update(self.rollout_metrics(rows, scored, completions))
        metrics.update(rollout_seconds=rollout_seconds)
        return state, value_state, metrics

    def update(self, step: int, state: TrainState, value_state: TrainState, rows, scored):
        """`ppo.epochs` passes over the rollouts in shuffled minibatches, each an update of the
        policy and of the value model: (the new states, their mean step metrics)."""
        p, t = self.c.ppo, self.c.train
        start = time.perf_counter()
        fields = {
            **rows,
            **{k: scored[k] for k in ("old_logprobs", "advantages", "old_values", "returns")},
        }
        policy_metrics, value_metrics = [], []
        local = self.policy.local_rows()
        for epoch in range(p.epochs):
            order = np.random.default_rng([t.seed, step, epoch]).permutation(p.rollouts)
            for first in range(0, p.rollouts, t.batch_size):
                pick = order[first : first + t.batch_size][local]
                state, m = self.policy.train_step(
                    state,
                    self.policy.global_batch({k: fields[k][pick] for k in self.policy.fields}),
                )
                value_state, v = self.value.train_step(
                    value_state,
                    self.value.global_batch({k: fields[k][pick] for k in self.value.fields}),
                )
                policy_metrics.append(m)
                value_metrics.append(v)
        jax.block_until_ready((policy_metrics, value_metrics))
        update_seconds = time.perf_counter() - start
        metrics = _mean(policy_metrics)
        value_m = _mean(value_metrics)
        metrics.update(
            value_loss=value_m["loss"],
            value_grad_norm=value_m["grad_norm"],
            value_clip_fraction=value_m["value_clip_fraction"],
        )
        metrics["update_seconds"] = update_seconds
        return state, value_state, metrics

    def rollout_metrics(self, rows, scored, completions) -> dict[str, float]:
        """What the rollouts say: the chosen and each reward model's mean raw score, the
        safety model's share, the KL to the reference (summed over a response, mean over
        responses), the policy's entropy (estimated by the sampled tokens' mean negative
        log-probability, unbiased at temperature 1), the value model's explained variance,
        the responses' mean length and the share that ended with EOS."""
        mask = rows["actions"].astype(bool)
        s = scored["scores"]
        out = {
            "reward": float(s["chosen"].mean()),
            "reward_helpful": float(s["helpful"].mean()),
            "kl": float(scored["kl"].sum(1).mean()),
            "entropy": float(-scored["old_logprobs"][mask].mean()),
            "explained_variance": float(
                ppo.explained_variance(scored["old_values"], scored["returns"], mask)
            ),
            "response_length": float(mask.sum(1).mean()),
            "eos_share": float(np.mean([c.stop == "eos" for c in completions])),
        }
        if "safety" in s:
            out.update(
                reward_safety=float(s["safety"].mean()),
                safety_share=float(scored["used_safety"].mean()),
            )
        return out


def _full_shardings(s: setup.Setup):
    """The shardings of every parameter of a setup's model (LoRA's adapters with the base)."""
    sh = s.shardings
    return sh.params if sh.frozen is None else lora.combine(sh.frozen, sh.params)


def _mean(step_metrics: list[dict]) -> dict:
    """The mean of each metric over an iteration's updates (device values)."""
    return {k: jnp.mean(jnp.stack([m[k] for m in step_metrics])) for k in step_metrics[0]}


class HeldOutReward:
    """The mean chosen reward of greedy answers to the held-out prompts (`eval_reward`), and
    its safety model's share, at each evaluation; `exhausted` after `patience` evaluations
    without a better one."""

    def __init__(self, it: Iteration, prompts):
        self.it, self.prompts = it, prompts
        self.best, self.best_step, self.since_best = None, None, 0

    def __call__(self, state: TrainState) -> dict[str, float]:
        it = self.it
        engine = it.engine(state)
        step = int(jax.device_get(state.step))
        completions = engine.generate(
            [x.tokens for x in self.prompts],
            it.sampling(0, greedy=True),
            eos_id=it.tokenizer.eos_id,
            slots=it.c.ppo.rollout_slots or None,
        )
        del engine
        rows = it.rows(self.prompts, completions)
        with sharding.use_mesh(it.policy.mesh):
            scores = it.last_scores(state, rows)
        chosen, used = ppo.combine_scores(
            scores["helpful"],
            scores.get("safety"),
            np.array([x.is_safety for x in self.prompts]),
            it.c.ppo.safety_threshold,
        )
        reward = float(np.mean(chosen))
        if self.best is None or reward > self.best:
            self.best, self.best_step, self.since_best = reward, step, 0
        else:
            self.since_best += 1
        out = {"eval_reward": reward}
        if "safety" in scores:
            out["eval_safety_share"] = float(np.mean(used))
        return out

    def exhausted(self, patience: int) -> bool:
        return bool(patience) and self.since_best >= patience

    def why(self, patience: int) -> str:
        return (
            f"early stopping: {patience} evaluations without a held-out reward above "
            f"{self.best:.4f} (the policy after {self.best_step} updates)"
        )
