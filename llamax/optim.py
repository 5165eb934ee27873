"""The optimizer: AdamW with Llama 2's recipe (Touvron et al. 2023, section 2.2).

AdamW with beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1; linear warmup to the peak
learning rate, then cosine decay to 10% of it at the last step; gradients clipped to a global
norm of 1.0. Master weights stay in `param_dtype` (float32) whatever the compute dtype.
"""

from __future__ import annotations

import math
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


def check(c: ml_collections.ConfigDict) -> None:
    """Clear errors for optimizer settings no run could use."""
    finite = lambda x: isinstance(x, int | float) and math.isfinite(x)  # noqa: E731
    rules = {
        "learning_rate": lambda x: finite(x) and x > 0,
        "warmup_steps": lambda x: isinstance(x, int) and x >= 0,
        "end_learning_rate_ratio": lambda x: finite(x) and x >= 0,
        "b1": lambda x: finite(x) and 0 <= x < 1,
        "b2": lambda x: finite(x) and 0 <= x < 1,
        "eps": lambda x: finite(x) and x > 0,
        "weight_decay": lambda x: finite(x) and x >= 0,
        "grad_clip_norm": lambda x: finite(x) and x >= 0,
    }
    errors = [f"optimizer.{k} cannot be {c[k]!r}" for k, ok in rules.items() if not ok(c[k])]
    try:
        re.compile(c.weight_decay_exclude)
    except re.error as e:
        errors.append(f"optimizer.weight_decay_exclude is not a regular expression: {e}")
    if errors:
        raise ValueError("Invalid optimizer config: " + "; ".join(errors))


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    check(c)
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
