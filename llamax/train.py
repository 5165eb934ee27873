"""The training loop: `run(config, workdir)` trains, logs, evaluates, checkpoints and resumes.

Everything the loop steps with (mesh, model, optimizer, shardings, jitted steps) comes from
`llamax.setup.build`; the step itself is `llamax.step.train_step` with a task's loss from
`llamax.losses`; checkpoints are `llamax.checkpoint`'s and the bookkeeping of metrics is
`llamax.metrics.TrainLog`. Only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from llamax import checkpoint, experiment, fs, metrics, setup, sharding
from llamax import data as data_lib
from llamax.step import TrainState

log = logging.getLogger("llamax")


def run(c: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains for `c.train.steps` steps; returns the final state."""
    t, every = c.train, c.checkpoint.every
    s = setup.build(c, setup.make_mesh(c, devices))
    check_vocab(c, s)
    write_config(c, workdir)
    rows = s.local_rows()
    train_iter = data_lib.make_iterator(c.data, "train", t.seq_len, rows)
    held_out = HeldOutLoss(s, rows) if t.eval_every > 0 else None
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), c.checkpoint)
    state, meta = s.restore_or_init(manager, train_iter)
    tokens_seen, resolved = meta.get("tokens_seen", 0), json.loads(c.to_json_best_effort())
    train_log = metrics.TrainLog(workdir, s, start_step=int(state.step))
    preemption = checkpoint.PreemptionWatcher()
    try:
        with sharding.use_mesh(s.mesh):
            for done in range(int(state.step) + 1, t.steps + 1):
                state, step_metrics = s.train_step(state, s.global_batch(next(train_iter)))
                tokens_seen += t.batch_size * t.seq_len
                train_log.add(done, step_metrics)
                preempted = preemption.reached(done)
                last = done == t.steps or preempted
                save_now = bool(every and done % every == 0) or last
                eval_now = held_out is not None and (done % t.eval_every == 0 or last)
                log_now = done % t.log_every == 0 or last or eval_now
                if not (save_now or log_now):
                    continue  # metrics stay on the device until a log or save step
                latest = train_log.fetch()  # a non-finite loss raises here, before a save
                if save_now:
                    meta = {"step": done, "tokens_seen": tokens_seen, "config": resolved}
                    checkpoint.save(manager, done, state, train_iter.get_state(), meta)
                if log_now:
                    eval_loss = held_out(state.params) if eval_now else None
                    train_log.write(done, latest, eval_loss)
                if preempted:
                    log.warning("preempted: saved the checkpoint of step %d; exiting", done)
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        preemption.close()
        train_log.close()
    train_log.summarize()
    return state


def check_vocab(c: ml_collections.ConfigDict, s: setup.Setup) -> None:
    data_vocab, model_vocab = data_lib.vocab_size(c.data), s.model.config.vocab_size
    if data_vocab > model_vocab:
        raise ValueError(
            f"The data's vocabulary ({data_vocab} ids) does not fit the model's vocab_size "
            f"({model_vocab}): use the tokenizer the model was trained with"
        )


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`workdir/config.json`: the resolved config, its `model.resolved` the architecture that
    `llamax.load_pretrained` reads; written atomically by process 0."""
    if jax.process_index() != 0:
        return
    resolved = json.loads(c.to_json_best_effort())
    resolved["model"]["resolved"] = experiment.model_config(c).to_dict()
    fs.write_json(os.path.join(workdir, "config.json"), resolved, indent=2, sort_keys=True)


class HeldOutLoss:
    """Mean loss per target token over the first `train.eval_batches` batches of the
    validation split: the same batches at every evaluation, from one iterator built once and
    rewound each time."""

    def __init__(self, s: setup.Setup, rows):
        self.setup, self.num_batches = s, s.c.train.eval_batches
        self.batches = data_lib.make_iterator(s.c.data, "validation", s.c.train.seq_len, rows)
        self.start = self.batches.get_state()

    def __call__(self, params) -> float:
        self.batches.set_state(self.start)
        nll = count = 0.0
        for _ in range(self.num_batches):
            batch = self.setup.global_batch(next(self.batches))
            n, k = jax.device_get(self.setup.eval_step(params, batch))
            nll, count = nll + float(n), count + float(k)
        return nll / max(count, 1.0)
