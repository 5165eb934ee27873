"""Training objectives: what a batch holds and the loss a train step minimizes.

A task is a loss function over a batch, with the batch fields it needs; the train step
(`llamax.step`), its setup (`llamax.setup`) and the loop are shared by every task. Losses
return sums and counts, not means, so that gradient accumulation and evaluation over many
batches divide once by the count of the whole global batch.

Shapes: B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cross-entropy of each target under logits [..., V], in float32, and log Z (the
    log-partition, for z-loss): both [...]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def next_token_loss(logits, tokens, segment_ids, z_loss: float = 0.0, loss_mask=None):
    """Sums over the valid predictions of the cross-entropy (plus z-loss) and their count.

    Position t predicts token t + 1 when both are in the same segment and it is not padding
    (segment 0): nothing is predicted across a document boundary or into padding; with a
    `loss_mask`, only where token t + 1's mask is 1.
    """
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    if loss_mask is not None:
        valid &= loss_mask[:, 1:] != 0
    nll, log_z = token_nll(logits[:, :-1], tokens[:, 1:])
    nll = jnp.where(valid, nll, 0.0)
    z = jnp.where(valid, log_z**2, 0.0)
    return nll.sum(), z_loss * z.sum(), valid.sum().astype(jnp.float32)


def lm_loss(params, model, batch, z_loss: float = 0.0, rngs=None):
    """Next-token prediction on packed documents (pretraining, continued training), and with a
    `loss_mask` in the batch (chat data: 1 on the tokens to learn) on the masked-in targets
    only (supervised fine-tuning): (summed loss to differentiate, (summed nll, target count))."""
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], rngs=rngs
    )
    nll, z, count = next_token_loss(
        logits, batch["tokens"], batch["segment_ids"], z_loss, batch.get("loss_mask")
    )
    return nll + z, (nll, count)
