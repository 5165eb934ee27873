"""`ppo` and `ppo_value`: the two models PPO trains (Llama 2-Chat's RLHF, section 3.2.3), each
a task whose train step is the shared one (`llamax.step.train_step`) on a minibatch of
rollouts; the iteration around them (rollouts, scores, advantages, the minibatches) is
`llamax.ppo_train`'s, the arithmetic `llamax.ppo`'s.

- `ppo`: the policy, a language model from `init_from`, on PPO's clipped surrogate. Beside it:
  the reference (a frozen copy of `init_from`, the pi_0 of the KL penalty; with LoRA none:
  the base with the adapters off) and the reward models (`ppo.helpful_rm`, and
  `ppo.safety_rm` when set), each read again at every start and known by its content.
- `ppo_value`: the value model, a score head at every position (a reward model's
  architecture), from `ppo.value_from` (default: the helpfulness reward model, as Stiennon
  et al. initialize it), on the clipped value loss.

A minibatch row is a prompt and its response (`Field`s per position: the tokens, `actions` 1
where the position predicts a response token, and the rollout's old log-probabilities and
advantages, or old values and returns).
"""

from __future__ import annotations

from functools import partial

import ml_collections

from llamax import losses, ppo, pretrained
from llamax.tasks.base import Beside, Field, Task, register

REFERENCE = Beside(
    key="init_from",
    meta="ppo_reference",
    what="PPO reference",
    rule="a run keeps the reference of its KL penalty",
)


def policy_objective(params, model, batch, clip: float = 0.2, rngs=None, **beside):
    """PPO's clipped surrogate on a minibatch (`llamax.ppo.policy_loss`), the log-probabilities
    from the model's chunked cross-entropy (never the logits whole); the models beside (the
    reference, the reward models) are not used by the update."""
    targets, _ = losses.next_targets(batch["tokens"], batch["segment_ids"])
    nll, _ = losses.model_nll(params, model, batch, targets, rngs)
    total, count, sums = ppo.policy_loss(
        -nll, batch["old_logprobs"], batch["advantages"], batch["actions"], clip
    )
    return total, (total, count, sums)


def value_objective(params, model, batch, clip: float = 0.2, rngs=None):
    """The clipped value loss on a minibatch (`llamax.ppo.value_loss`): the score head's
    output at each position is the value of the state after the tokens up to it."""
    values = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], rngs=rngs
    )
    total, count, sums = ppo.value_loss(
        values, batch["old_values"], batch["returns"], batch["actions"], clip
    )
    return total, (total, count, sums)


def reward_model(c: ml_collections.ConfigDict, key: str, what: str) -> Beside:
    """The reward model at config key `key` ("ppo.helpful_rm"), its architecture read from
    its checkpoint; one that is not a reward model (a score head) is a `ValueError`."""
    path = Beside(key, "", "", "").path(c)
    config = pretrained.read_model_config(path)
    if config.head != "score":
        raise ValueError(
            f"{key} {path} is a model with the {config.head!r} head, not a reward "
            "model (a score head: a run of task 'reward')"
        )
    return Beside(
        key=key,
        meta=f"ppo_{key.rpartition('.')[2]}",
        what=what,
        config=config,
        rule="a run keeps the reward models it started with",
    )


def updates_per_iteration(c: ml_collections.ConfigDict) -> int:
    """The optimizer steps of an iteration: one per minibatch (`train.batch_size` of the
    `ppo.rollouts`) and epoch."""
    return max(c.ppo.rollouts // c.train.batch_size, 1) * c.ppo.epochs


def _checked(c: ml_collections.ConfigDict) -> list[str]:
    """The problems of the `ppo` section (both tasks read it)."""
    p, errors = c.ppo, []

    def number(key, low, high, low_open=False):
        value = p[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (low < value if low_open else low <= value) and value <= high
        if not ok:
            bound = "(" if low_open else "["
            errors.append(f"ppo.{key} must be a number in {bound}{low}, {high}], got {value!r}")

    def integer(key, least):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            errors.append(f"ppo.{key} must be an integer >= {least}, got {value!r}")

    if not p.helpful_rm:
        errors.append("task 'ppo' scores its rollouts with a reward model: set ppo.helpful_rm")
    number("kl_beta", 0, float("inf"))
    number("clip", 0, 1, low_open=True)
    number("value_clip", 0, float("inf"), low_open=True)
    number("gamma", 0, 1)
    number("lam", 0, 1)
    number("safety_threshold", 0, 1, low_open=True)
    number("temperature", 0, float("inf"), low_open=True)
    number("top_p", 0, 1, low_open=True)
    for key, least in (
        ("rollouts", 1),
        ("rollout_slots", 0),
        ("epochs", 1),
        ("max_new_tokens", 1),
        ("eval_prompts", 0),
        ("patience", 0),
    ):
        integer(key, least)
    if not errors:
        if p.rollouts % c.train.batch_size:
            errors.append(
                f"ppo.rollouts ({p.rollouts}) must be a multiple of train.batch_size "
                f"({c.train.batch_size}), the minibatch"
            )
        if p.max_new_tokens >= c.train.seq_len:
            errors.append(
                f"ppo.max_new_tokens ({p.max_new_tokens}) leaves no room for a prompt "
                f"in a row of train.seq_len {c.train.seq_len}"
            )
        if p.safety_threshold >= 1:
            errors.append("ppo.safety_threshold must be below 1")
    return errors


class _Rollouts(Task):
    sources = ("prompts",)

    def check(self, c: ml_collections.ConfigDict) -> list[str]:
        errors = super().check(c)
        if not c.init_from:
            errors.append(f"task {self.name!r} starts from a model: set init_from")
        return errors + _checked(c)

    def fields(self, c: ml_collections.ConfigDict) -> dict[str, Field]:
        seq = Field.per_position(c.train.seq_len)
        floats = Field.per_position(c.train.seq_len, "float32")
        return {
            "tokens": seq,
            "segment_ids": seq,
            "positions": seq,
            "actions": seq,
            **{name: floats for name in self.rollout_fields},
        }

    rollout_fields: tuple[str, ...] = ()

    def make_iterator(self, c, split, seq_len, rows):
        raise ValueError(
            f"task {self.name!r} trains on rollouts, not on data batches: run it "
            "with llamax-train (llamax.ppo_train)"
        )

    def optimizer_steps(self, c: ml_collections.ConfigDict) -> int:
        return c.train.steps * updates_per_iteration(c)


class Policy(_Rollouts):
    name = "ppo"
    head = "lm"
    shown = ("reward", "kl", "value_loss", "clip_fraction")
    rollout_fields = ("old_logprobs", "advantages")
    trainer = "llamax.ppo_train:run"

    def loss(self, c: ml_collections.ConfigDict):
        return partial(policy_objective, clip=c.ppo.clip)

    def beside(self, c: ml_collections.ConfigDict) -> dict[str, Beside]:
        models = {} if c.lora.rank else {"reference": REFERENCE}
        models["helpful"] = reward_model(c, "ppo.helpful_rm", "helpfulness reward model")
        if c.ppo.safety_rm:
            models["safety"] = reward_model(c, "ppo.safety_rm", "safety reward model")
        return models

    def fixed_on_resume(self, c: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("init_from", "ppo.helpful_rm", "ppo.safety_rm", "ppo.value_from")

    def forwards_per_token(self, c: ml_collections.ConfigDict) -> float:
        """Every forward of an iteration, per rollout token, a backward counting two, all at
        the policy's size: generating it (1), the policy's, the reference's and the value
        model's scores (3), each reward model's (1 or 2), and the policy's and the value
        model's updates (3 each)."""
        return 1 + 3 + (2 if c.ppo.safety_rm else 1) + 6


class Value(_Rollouts):
    name = "ppo_value"
    head = "score"
    rollout_fields = ("old_values", "returns")

    def loss(self, c: ml_collections.ConfigDict):
        return partial(value_objective, clip=c.ppo.value_clip)


POLICY = register(Policy())
VALUE = register(Value())
