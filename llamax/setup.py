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
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamax import (
    checkpoint,
    experiment,
    lora,
    losses,
    optim,
    pretrained,
    quantization,
    sharding,
    step,
)
from llamax import data as data_lib
from llamax.execution import compiler_options
from llamax.model import Llama, abstract_params, trained_with_adapters
from llamax.step import TrainState

log = logging.getLogger("llamax")


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
    reference: bool = False,
):
    """The abstract train state (shapes and dtypes) and its shardings; no memory used. With
    LoRA the parameters are the adapters and what trains beside them (a reward model's score
    head: `trained_with_adapters`), and `frozen` the rest, the base, in `frozen_dtype`; with a
    `reference` model (DPO), its parameters, shaped and sharded like them."""
    boxed, frozen = abstract_params(model), None
    if model.lora is not None:
        frozen, boxed = lora.split(boxed, trained_with_adapters(model.config))
    param_shardings = sharding.tree_shardings(boxed, mesh)
    # optax mirrors the boxed parameters in its moments, so they get the same logical names.
    opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings,
        frozen=None if frozen is None else sharding.tree_shardings(frozen, mesh),
        reference=param_shardings if reference else None,
    )  # fmt: skip
    params = flax.linen.unbox(boxed)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        frozen=None if frozen is None else _frozen_abstract(frozen, frozen_dtype),
        reference=params if reference else None,
    )
    return abstract, shardings


def _frozen_abstract(boxed, dtype: str):
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
    # (full_params(state), batch, state.reference) -> (summed loss, count)
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
        """The global batch from this process's rows of it (whole rows: their positions this
        process holds are cut out here)."""
        columns = self.local_columns()
        return {
            k: jax.make_array_from_process_local_data(
                self.batch_sharding, v[:, columns], self.batch_shape
            )
            for k, v in local.items()
        }

    def abstract_batch(self) -> dict:
        x = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        return dict.fromkeys(self.fields, x)

    def abstract_state(self) -> TrainState:
        """The abstract state placed on its shardings: what ahead-of-time compiles take."""
        return pretrained.with_shardings(self.abstract, self.shardings)

    def init_state(self, rng: jax.Array, params=None, frozen=None, start=None) -> TrainState:
        """The train state born sharded: random parameters, or `params` (`init_from`); with
        LoRA, fresh adapters on the `frozen` base, and what trains beside them (a reward
        model's score head) fresh too, or as in `start` (`init_from`'s); and the reference
        model a task needs."""

        def init(r, p, frozen, start):
            if p is None:
                p = flax.linen.unbox(self.model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])
                if frozen is not None:  # what trains only: XLA drops the base's initialization
                    p = lora.combine(lora.split(p, self._trained)[1], start or {})
            return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              opt_state=self.tx.init(p), frozen=frozen)  # fmt: skip

        shardings = self.shardings.replace(reference=None)
        with sharding.use_mesh(self.mesh):
            state = jax.jit(init, out_shardings=shardings)(rng, params, frozen, start)
        return state.replace(reference=self._reference())

    @property
    def _trained(self) -> tuple[str, ...]:
        """The parameters that train whole beside LoRA's adapters (`trained_with_adapters`)."""
        return trained_with_adapters(self.model.config)

    def _reference(self):
        """The reference model's parameters (None when the task has none or, as with LoRA,
        the loss derives it: the base with the adapters off): `init_from`'s, read again
        (never the trained ones' buffers, which each step donates)."""
        if self.abstract.reference is None:
            return None
        params, _ = pretrained.restore_params(
            self.c.init_from, self.abstract.reference, self.shardings.reference, "init_from"
        )
        return params

    def full_params(self, state: TrainState):
        """Every parameter of the model: LoRA's adapters joined to the base."""
        return state.params if state.frozen is None else lora.combine(state.frozen, state.params)

    def restore_or_init(
        self, checkpoints: checkpoint.Checkpoints, data_iter
    ) -> tuple[TrainState, dict]:
        """The state to train from, and the restored checkpoint's meta ({} when none): the
        workdir's latest checkpoint (with the data position), else `init_from`'s parameters,
        else a fresh initialization."""
        latest = checkpoints.latest_step()
        if latest is not None:
            state, data_state, meta = checkpoints.restore(latest, self.abstract, self.shardings)
            # The run's base and reference, by content, before either is read.
            if self.abstract.frozen is not None:
                pretrained.check_same_base(meta.get("lora_base"), self.c.init_from)
            if self.abstract.reference is not None:
                pretrained.check_same_base(meta.get("dpo_reference"), self.c.init_from, dpo=True)
            data_iter.set_state(data_state)
            log.info("resuming from the checkpoint of step %d in %s", latest, checkpoints.directory)
            frozen = self._frozen_base()
            if frozen is not None:
                state = state.replace(frozen=frozen)
            return state.replace(reference=self._reference()), meta
        frozen = self._frozen_base()
        rng = jax.random.key(self.c.train.seed)
        if frozen is not None:
            log.info("LoRA adapters (%s) on the frozen base %s", self.model.lora, self.c.init_from)
            return self.init_state(rng, frozen=frozen, start=self._trained_from_init()), {}
        if not self.c.init_from:
            return self.init_state(rng), {}
        params, from_step = self._pretrained_params(rng)
        log.info("initialized from the parameters of %s (step %d)", self.c.init_from, from_step)
        return self.init_state(rng, params), {}

    def _new_head(self) -> bool:
        """A reward model started from a language model's checkpoint (as Llama 2's start from
        their chat models): the body is read from it, the score head is new (initialized as
        the model initializes it: the first scores near 0)."""
        saved = pretrained.saved_params(self.c.init_from, "init_from")
        new = self.model.config.head == "score" and "score" not in saved and "output" in saved
        if new:
            log.info("a reward model on the language model %s: its body, a new score head",
                     self.c.init_from)  # fmt: skip
        return new

    def _pretrained_params(self, rng: jax.Array):
        """(`init_from`'s parameters on their shardings, its step); a reward model's new score
        head on a language model's body (`_new_head`)."""
        init_from = self.c.init_from
        if not self._new_head():
            return pretrained.restore_params(
                init_from, self.abstract.params, self.shardings.params, what="init_from"
            )
        body = {k: v for k, v in self.abstract.params.items() if k != "score"}
        shardings = {k: v for k, v in self.shardings.params.items() if k != "score"}
        params, from_step = pretrained.restore_params(
            init_from, body, shardings, "init_from", partial=True
        )

        def score(r):
            zeros = jnp.zeros((1, 1), jnp.int32)
            return flax.linen.unbox(self.model.init(r, zeros)["params"])["score"]

        params["score"] = jax.jit(score, out_shardings=self.shardings.params["score"])(rng)
        return params, from_step

    def _trained_from_init(self):
        """With LoRA, `init_from`'s values of the parameters that train beside the adapters (a
        reward model's score head, when `init_from` is a reward model), or None: they start
        fresh (none there, or a new head on a language model's body: `_new_head`)."""
        beside, _ = lora.split(self.abstract.params)  # what trains, less the adapters
        if not beside or self._new_head():
            return None
        shardings, _ = lora.split(self.shardings.params)
        start, _ = pretrained.restore_params(
            self.c.init_from, beside, shardings, "init_from", partial=True
        )
        log.info("%s trained beside the adapters from %s", sorted(beside), self.c.init_from)
        return start

    def _frozen_base(self):
        """LoRA's base, read from `init_from` onto its shardings (None without LoRA): every
        parameter but those that train (a reward model's base: the body, without whichever
        head `init_from` has)."""
        if self.abstract.frozen is None:
            return None
        if self.model.execution.weight_quantization == "none":
            base, _ = pretrained.restore_params(
                self.c.init_from, self.abstract.frozen, self.shardings.frozen, "init_from",
                partial=True,
            )  # fmt: skip
            return base
        # Quantized: read as the float weights the checkpoint holds (in bfloat16), then
        # quantized on the mesh one matrix at a time, each float matrix let go once quantized
        # (so that the float base and the quantized one never exist whole at once).
        kind = self.model.execution.weight_quantization
        plain = self.model.clone(execution=self.model.execution.replace(weight_quantization="none"))
        boxed = lora.split(abstract_params(plain), self._trained)[0]
        base, _ = pretrained.restore_params(
            self.c.init_from, _frozen_abstract(boxed, "bfloat16"),
            sharding.tree_shardings(boxed, self.mesh), what="init_from", partial=True,
        )  # fmt: skip

        def visit(tree, shardings):  # empties `tree` (the restored dicts) as it goes
            out = {}
            while tree:
                name, value = tree.popitem()
                if isinstance(value, Mapping):
                    out[name] = visit(value, shardings[name])
                elif name in quantization.AXES:
                    quantize = jax.jit(
                        partial(quantization.quantize_matrix, name=name, quantization=kind),
                        out_shardings=(shardings[name], shardings[f"{name}_scale"]),
                    )
                    out[name], out[f"{name}_scale"] = quantize(value)
                else:
                    out[name] = value
                del value
            return out

        with sharding.use_mesh(self.mesh):
            return visit(base, self.shardings.frozen)

    def run_meta(self) -> dict:
        """What a checkpoint records about how its parameters relate to others: a LoRA run's
        base, a DPO run's reference (`pretrained.base_fingerprint`: their path, step and
        content, the digests recorded of their parameters), so that a resume notices another
        model put in their place."""
        meta = {}
        if self.abstract.frozen is not None:
            meta["lora_base"] = pretrained.base_fingerprint(self.c.init_from)
        if self.abstract.reference is not None:
            meta["dpo_reference"] = pretrained.base_fingerprint(self.c.init_from)
        return meta


def objective(c: ml_collections.ConfigDict) -> step.LossFn:
    """The loss a run minimizes: next-token prediction (pretraining, continued training, SFT),
    a reward model's ranking loss on preference pairs, or a language model's DPO on them."""
    if c.data.source == "preference" and experiment.head(c) == "score":
        r = c.reward
        return partial(losses.reward_loss, margins=r.margins, centering=r.centering,
                       pairs_per_row=c.data.pairs_per_row)  # fmt: skip
    if c.data.source == "preference":
        return partial(losses.dpo_objective, beta=c.dpo.beta, pairs_per_row=c.data.pairs_per_row)
    return partial(losses.lm_loss, z_loss=c.train.z_loss)


def build(c: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Everything a training loop over config `c` needs on `mesh`; nothing is allocated."""
    t = c.train
    experiment.check(c)
    check_batch_layout(c, mesh)
    adapters = experiment.lora_config(c)
    model = Llama(experiment.model_config(c), experiment.execution_config(c), adapters)
    tx = optim.make_optimizer(c.optimizer, t.steps)
    schedule = optim.learning_rate_schedule(c.optimizer, t.steps)
    abstract, shardings = state_shardings(
        model, tx, mesh, c.lora.base_dtype, reference=experiment.is_dpo(c) and not adapters
    )
    logical = sharding.mesh_axes(("batch", "length"), (t.batch_size, t.seq_len), mesh)
    batch_sharding = NamedSharding(mesh, logical)
    fields, loss_fn = data_lib.fields(c.data), objective(c)
    batch_shardings = dict.fromkeys(fields, batch_sharding)
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
        in_shardings=(full, batch_shardings, shardings.reference),
        compiler_options=options,
    )
    return Setup(
        c, mesh, model, tx, schedule, abstract, shardings, batch_sharding, fields,
        train_step, eval_step,
    )  # fmt: skip
