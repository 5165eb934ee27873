"""One setup for every training loop: experiment config + mesh -> `Setup`, which holds the
model, the optimizer and schedule, the abstract train state and its shardings, the batch
sharding, and the jitted train and eval steps. `llamax.train.run`, `llamax.aot.check` and the
benchmarks all build their step here.

The order is always: `jax.eval_shape(init)` -> shardings from the logical axis names ->
`jax.jit(init, out_shardings=...)` (the state is born sharded, never whole on one host) ->
`jax.jit(train_step, in_shardings, out_shardings, donate_argnums=0)`. On several processes each
one builds only the rows of the global batch that its devices hold and assembles the global
array with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from functools import partial

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamax import checkpoint, experiment, losses, optim, pretrained, sharding, step
from llamax import data as data_lib
from llamax.model import Llama, abstract_params
from llamax.step import TrainState

log = logging.getLogger("llamax")


def make_mesh(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The config's `data x fsdp x tensor` mesh over `devices` (default: all)."""
    return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)


def check_batch_layout(c: ml_collections.ConfigDict, mesh: Mesh) -> None:
    t = c.train
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum_steps "
            f"({t.grad_accum_steps})"
        )
    if (t.batch_size // t.grad_accum_steps) % batch_shards:
        raise ValueError(
            f"Each micro-batch ({t.batch_size} // {t.grad_accum_steps} sequences) must split "
            f"evenly over the mesh's data x fsdp = {batch_shards} devices"
        )


def state_shardings(model: Llama, tx: optax.GradientTransformation, mesh: Mesh):
    """The abstract train state (shapes and dtypes) and its shardings; no memory used."""
    boxed = abstract_params(model)
    param_shardings = sharding.tree_shardings(boxed, mesh)
    # optax mirrors the boxed parameters in its moments, so they get the same logical names.
    opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    params = flax.linen.unbox(boxed)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
    )
    return abstract, shardings


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    c: ml_collections.ConfigDict
    mesh: Mesh
    model: Llama
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState  # shapes and dtypes only
    shardings: TrainState
    batch_sharding: NamedSharding
    fields: tuple[str, ...]  # what a batch holds, each int32 [batch_size, seq_len]
    train_step: Callable  # (state, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # (params, batch) -> (summed nll, target count)

    @property
    def batch_shape(self) -> tuple[int, int]:
        return self.c.train.batch_size, self.c.train.seq_len

    def local_rows(self) -> np.ndarray:
        """Indices of the global batch rows held by this process's devices, in order."""
        rows: set[int] = set()
        indices = self.batch_sharding.addressable_devices_indices_map(self.batch_shape)
        for index in indices.values():
            rows.update(range(self.batch_shape[0])[index[0]])
        return np.array(sorted(rows))

    def global_batch(self, local: dict) -> dict:
        """The global batch from this process's rows of it."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v, self.batch_shape)
            for k, v in local.items()
        }

    def abstract_batch(self) -> dict:
        x = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        return dict.fromkeys(self.fields, x)

    def abstract_state(self) -> TrainState:
        """The abstract state placed on its shardings: what ahead-of-time compiles take."""
        return pretrained.with_shardings(self.abstract, self.shardings)

    def init_state(self, rng: jax.Array, params=None) -> TrainState:
        """The train state born sharded: random parameters, or `params` (`init_from`)."""

        def init(r, p):
            if p is None:
                p = flax.linen.unbox(self.model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p))

        with sharding.use_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.shardings)(rng, params)

    def restore_or_init(
        self, checkpoints: checkpoint.Checkpoints, data_iter
    ) -> tuple[TrainState, dict]:
        """The state to train from, and the restored checkpoint's meta ({} when none): the
        workdir's latest checkpoint (with the data position), else `init_from`'s parameters,
        else a fresh initialization."""
        latest = checkpoints.latest_step()
        if latest is not None:
            state, data_state, meta = checkpoints.restore(latest, self.abstract, self.shardings)
            data_iter.set_state(data_state)
            log.info("resuming from the checkpoint of step %d in %s", latest, checkpoints.directory)
            return state, meta
        rng = jax.random.key(self.c.train.seed)
        if not self.c.init_from:
            return self.init_state(rng), {}
        params, from_step = pretrained.restore_params(
            self.c.init_from, self.abstract.params, self.shardings.params, what="init_from"
        )
        log.info("initialized from the parameters of %s (step %d)", self.c.init_from, from_step)
        return self.init_state(rng, params), {}


def build(c: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Everything a training loop over config `c` needs on `mesh`; nothing is allocated."""
    t = c.train
    experiment.check(c)
    check_batch_layout(c, mesh)
    model = Llama(experiment.model_config(c), experiment.execution_config(c))
    tx = optim.make_optimizer(c.optimizer, t.steps)
    schedule = optim.learning_rate_schedule(c.optimizer, t.steps)
    abstract, shardings = state_shardings(model, tx, mesh)
    logical = sharding.mesh_axes(("batch", "length"), (t.batch_size, t.seq_len), mesh)
    batch_sharding = NamedSharding(mesh, logical)
    fields, loss_fn = data_lib.fields(c.data), partial(losses.lm_loss, z_loss=t.z_loss)
    batch_shardings = dict.fromkeys(fields, batch_sharding)
    train_step = jax.jit(
        partial(
            step.train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            loss_fn=loss_fn,
            grad_accum_steps=t.grad_accum_steps,
            grad_shardings=shardings.params,
        ),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        partial(step.eval_step, model=model, loss_fn=loss_fn),
        in_shardings=(shardings.params, batch_shardings),
    )
    return Setup(
        c, mesh, model, tx, schedule, abstract, shardings, batch_sharding, fields,
        train_step, eval_step,
    )  # fmt: skip
