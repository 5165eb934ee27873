"""PPO's arithmetic as Llama 2-Chat was trained with it (Touvron et al. 2023, section 3.2.3),
on the usual choices of Stiennon et al. 2020 and TRL's PPO where the paper is silent.

Every array is per action: a rollout row holds a prompt and the policy's response (padding
after it), and position p of a [B, T] array belongs to the action "token p + 1 given tokens
0..p" (the alignment of `llamax.losses.next_targets`: the logits and the value head at p).
`mask` [B, T] is 1 on the response's actions (a contiguous run per row), 0 on the prompt's
positions and the padding. What a row's reward model scores is the whole response.

- `combine_scores`: Llama 2's choice of reward model per prompt, R_c = R_s if the prompt is a
  safety prompt or R_s(g|p) < 0.15, else R_h; on the raw scores (R = sigmoid(raw), so
  LOGIT(R_c) is the raw score and the threshold is raw r_s < logit(0.15)). With one reward
  model (no safety model) the helpfulness score is used throughout.
- `whiten`: (x - mean) / std over the masked entries (the iteration's batch: the paper's
  WHITEN, here over the batch of rollouts, not running statistics), the variance unbiased.
- `kl_rewards`: per action -beta * (log pi(a|s) - log pi_0(a|s)) (the k1 estimate of the KL to
  the frozen starting policy), the whitened score added at the response's last action.
- `advantages`: generalized advantage estimation (Schulman et al. 2016) over each response,
  gamma and lambda (1 and 0.95 by default), the returns = advantages + values, then the
  advantages whitened over the batch.
- `policy_loss` / `value_loss`: PPO's clipped surrogate and the clipped value loss (0.5 * max
  of the squared errors), summed over the masked actions with their count, as the train step
  takes a loss (`llamax.step.LossFn`), and the diagnostics: clip fractions, the approximate
  KL between the old and the new policy (0.5 * mean squared log-ratio), entropy.

Where TRL (0.25, its last release with PPO) differs: its score lands one position after the
response's last token when the response is shorter than the window (a quirk of its padding
masks) and its value loss counts that position too; here the score is on the last action and
every quantity covers the response's actions exactly. On a response that fills its window the
two agree (tests/test_ppo.py runs TRL's statements on the same inputs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SAFETY_THRESHOLD = 0.15  # Llama 2: the safety model decides when its sigmoid score is below


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def combine_scores(helpful, safety=None, is_safety=None, threshold: float = SAFETY_THRESHOLD):
    """(The chosen reward model's raw score [B], whether the safety model was chosen [B]):
    the safety model's on a safety prompt (`is_safety`) or where its sigmoid score is below
    `threshold` (the comparison is raw < logit(threshold): at exactly the threshold the
    helpfulness model is chosen), else the helpfulness model's. Without a safety model,
    `helpful` throughout."""
    helpful = jnp.asarray(helpful, jnp.float32)
    if safety is None:
        return helpful, jnp.zeros(helpful.shape, bool)
    safety = jnp.asarray(safety, jnp.float32)
    flagged = jnp.zeros(helpful.shape, bool) if is_safety is None else jnp.asarray(is_safety, bool)
    use_safety = flagged | (safety < logit(threshold))
    return jnp.where(use_safety, safety, helpful), use_safety


def masked_mean(x, mask, axis=None):
    mask = jnp.asarray(mask, x.dtype)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_var(x, mask):
    """The unbiased variance of the masked entries (n / (n - 1) times the mean square)."""
    mask = jnp.asarray(mask, x.dtype)
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred**2).sum() / jnp.maximum(n - 1.0, 1.0)


def whiten(x, mask=None, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries (all without a `mask`); with
    `shift_mean` False the mean is added back (only the scale changes)."""
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape, bool) if mask is None else mask
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    return out if shift_mean else out + mean


def last_action(mask):
    """[B, T] bool: the last masked-in position of each row (none in a row without one)."""
    mask = jnp.asarray(mask, bool)
    following = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return mask & ~following


def kl_rewards(scores, logprobs, ref_logprobs, mask, beta: float):
    """(Rewards [B, T], the per-action KL estimate [B, T]): -beta * (log pi - log pi_0) at each
    action, plus the row's (whitened) score at its last action; 0 off the mask."""
    mask = jnp.asarray(mask, bool)
    kl = jnp.where(mask, logprobs - ref_logprobs, 0.0)
    rewards = -beta * kl + jnp.where(last_action(mask), jnp.asarray(scores)[:, None], 0.0)
    return jnp.where(mask, rewards, 0.0), kl


def advantages(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95, whitened=True):
    """(Advantages [B, T], returns [B, T]) by generalized advantage estimation over each row's
    actions: delta_t = r_t + gamma V_{t+1} - V_t (V after the last action: 0), A_t = delta_t +
    gamma lam A_{t+1}; returns A + V; then the advantages whitened over every masked action
    of the batch (`whitened`). Both 0 off the mask."""
    mask = jnp.asarray(mask, bool)
    values = jnp.where(mask, values, 0.0)
    rewards = jnp.where(mask, rewards, 0.0)
    following = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * jnp.where(following, next_values, 0.0) - values

    def back(carry, x):  # from the last position to the first
        delta, go_on, here = x
        a = jnp.where(here, delta + gamma * lam * jnp.where(go_on, carry, 0.0), 0.0)
        return a, a

    xs = (deltas.T, following.T, mask.T)
    _, adv = jax.lax.scan(back, jnp.zeros(deltas.shape[0], deltas.dtype), xs, reverse=True)
    adv = adv.T
    returns = jnp.where(mask, adv + values, 0.0)
    if whitened:
        adv = jnp.where(mask, whiten(adv, mask), 0.0)
    return adv, returns


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate, (summed loss, action count, {"clip_fraction": sum,
    "approx_kl": sum}): per action max(-A r, -A clip(r, 1 - clip, 1 + clip)) with r =
    pi / pi_old; the fraction of actions where the clipped term won, and 0.5 (log r)^2."""
    mask = jnp.asarray(mask, bool)
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    per_action = jnp.maximum(unclipped, clipped)

    def total(x):
        return jnp.where(mask, x, 0.0).sum()

    sums = {"clip_fraction": total((clipped > unclipped).astype(jnp.float32)),
            "approx_kl": total(0.5 * log_ratio**2)}  # fmt: skip
    return total(per_action), mask.sum().astype(jnp.float32), sums


def value_loss(predicted, old_values, returns, mask, clip: float = 0.2):
    """The clipped value loss, (summed loss, action count, {"value_clip_fraction": sum}): per
    action 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old,
    -clip, clip)."""
    mask = jnp.asarray(mask, bool)
    clipped = old_values + jnp.clip(predicted - old_values, -clip, clip)
    plain, clipped = (predicted - returns) ** 2, (clipped - returns) ** 2
    per_action = 0.5 * jnp.maximum(plain, clipped)
    loss = jnp.where(mask, per_action, 0.0).sum()
    fraction = jnp.where(mask, clipped > plain, False).sum().astype(jnp.float32)
    return loss, mask.sum().astype(jnp.float32), {"value_clip_fraction": fraction}


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the masked actions: 1 for a perfect value model, 0 for one
    that predicts the mean, negative for worse."""
    var = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var, 1e-12)


def entropy(logits):
    """[...]: the entropy of the softmax of `logits` [..., V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)
