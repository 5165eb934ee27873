"""What one training step computes: `TrainState`, `train_step` and `eval_step`.

Both are plain functions of a task's loss (`llamax.tasks`, composed from `llamax.losses`);
`llamax.setup` puts them under `jax.jit` with the state's and the batch's shardings.

Shapes: B global batch, A gradient-accumulation steps, T sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from llamax import lora

# (params, model, batch, rngs=None, **models beside) -> (summed loss to differentiate,
# (summed loss, count) or (summed loss, count, {name: sum})): `llamax.losses`; the models a
# task needs beside the trained one come as keywords by their names (DPO's `reference`).
LossFn = Callable[..., tuple[jax.Array, tuple]]


def _sums(aux) -> tuple[jax.Array, jax.Array, dict]:
    """A loss's (summed loss, count, {name: sum}), its extra sums {} when it has none."""
    return (*aux, {}) if len(aux) == 2 else tuple(aux)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # what trains: every parameter, or LoRA's adapters (and a reward model's head)
    opt_state: Any
    # Parameters that do not train (LoRA's base): joined to `params` for the loss, passed
    # through the step unchanged, never checkpointed with the run.
    frozen: Any = None
    # The parameters of the models a task needs beside the trained one, by name (DPO's
    # `reference`, a frozen copy of the start; PPO's reward models), each passed to the loss
    # as the keyword of its name: not trained, not checkpointed (read again on resume).
    beside: Any = flax.struct.field(default_factory=dict)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: LossFn,
    grad_accum_steps: int = 1,
    grad_shardings=None,
    dropout_seed: int = 0,
):
    """One optimizer step on the global batch, accumulated over `grad_accum_steps` micro-batches.

    The loss is the mean over every valid target token of the whole global batch, so
    accumulation gives the gradient of one big batch. The gradient is of `state.params` only
    (with LoRA: the adapters and any head trained beside them; `state.frozen` joins them for
    the loss). The models beside the trained one (`state.beside`, DPO's `reference`) are the
    loss's keywords of their names. A model with LoRA dropout gets a dropout key from
    `dropout_seed`, the step and the micro-batch.
    """
    dropout = getattr(model, "lora", None) is not None and model.lora.dropout > 0
    step_key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    extra = dict(state.beside or {})

    def loss_of(params, micro, index):
        if state.frozen is not None:
            params = lora.combine(state.frozen, params)
        rngs = {"dropout": jax.random.fold_in(step_key, index)} if dropout else None
        loss, aux = loss_fn(params, model, micro, rngs=rngs, **extra)
        return loss, _sums(aux)

    grad_fn = jax.grad(loss_of, has_aux=True)
    if grad_accum_steps == 1:
        grads, (nll, count, sums) = grad_fn(state.params, batch, 0)
    else:
        a = grad_accum_steps

        def split(x):  # micro-batch i takes rows i, i + A, ...: every device keeps its rows
            return x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)  # [A, B/A, T]

        def accumulate(carry, indexed):
            index, micro = indexed
            g, aux = grad_fn(state.params, micro, index)
            return jax.tree.map(jnp.add, carry, (g, *aux)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        micro_batches = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        _, sums_shape = jax.eval_shape(grad_fn, state.params, first, 0)
        init = (zeros, *jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape))
        micro = (jnp.arange(a), micro_batches)
        (grads, nll, count, sums), _ = jax.lax.scan(accumulate, init, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": nll / denom,
        "grad_norm": optax.tree.norm(grads),
        # The loss is of the parameters before the update; this checks the ones after it.
        "param_norm": optax.tree.norm(params),
        "learning_rate": schedule(state.step),
        "target_tokens": count,  # what the loss counts: target tokens, or pairs
        **{name: value / denom for name, value in sums.items()},
    }
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, metrics


def eval_step(params, batch: dict, beside=None, *, model, loss_fn: LossFn):
    """(summed loss, count) of a batch; `beside`: the parameters of the models the task needs
    beside the trained one, by name (`TrainState.beside`)."""
    _, aux = loss_fn(params, model, batch, **(beside or {}))
    return _sums(aux)[:2]
