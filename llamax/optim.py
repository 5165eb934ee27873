"""The optimizer: AdamW with Llama 2's recipe (Touvron et al. 2023, section 2.2).

AdamW with beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1; linear warmup to the peak
learning rate, then cosine decay to 10% of it at the last step; gradients clipped to a global
norm of 1.0. Master weights stay in `param_dtype` (float32) whatever the compute dtype.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.learning_rate = 3e-4  # peak; Llama 2 7B and 13B used 3e-4, 34B and 70B 1.5e-4
    c.warmup_steps = 2000
    c.end_learning_rate_ratio = 0.1  # cosine decays to this fraction of the peak
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-5
    c.weight_decay = 0.1
    # Parameters whose path ("layers/attention_norm/scale", ...) matches this regular
    # expression get no weight decay; "" decays every parameter.
    c.weight_decay_exclude = "norm"
    c.grad_clip_norm = 1.0  # 0 disables clipping
    return c


def learning_rate_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(c.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=c.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=c.learning_rate * c.end_learning_rate_ratio,
    )


def weight_decay_mask(params, exclude: str):
    """True for the parameters that get weight decay."""
    pattern = re.compile(exclude) if exclude else None

    def decays(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return pattern is None or pattern.search(name) is None

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    if not c.learning_rate > 0:
        raise ValueError(f"optimizer.learning_rate must be positive, got {c.learning_rate}")
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(c, total_steps),
        b1=c.b1,
        b2=c.b2,
        eps=c.eps,
        weight_decay=c.weight_decay,
        mask=lambda params: weight_decay_mask(params, c.weight_decay_exclude),
    )
    if c.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
    return adamw
