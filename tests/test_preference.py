"""Preference objectives against hand-computed values: Llama 2's reward-model ranking loss
with its margin tables and reward centering, response log-probabilities, and DPO (log 2 and
zero margins where the policy is its reference)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamax import losses
from llamax.data.ratings import MARGINS, RATINGS


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_margin_tables_are_llama2s():
    """Touvron et al. 2023, Table 28: significantly better, better, slightly better,
    negligibly better / unsure."""
    assert RATINGS[0] == "significantly better" and len(RATINGS) == 4
    np.testing.assert_allclose(MARGINS["small"], [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(MARGINS["large"], [3, 2, 1, 0])
    got = losses.rating_margins(jnp.asarray([0, 1, 2, 3, -1]), "large")
    np.testing.assert_allclose(got, [3, 2, 1, 0, 0])
    with pytest.raises(ValueError, match="Unknown margin table 'huge'"):
        losses.rating_margins(jnp.asarray([0]), "huge")


@pytest.mark.parametrize("table, centering", [("none", 0.0), ("small", 0.0), ("large", 0.01)])
def test_ranking_loss_by_hand(table, centering):
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=8) * 3, rng.normal(size=8) * 3
    ratings = rng.integers(-1, 4, size=8)
    valid = np.arange(8) < 6
    want = 0.0
    for c, r, k, v in zip(chosen, rejected, ratings, valid, strict=True):
        m = 0.0 if k < 0 else MARGINS[table][k]
        if v:
            want += -_log_sigmoid(c - r - m) + centering * (c + r) ** 2
    margin = losses.rating_margins(jnp.asarray(ratings), table)
    total, count = losses.ranking_loss(
        jnp.asarray(chosen), jnp.asarray(rejected), margin, centering, jnp.asarray(valid)
    )
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert count == 6


def test_sequence_logprobs_sum_the_response_tokens_only():
    rng = np.random.default_rng(1)
    b, t, v = 3, 7, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, t))
    segments = np.ones((b, t), np.int32)
    segments[2, 5:] = 0  # right padding
    mask = np.zeros((b, t), np.int32)
    mask[:, 3:] = 1  # the response starts at token 3
    want = np.zeros(b)
    for i in range(b):
        for j in range(1, t):
            if segments[i, j] and mask[i, j]:
                row = logits[i, j - 1].astype(np.float64)
                want[i] += row[tokens[i, j]] - np.log(np.exp(row).sum())
    got = losses.sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens),
                                   jnp.asarray(segments), jnp.asarray(mask))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dpo_by_hand_and_log_2_at_the_reference():
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(size=5) * 10 for _ in range(4))
    loss, chosen, rejected = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), 0.1)
    pairs = zip(pc, pr, rc, rr, strict=True)
    want = [-_log_sigmoid(0.1 * ((a - c) - (b - d))) for a, b, c, d in pairs]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(chosen - rejected, 0.1 * ((pc - rc) - (pr - rr)), rtol=1e-5)
    loss, chosen, rejected = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, pc, pr)))
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert not np.any(np.asarray(chosen)) and not np.any(np.asarray(rejected))
    grad = jax.grad(
        lambda p: losses.dpo_loss(p, jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr))[0].sum()
    )(jnp.asarray(pc))
    np.testing.assert_allclose(grad, -0.05, rtol=1e-5)  # -beta * sigmoid(0): chosen goes up
