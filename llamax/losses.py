"""Training objectives: what a batch holds and the loss a train step minimizes.

A task is a loss function over a batch, with the batch fields it needs; the train step
(`llamax.step`), its setup (`llamax.setup`) and the loop are shared by every task. Losses
return sums and counts, not means, so that gradient accumulation and evaluation over many
batches divide once by the count of the whole global batch: `(summed loss to differentiate,
(summed loss, count))`, or `(..., (summed loss, count, {name: sum}))` with more sums that the
train step reports as means per count (a reward model's accuracy, DPO's margins).

Shapes: B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llamax import lora
from llamax.data.ratings import MARGINS
from llamax.model import token_nll


def next_targets(tokens, segment_ids, loss_mask=None):
    """What each position t predicts, token t + 1 ([B, T], 0 at the last position), and where
    that prediction counts ([B, T] bool): both in the same segment and not padding (segment
    0), so nothing is predicted across a document boundary or into padding; with a
    `loss_mask`, only where token t + 1's mask is 1."""
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    if loss_mask is not None:
        valid &= loss_mask[:, 1:] != 0
    end = jnp.zeros_like(tokens[:, :1])
    targets = jnp.concatenate([tokens[:, 1:], end], axis=1)
    return targets, jnp.concatenate([valid, jnp.zeros_like(valid[:, :1])], axis=1)


def _summed(nll, log_z, valid, z_loss):
    z = jnp.where(valid, log_z**2, 0.0)
    return jnp.where(valid, nll, 0.0).sum(), z_loss * z.sum(), valid.sum().astype(jnp.float32)


def next_token_loss(logits, tokens, segment_ids, z_loss: float = 0.0, loss_mask=None):
    """Sums over the valid predictions (`next_targets`) of the cross-entropy (plus z-loss) and
    their count, from logits [B, T, V]."""
    targets, valid = next_targets(tokens, segment_ids, loss_mask)
    return _summed(*token_nll(logits, targets), valid, z_loss)


def model_nll(params, model, batch, targets, rngs=None):
    """The model's cross-entropy of `targets` [B, T] and log Z at each position of the batch,
    from its chunked output (`llamax.model.output_nll`; the logits are never whole)."""
    return model.apply({"params": params}, batch["tokens"], batch["positions"],
                       batch["segment_ids"], targets=targets, rngs=rngs)  # fmt: skip


def lm_loss(params, model, batch, z_loss: float = 0.0, rngs=None):
    """Next-token prediction on packed documents (pretraining, continued training), and with a
    `loss_mask` in the batch (chat data: 1 on the tokens to learn) on the masked-in targets
    only (supervised fine-tuning): (summed loss to differentiate, (summed nll, target count))."""
    targets, valid = next_targets(batch["tokens"], batch["segment_ids"], batch.get("loss_mask"))
    nll, z, count = _summed(*model_nll(params, model, batch, targets, rngs), valid, z_loss)
    return nll + z, (nll, count)


# ----- preferences: reward models (Llama 2's ranking loss) and DPO -----


def rating_margins(ratings: jnp.ndarray, table: str = "small") -> jnp.ndarray:
    """The margin of each pair: `ratings` are indices into RATINGS, -1 where a pair has none."""
    if table not in MARGINS:
        raise ValueError(f"Unknown margin table {table!r}; expected one of {sorted(MARGINS)}")
    values = jnp.asarray((*MARGINS[table], 0.0), jnp.float32)  # index -1: no rating
    return values[ratings]


def segment_last_values(values, segment_ids, num_segments: int):
    """Each segment's value at its last token, for segments 1..`num_segments` of each row
    ([B, S]), and whether the row has that segment ([B, S]): where a reward model's score is
    read, one sequence per segment (packed or padded; segment 0 is padding)."""
    following = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    last = (segment_ids != following) & (segment_ids != 0)
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    hit = (segment_ids[..., None] == ids) & last[..., None]  # [B, T, S]
    values = jnp.where(hit, values[..., None].astype(jnp.float32), 0.0).sum(axis=1)
    return values, hit.any(axis=1)


def ranking_loss(chosen, rejected, margin=0.0, centering: float = 0.0, valid=None):
    """Llama 2's reward-model loss, summed over pairs, and the pair count: per pair
    `-log sigmoid(r_chosen - r_rejected - margin) + centering * (r_chosen + r_rejected)^2`
    (the second term, reward centering, keeps scores near 0; its mean over pairs is what the
    sum divided by the count gives). `valid` masks out padding pairs."""
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    per_pair = -jax.nn.log_sigmoid(chosen - rejected - margin)
    per_pair = per_pair + centering * (chosen + rejected) ** 2
    if valid is None:
        valid = jnp.ones(per_pair.shape, bool)
    return jnp.where(valid, per_pair, 0.0).sum(), valid.sum().astype(jnp.float32)


def _response_logprobs(nll, tokens, segment_ids, loss_mask):
    """[B, T]: from each position's cross-entropy of the next token ([B, T], as
    `next_targets` pairs them), the log-probability of each masked-in token t + 1 given the
    tokens before it in its segment, 0 elsewhere."""
    _, valid = next_targets(tokens, segment_ids, loss_mask)
    return -jnp.where(valid, nll, 0.0)


def sequence_logprobs(logits, tokens, segment_ids, loss_mask) -> jnp.ndarray:
    """log pi(response | prompt) of each row [B]: the log-probabilities of the masked-in
    tokens (the response), each predicted from the tokens before it in its segment."""
    nll, _ = token_nll(logits, next_targets(tokens, segment_ids)[0])
    return _response_logprobs(nll, tokens, segment_ids, loss_mask).sum(axis=-1)


def segment_logprobs(nll, tokens, segment_ids, loss_mask, num_segments: int):
    """log pi(response | prompt) of segments 1..`num_segments` of each row [B, S], from each
    position's cross-entropy of the next token [B, T]: the `sequence_logprobs` of each
    segment (a packed row of pairs), 0 for a segment the row lacks."""
    logps = _response_logprobs(nll, tokens, segment_ids, loss_mask)
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    hit = segment_ids[..., None] == ids  # [B, T, S]
    return jnp.where(hit, logps[..., None], 0.0).sum(axis=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """Direct preference optimization (Rafailov et al. 2023) per pair, from the summed response
    log-probabilities under the policy and the reference: `-log sigmoid(beta * ((pi_c -
    ref_c) - (pi_r - ref_r)))`, and the implicit rewards `beta * (pi - ref)` of the chosen
    and the rejected responses (their difference is the margin; accuracy is margin > 0)."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -jax.nn.log_sigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def reward_loss(params, model, batch, margins: str = "none", centering: float = 0.0,
                pairs_per_row: int = 1, rngs=None):  # fmt: skip
    """A reward model's ranking loss on rows of preference pairs (`llamax.data.preference`:
    pair k of a row is segments 2k + 1, chosen, and 2k + 2, rejected; its rating on its
    tokens): each response scored at its last token, Llama 2's loss with the `margins` table
    by rating, summed over the global batch's pairs: (summed loss, (summed loss, pairs, sums
    of the pairs ranked right and of the score gaps chosen - rejected))."""
    scores = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], rngs=rngs
    )
    values, present = segment_last_values(scores, batch["segment_ids"], 2 * pairs_per_row)
    ratings, _ = segment_last_values(batch["rating"], batch["segment_ids"], 2 * pairs_per_row)
    margin = rating_margins(ratings[:, 0::2].astype(jnp.int32) - 1, margins)
    valid = present[:, 0::2] & present[:, 1::2]
    chosen, rejected = values[:, 0::2], values[:, 1::2]
    total, count = ranking_loss(chosen, rejected, margin, centering, valid)
    gap = jnp.where(valid, chosen - rejected, 0.0)
    sums = {"accuracy": jnp.where(valid, gap > 0, False).sum().astype(jnp.float32),
            "score_gap": gap.sum()}  # fmt: skip
    return total, (total, count, sums)


def dpo_objective(params, model, batch, reference=None, beta: float = 0.1,
                  pairs_per_row: int = 1, rngs=None):  # fmt: skip
    """DPO on rows of preference pairs (as `reward_loss` reads them; each response's
    log-probability summed over its `loss_mask`, the final answer and its EOS) against the
    `reference` parameters (a frozen copy of the start; for a LoRA model, None: its own base
    with every adapter at zero), which are not differentiated: (summed loss, (summed loss,
    pairs, sums of the implicit rewards' accuracy and margin, the chosen and rejected rewards
    and log-probabilities)). At the reference the loss is log 2 and every margin 0."""
    if reference is None and getattr(model, "lora", None) is None:
        raise ValueError("DPO needs the reference model's parameters")
    if reference is None:  # LoRA: the base, every adapter at zero
        base, adapters = lora.split(params)
        reference = lora.combine(base, jax.tree.map(jnp.zeros_like, adapters))
    s = 2 * pairs_per_row

    targets, _ = next_targets(batch["tokens"], batch["segment_ids"])

    def logps(p, r):
        nll, _ = model_nll(p, model, batch, targets, r)
        lp = segment_logprobs(nll, batch["tokens"], batch["segment_ids"], batch["loss_mask"], s)
        return lp[:, 0::2], lp[:, 1::2]

    policy_c, policy_r = logps(params, rngs)
    ref_c, ref_r = jax.lax.stop_gradient(logps(reference, None))
    _, present = segment_last_values(batch["tokens"], batch["segment_ids"], s)
    valid = present[:, 0::2] & present[:, 1::2]
    per_pair, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)

    def total(x):
        return jnp.where(valid, x, 0.0).sum()

    margin = chosen - rejected
    sums = {"reward_accuracy": total((margin > 0).astype(jnp.float32)),
            "reward_margin": total(margin), "chosen_reward": total(chosen),
            "rejected_reward": total(rejected), "chosen_logp": total(policy_c),
            "rejected_logp": total(policy_r)}  # fmt: skip
    loss = total(per_pair)
    return loss, (loss, valid.sum().astype(jnp.float32), sums)
