"""Training: the experiment config, TrainState, train_step, eval_step and the loop.

Setup follows one order: `jax.eval_shape(init)` -> shardings from the logical axis names ->
`jax.jit(init, out_shardings=...)` (the state is born sharded) -> `jax.jit(train_step,
in_shardings, out_shardings, donate_argnums=0)`. On several processes each one builds only
the rows of the global batch that its devices hold and assembles the global array with
`jax.make_array_from_process_local_data`; only process 0 writes files.

Shapes: B global batch, A gradient-accumulation steps, T sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamax import checkpoint, optim, sharding
from llamax import data as data_lib
from llamax import metrics as metrics_lib
from llamax.config import LlamaConfig
from llamax.model import Llama, abstract_params

log = logging.getLogger("llamax")


# ----- the experiment config -----


def default_config() -> ml_collections.ConfigDict:
    """Every key of an experiment config with its default. `configs/*.py` start from this."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    # Any LlamaConfig field overrides the preset; None keeps the preset's value.
    for field in dataclasses.fields(LlamaConfig):
        kind = {
            "rope_scaling": dict,
            "n_kv_heads": int,
            "ffn_dim_multiplier": float,
            "ffn_dim": int,
        }
        c.model[field.name] = ml_collections.config_dict.placeholder(
            kind.get(field.name, type(getattr(LlamaConfig(), field.name)))
        )
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.data = data_lib.default_config()
    c.optimizer = optim.default_config()
    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 8  # global, in sequences, summed over gradient-accumulation steps
    c.train.seq_len = 128
    c.train.grad_accum_steps = 1
    c.train.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables it
    c.train.log_every = 10
    c.train.eval_every = 0  # 0: no periodic eval
    c.train.eval_batches = 4
    c.train.seed = 0  # parameter initialization
    c.train.peak_flops_per_device = 0.0  # for MFU; 0: look the device up in metrics.PEAK_FLOPS
    c.train.progress_bar = True
    c.checkpoint = checkpoint.default_config()
    # A checkpoint (a run's workdir or a converted one) whose parameters start a new run:
    # continued training and fine-tuning. Ignored when the workdir has a checkpoint to resume.
    c.init_from = ""
    return c


def llama2_recipe(preset: str, learning_rate: float) -> ml_collections.ConfigDict:
    """Llama 2's pretraining recipe (Touvron et al. 2023, section 2.2) for a preset: 4,096-token
    context, 4M-token global batches (1,024 sequences as 4 accumulated micro-batches), the
    paper's AdamW and schedule, 2T tokens; bfloat16 compute with full remat, fsdp over every
    chip, C4 English through tfds. `configs/llama2_*.py` set the hardware."""
    c = default_config()
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "tfds"
    c.data.tfds_name = "c4/en:3.1.0"
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 2000
    c.train.steps = 500_000
    c.train.batch_size = 1024
    c.train.seq_len = 4096
    c.train.grad_accum_steps = 4
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    return c


def context_extension_recipe(preset: str, seq_len: int) -> ml_collections.ConfigDict:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595, section 3) for a Llama 2
    preset trained at 4,096 tokens: continued training from converted weights (`init_from`)
    with `linear` rotary scaling by seq_len / 4096, 1,000 steps of 64 sequences of `seq_len`,
    AdamW at 2e-5 (beta2 0.95) after 20 warmup steps, no decay, no weight decay, on the
    pretraining data. Chunked attention and full remat keep the long sequences in memory."""
    c = llama2_recipe(preset, learning_rate=2e-5)
    factor = seq_len / c.train.seq_len
    c.model.rope_scaling = {"rope_type": "linear", "factor": factor}
    c.model.max_seq_len = seq_len
    c.model.attention = "chunked"
    c.optimizer.warmup_steps = 20
    c.optimizer.end_learning_rate_ratio = 1.0  # constant after the warmup
    c.optimizer.weight_decay = 0.0
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.seq_len = seq_len
    c.train.grad_accum_steps = 1
    c.train.eval_every = 200
    c.checkpoint.every = 200
    return c


def model_config(c: ml_collections.ConfigDict) -> LlamaConfig:
    overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
    if "rope_scaling" in overrides:
        overrides["rope_scaling"] = dict(overrides["rope_scaling"])
    return LlamaConfig.preset(c.model.preset, **overrides)


# ----- state, loss and steps -----


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def next_token_loss(logits, tokens, segment_ids, z_loss: float = 0.0):
    """Sums over the valid predictions of the cross-entropy (plus z-loss) and their count.

    Position t predicts token t + 1 when both are in the same segment and it is not padding
    (segment 0): nothing is predicted across a document boundary or into padding.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, log_z - target_logit, 0.0)
    z = jnp.where(valid, log_z**2, 0.0)
    return nll.sum(), z_loss * z.sum(), valid.sum().astype(jnp.float32)


def _sums(params, model, batch, z_loss):
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    nll, z, count = next_token_loss(logits, batch["tokens"], batch["segment_ids"], z_loss)
    return nll + z, (nll, count)


def train_step(
    state: TrainState, batch, *, model, tx, schedule, grad_accum_steps, z_loss, grad_shardings=None
):
    """One optimizer step on the global batch, accumulated over `grad_accum_steps` micro-batches.

    The loss is the mean over every valid target token of the whole global batch, so
    accumulation gives the gradient of one big batch.
    """
    grad_fn = jax.grad(_sums, has_aux=True)
    if grad_accum_steps == 1:
        grads, (nll, count) = grad_fn(state.params, model, batch, z_loss)
    else:
        a = grad_accum_steps

        def split(x):  # micro-batch i takes rows i, i + A, ...: every device keeps its rows
            return x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)  # [A, B/A, T]

        def accumulate(carry, micro):
            g, (nll, count) = grad_fn(state.params, model, micro, z_loss)
            return jax.tree.map(jnp.add, carry, (g, nll, count)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, nll, count), _ = jax.lax.scan(accumulate, init, jax.tree.map(split, batch))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": nll / denom,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "target_tokens": count,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
    _, (nll, count) = _sums(params, model, batch, 0.0)
    return nll, count


# ----- setup -----


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


def init_state(
    model: Llama, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh, params=None
):
    """The train state born sharded (from `params` when given, e.g. for `init_from`), and its
    shardings."""
    _, shardings = state_shardings(model, tx, mesh)

    def init(r, p):
        if p is None:
            p = flax.linen.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    with sharding.use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng, params)
    return state, shardings


def jitted_train_step(c, model, tx, schedule, shardings, batch_sharded: NamedSharding):
    """`train_step` under `jax.jit` with the state's and the batch's shardings, the state
    donated: what the loop runs and what `llamax.aot` compiles for TPU topologies."""
    batch_shardings = dict.fromkeys(("tokens", "segment_ids", "positions"), batch_sharded)
    replicated = NamedSharding(batch_sharded.mesh, PartitionSpec())
    return jax.jit(
        partial(
            train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            grad_accum_steps=c.train.grad_accum_steps,
            z_loss=c.train.z_loss,
            grad_shardings=shardings.params,
        ),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    return NamedSharding(mesh, sharding.mesh_axes(("batch", "length"), (batch_size, seq_len), mesh))


def local_rows(batch_sharded: NamedSharding, batch_size: int, seq_len: int) -> np.ndarray:
    """Indices of the global batch rows held by this process's devices, in order."""
    rows: set[int] = set()
    for index in batch_sharded.addressable_devices_indices_map((batch_size, seq_len)).values():
        rows.update(range(batch_size)[index[0]])
    return np.array(sorted(rows))


def global_batch(local: dict, batch_sharded: NamedSharding, batch_size: int, seq_len: int):
    """The global batch from this process's rows of it."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharded, v, (batch_size, seq_len))
        for k, v in local.items()
    }


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


# ----- the loop -----


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`workdir/config.json`: the resolved config, written atomically by process 0."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    resolved = json.loads(c.to_json_best_effort())
    resolved["model"]["resolved"] = model_config(c).to_dict()
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "config.json"))


def run(c: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains for `c.train.steps` steps; returns the final state."""
    t = c.train
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    check_batch_layout(c, mesh)
    config = model_config(c)
    data_vocab = data_lib.vocab_size(c.data)
    if data_vocab > config.vocab_size:
        raise ValueError(
            f"The data's vocabulary ({data_vocab} ids) does not fit the model's vocab_size "
            f"({config.vocab_size}): use the tokenizer the model was trained with"
        )
    write_config(c, workdir)
    model = Llama(config)
    schedule = optim.learning_rate_schedule(c.optimizer, t.steps)
    tx = optim.make_optimizer(c.optimizer, t.steps)
    batch_sharded = batch_sharding(mesh, t.batch_size, t.seq_len)
    rows = local_rows(batch_sharded, t.batch_size, t.seq_len)
    train_iter = data_lib.make_iterator(c.data, "train", t.seq_len, rows)

    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), c.checkpoint)
    latest = manager.latest_step()
    tokens_seen = 0
    if latest is not None:
        abstract, shardings = state_shardings(model, tx, mesh)
        state, data_state, meta = checkpoint.restore(manager, latest, abstract, shardings)
        train_iter.set_state(data_state)
        tokens_seen = meta.get("tokens_seen", 0)
        log.info("resuming from the checkpoint of step %d in %s", latest, manager.directory)
    elif c.init_from:
        abstract, shardings = state_shardings(model, tx, mesh)
        params, from_step = checkpoint.restore_params(
            c.init_from, abstract.params, shardings.params
        )
        state, shardings = init_state(model, tx, jax.random.key(t.seed), mesh, params)
        log.info("initialized from the parameters of %s (step %d)", c.init_from, from_step)
    else:
        state, shardings = init_state(model, tx, jax.random.key(t.seed), mesh)
    start_step = int(state.step)
    resolved = json.loads(c.to_json_best_effort())
    writer = metrics_lib.MetricsWriter(workdir, start_step=start_step)
    preemption = checkpoint.PreemptionWatcher()

    batch_shardings = dict.fromkeys(("tokens", "segment_ids", "positions"), batch_sharded)
    step_fn = jitted_train_step(c, model, tx, schedule, shardings, batch_sharded)
    eval_fn = jax.jit(
        partial(eval_step, model=model), in_shardings=(shardings.params, batch_shardings)
    )

    num_devices = mesh.devices.size
    flops_token = metrics_lib.flops_per_token(config, t.seq_len)
    peak = metrics_lib.peak_flops_per_device(mesh.devices.flat[0], t.peak_flops_per_device)
    is_main = jax.process_index() == 0
    if is_main:
        log.info(
            "model (%s preset%s): %s parameters; mesh %s over %d devices (%d processes); %s",
            c.model.preset,
            " with overrides" if config != LlamaConfig.preset(c.model.preset) else "",
            f"{config.num_params():,}",
            dict(mesh.shape),
            num_devices,
            jax.process_count(),
            f"{flops_token / 1e9:.3f} GFLOP per token",
        )
    progress = None
    if is_main and t.progress_bar:
        from tqdm import tqdm

        progress = tqdm(
            total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    pending: list[tuple[int, dict]] = []
    timer_start, timer_step = None, start_step
    try:
        with sharding.use_mesh(mesh):
            for step in range(start_step, t.steps):
                done = step + 1
                batch = global_batch(next(train_iter), batch_sharded, t.batch_size, t.seq_len)
                state, step_metrics = step_fn(state, batch)
                pending.append((done, step_metrics))
                if timer_start is None:  # the first step compiles: time from its end
                    jax.block_until_ready(step_metrics)
                    timer_start, timer_step = time.perf_counter(), done
                if progress is not None:
                    progress.update(1)
                tokens_seen += t.batch_size * t.seq_len
                preempted = preemption.reached(done)
                last = done == t.steps or preempted
                save_now = (c.checkpoint.every and done % c.checkpoint.every == 0) or last
                eval_now = t.eval_every > 0 and (done % t.eval_every == 0 or last)
                log_now = done % t.log_every == 0 or last or eval_now
                if not (save_now or log_now):
                    continue
                # Metrics are fetched only here, so the host does not wait on every step; a
                # non-finite loss stops the run before it can reach a checkpoint.
                fetched = jax.device_get(pending)
                pending.clear()
                for at, m in fetched:
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"Loss is {m['loss']} at step {at} (grad norm {m['grad_norm']}): "
                            "stopping. Lower optimizer.learning_rate, raise warmup_steps, or "
                            "use float32 compute to find the cause."
                        )
                if save_now:
                    meta = {"step": done, "tokens_seen": tokens_seen, "config": resolved}
                    checkpoint.save(manager, done, state, train_iter.get_state(), meta)
                if log_now:
                    record = _record(
                        fetched[-1][1],
                        done - timer_step,
                        timer_start,
                        t,
                        flops_token,
                        num_devices,
                        peak,
                    )
                    if eval_now:
                        record["eval_loss"] = evaluate(
                            eval_fn, state.params, c, rows, batch_sharded
                        )
                    writer.write(done, record)
                    if is_main:
                        line = format_record(done, record)
                        progress.write(line) if progress is not None else log.info("%s", line)
                    timer_start, timer_step = time.perf_counter(), done
                if preempted:
                    log.warning("preempted: saved the checkpoint of step %d; exiting", done)
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        preemption.close()
        if progress is not None:
            progress.close()
        writer.close()
    if is_main and writer.enabled and os.path.exists(writer.path):
        log.info("%s", summarize(metrics_lib.read_metrics(workdir)))
    return state


def _record(
    m: dict, steps_timed: int, timer_start: float, t, flops_token, num_devices, peak
) -> dict:
    """The metrics record of a logged step: that step's values and the throughput since the
    last record."""
    elapsed = time.perf_counter() - timer_start
    tokens_per_second = steps_timed * t.batch_size * t.seq_len / elapsed if steps_timed else None
    record = {
        "loss": float(m["loss"]),
        "learning_rate": float(m["learning_rate"]),
        "grad_norm": float(m["grad_norm"]),
        "tokens_per_second": tokens_per_second,
        "tflops_per_device": None,
        "mfu": None,
    }
    if tokens_per_second:
        flops = tokens_per_second * flops_token / num_devices
        record["tflops_per_device"] = flops / 1e12
        record["mfu"] = flops / peak if peak else None
    return record


def format_record(step: int, r: dict) -> str:
    line = f"step {step}: loss {r['loss']:.4f}  lr {r['learning_rate']:.2e}"
    line += f"  grad_norm {r['grad_norm']:.3f}"
    if r["tokens_per_second"]:
        line += f"  {r['tokens_per_second']:,.0f} tokens/s"
    if r["mfu"] is not None:
        line += f"  MFU {100 * r['mfu']:.1f}%"
    if "eval_loss" in r:
        line += f"  eval_loss {r['eval_loss']:.4f}"
    return line


def summarize(records: list[dict]) -> str:
    """One line for the end of a run: how far the loss fell."""
    first, last = records[0], records[-1]
    line = f"trained to step {last['step']}: loss {first['loss']:.4f} (step {first['step']})"
    line += f" -> {last['loss']:.4f}"
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        line += f"; eval loss {evals[0]['eval_loss']:.4f} (step {evals[0]['step']})"
        line += f" -> {evals[-1]['eval_loss']:.4f}"
    return line


def evaluate(eval_fn, params, c, rows, batch_sharded) -> float:
    """Mean loss per target token over the first `train.eval_batches` batches of the
    validation split (the same batches at every eval)."""
    t = c.train
    batches = data_lib.make_iterator(c.data, "validation", t.seq_len, rows)
    nll = count = 0.0
    for _ in range(t.eval_batches):
        batch = global_batch(next(batches), batch_sharded, t.batch_size, t.seq_len)
        n, k = jax.device_get(eval_fn(params, batch))
        nll, count = nll + float(n), count + float(k)
    return nll / max(count, 1.0)
