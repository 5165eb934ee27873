"""One setup for every training loop: experiment config + mesh -> `Setup`, which holds the
task (`llamax.tasks`), the model, the optimizer and schedule, the abstract train state and its
shardings, the batch's fields and their shardings, and the jitted train and eval steps.
`llamax.train.run`, `llamax.aot.check` and the benchmarks all build their step here; the
state a run starts from (resumed, `init_from`, a frozen base, the models beside) is
`llamax.state`'s.

The order is always: `jax.eval_shape(init)` -> shardings from the logical axis names ->
`jax.jit(init, out_shardings=...)` (the state is born sharded, never whole on one host) ->
`jax.jit(train_step, in_shardings, out_shardings, donate_argnums=0)`. On several processes each
one builds only the rows of the global batch that its devices hold and assembles the global
array with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamax import experiment, lora, optim, pretrained, quantization, sharding, step, tasks
from llamax.execution import compiler_options
from llamax.model import Llama, abstract_params, trained_with_adapters
from llamax.step import TrainState


def make_mesh(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The config's `data x fsdp x context x tensor` mesh over `devices` (default: all)."""
    m = c.mesh
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices, context=m.context)


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
    if t.seq_len % mesh.shape["context"]:
        raise ValueError(
            f"train.seq_len ({t.seq_len}) must split evenly over the mesh's context = "
            f"{mesh.shape['context']} devices (each holds a contiguous part of every sequence)"
        )
    if mesh.shape["context"] > 1 and c.model.attention in ("splash", "cudnn"):
        raise ValueError(
            f"model.attention {c.model.attention!r} does not split the sequence over the mesh's "
            "context axis: use 'chunked' or 'xla' ('auto' picks them when mesh.context > 1)"
        )


def state_shardings(
    model: Llama,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    frozen_dtype: str = "float32",
    beside: Mapping[str, Llama] | None = None,
):
    """The abstract train state (shapes and dtypes) and its shardings; no memory used. With
    LoRA the parameters are the adapters and what trains beside them (a reward model's score
    head: `trained_with_adapters`), and `frozen` the rest, the base, in `frozen_dtype`; the
    models `beside` the trained one (a task's: DPO's reference), by name, their parameters as
    each model declares them."""
    boxed, frozen = abstract_params(model), None
    if model.lora is not None:
        frozen, boxed = lora.split(boxed, trained_with_adapters(model.config))
    param_shardings = sharding.tree_shardings(boxed, mesh)
    # optax mirrors the boxed parameters in its moments, so they get the same logical names.
    opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    others = {name: abstract_params(m) for name, m in (beside or {}).items()}
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings,
        frozen=None if frozen is None else sharding.tree_shardings(frozen, mesh),
        beside={name: sharding.tree_shardings(b, mesh) for name, b in others.items()},
    )  # fmt: skip
    params = flax.linen.unbox(boxed)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        frozen=None if frozen is None else frozen_abstract(frozen, frozen_dtype),
        beside={name: flax.linen.unbox(b) for name, b in others.items()},
    )
    return abstract, shardings


def frozen_abstract(boxed, dtype: str):
    """The frozen base's shapes in `dtype`; quantized ("int8", "nf4"), the matrices' codes and
    float32 scales as the model declares them and the rest in bfloat16."""
    floats = "bfloat16" if dtype in quantization.QUANTIZATIONS else dtype

    def cast(path, x):
        name = str(getattr(path[-1], "key", ""))
        keep = dtype in quantization.QUANTIZATIONS and (
            name in quantization.AXES or name.endswith("_scale")
        )
        return jax.ShapeDtypeStruct(x.shape, x.dtype if keep else floats)

    return jax.tree_util.tree_map_with_path(cast, flax.linen.unbox(boxed))


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    c: ml_collections.ConfigDict  # with its task stated (`experiment.resolve_task`)
    mesh: Mesh
    task: tasks.Task
    model: Llama
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState  # shapes and dtypes only
    shardings: TrainState
    batch_sharding: NamedSharding  # of a [batch_size, seq_len] field: which rows, positions
    fields: dict[str, tasks.Field]  # what a batch holds: the task's fields
    batch_shardings: dict[str, NamedSharding]  # each field's
    train_step: Callable  # (state, batch) -> (state, metrics); the state is donated
    # (full_params(state), batch, state.beside) -> (summed loss, count)
    eval_step: Callable

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

    def local_columns(self) -> slice:
        """The positions of each row this process's devices hold: all of them, unless the
        mesh's `context` axis splits sequences across processes."""
        columns: set[int] = set()
        indices = self.batch_sharding.addressable_devices_indices_map(self.batch_shape)
        for index in indices.values():
            columns.update(range(self.batch_shape[1])[index[1]])
        start, stop = min(columns), max(columns) + 1
        if len(columns) != stop - start:
            raise ValueError(
                "This process's devices hold parts of each sequence that are not contiguous "
                "(mesh.context across processes): order the mesh so that a process holds "
                "neighbouring context shards"
            )
        return slice(start, stop)

    def global_batch(self, local: dict) -> dict:
        """The global batch of the task's fields from this process's rows of it (whole rows:
        their positions this process holds are cut out here). A field the data does not
        give, or gives in another shape, is an error naming it."""
        columns, out = self.local_columns(), {}
        for name, field in self.fields.items():
            if name not in local:
                raise ValueError(
                    f"the data gives no batch field {name!r}, which task {self.task.name!r} "
                    f"reads (it gives {sorted(local)}): check data.source"
                )
            rows = np.asarray(local[name])
            if rows.shape[1:] != field.shape or not np.can_cast(rows.dtype, field.dtype,
                                                                "same_kind"):  # fmt: skip
                raise ValueError(
                    f"batch field {name!r}: the data gives rows of shape {rows.shape[1:]} "
                    f"{rows.dtype}, task {self.task.name!r} reads {field.shape} {field.dtype}"
                )
            cut = tuple(columns if axis == "length" else slice(None) for axis in field.axes)
            out[name] = jax.make_array_from_process_local_data(
                self.batch_shardings[name],
                rows[(slice(None), *cut)].astype(field.dtype, copy=False),
                (self.batch_shape[0], *field.shape),
            )
        return out

    def abstract_batch(self) -> dict:
        """The batch's fields as abstract arrays on their shardings: what ahead-of-time
        compiles take."""
        rows = self.batch_shape[0]
        return {
            name: jax.ShapeDtypeStruct(
                (rows, *f.shape), f.dtype, sharding=self.batch_shardings[name]
            )
            for name, f in self.fields.items()
        }

    def abstract_state(self) -> TrainState:
        """The abstract state placed on its shardings: what ahead-of-time compiles take."""
        return pretrained.with_shardings(self.abstract, self.shardings)

    def init_state(
        self, rng: jax.Array, params=None, frozen=None, start=None, beside=None
    ) -> TrainState:
        """The train state born sharded: random parameters, or `params` (`init_from`); with
        LoRA, fresh adapters on the `frozen` base, and what trains beside them (a reward
        model's score head) fresh too, or as in `start` (`init_from`'s); the parameters of
        the models `beside` the trained one, as given (`llamax.state` reads them)."""

        def init(r, p, frozen, start):
            if p is None:
                p = flax.linen.unbox(self.model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])
                if frozen is not None:  # what trains only: XLA drops the base's initialization
                    p = lora.combine(lora.split(p, self.trained_whole)[1], start or {})
            return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              opt_state=self.tx.init(p), frozen=frozen)  # fmt: skip

        shardings = self.shardings.replace(beside={})
        with sharding.use_mesh(self.mesh):
            state = jax.jit(init, out_shardings=shardings)(rng, params, frozen, start)
        return state.replace(beside=dict(beside or {}))

    @property
    def trained_whole(self) -> tuple[str, ...]:
        """The parameters that train whole beside LoRA's adapters (`trained_with_adapters`)."""
        return trained_with_adapters(self.model.config)

    def full_params(self, state: TrainState):
        """Every parameter of the model: LoRA's adapters joined to the base."""
        return state.params if state.frozen is None else lora.combine(state.frozen, state.params)


def beside_models(task: tasks.Task, c: ml_collections.ConfigDict, model: Llama) -> dict:
    """The model of each of the task's models beside the trained one, by name: its own
    architecture, or the trained model's (without adapters, its matrices unquantized)."""
    plain = model.execution.replace(weight_quantization="none")
    return {name: Llama(b.config or model.config, plain) for name, b in task.beside(c).items()}


def build(c: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Everything a training loop over config `c` needs on `mesh`; nothing is allocated. A
    config without a task gets the one it implies (`experiment.resolve_task`)."""
    c = experiment.resolve_task(c)
    t = c.train
    experiment.check(c)
    check_batch_layout(c, mesh)
    task = experiment.task(c)
    adapters = experiment.lora_config(c)
    model = Llama(experiment.model_config(c), experiment.execution_config(c), adapters)
    updates = task.optimizer_steps(c)
    tx = optim.make_optimizer(c.optimizer, updates)
    schedule = optim.learning_rate_schedule(c.optimizer, updates)
    abstract, shardings = state_shardings(
        model, tx, mesh, c.lora.base_dtype, beside_models(task, c, model)
    )
    logical = sharding.mesh_axes(("batch", "length"), (t.batch_size, t.seq_len), mesh)
    batch_sharding = NamedSharding(mesh, logical)
    fields, loss_fn = task.fields(c), task.loss(c)
    batch_shardings = {
        name: NamedSharding(mesh, sharding.mesh_axes(
            ("batch", *f.axes), (t.batch_size, *f.shape), mesh))
        for name, f in fields.items()
    }  # fmt: skip
    options = compiler_options(mesh.devices.flat[0].platform)
    train_step = jax.jit(
        partial(
            step.train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            loss_fn=loss_fn,
            grad_accum_steps=t.grad_accum_steps,
            grad_shardings=shardings.params,
            dropout_seed=t.seed,
        ),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
        compiler_options=options,
    )
    full = (
        shardings.params
        if shardings.frozen is None
        else lora.combine(shardings.frozen, shardings.params)
    )
    eval_step = jax.jit(
        partial(step.eval_step, model=model, loss_fn=loss_fn),
        in_shardings=(full, batch_shardings, shardings.beside),
        compiler_options=options,
    )
    return Setup(
        c, mesh, task, model, tx, schedule, abstract, shardings, batch_sharding, fields,
        batch_shardings, train_step, eval_step,
    )  # fmt: skip
