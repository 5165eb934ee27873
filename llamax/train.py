"""The supervised trainer: `run(config, workdir)` trains the config's task (`llamax.tasks`: a
language model, chat SFT, a reward model, DPO, or one registered elsewhere), one batch per
step, and evaluates it on held-out batches; a task with a trainer of its own (PPO's,
`llamax.ppo_train`) is run by it.

Its loop body is the step, `llamax.step.train_step` with the task's loss, built by
`llamax.setup.build`; everything around it (the workdir and its lock, the starting state,
logging, evaluation hooks, checkpoints with the data position, preemption) is
`llamax.loop.Loop`'s. Only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import importlib

import jax
import ml_collections

from llamax import experiment, loop, metrics, setup, sharding
from llamax.step import TrainState


def run(c: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains for `c.train.steps` steps, resuming the workdir's run if it has one; returns the
    final state."""
    c = experiment.resolve_task(c)
    own = experiment.task(c).trainer
    if own:  # a task with a trainer of its own (PPO)
        module, _, function = own.partition(":")
        return getattr(importlib.import_module(module), function)(c, workdir, devices)
    t = c.train
    with loop.Loop(c, workdir) as lp:
        s = setup.build(c, setup.make_mesh(c, devices))
        loop.check_data(c, s, workdir)
        rows = s.local_rows()
        batches = s.task.make_iterator(c, "train", t.seq_len, rows)
        held_out = HeldOutLoss(s, rows).record if t.eval_every > 0 else None
        # Data that gives no batch fails here, before the run writes anything.
        loop.first_batch(batches)
        state = lp.start(s, batches, evaluate=held_out)
        with sharding.use_mesh(s.mesh):
            for step in lp.steps():
                state, step_metrics = s.train_step(state, s.global_batch(next(batches)))
                lp.step_done(step, state, step_metrics)
    return state


class HeldOutLoss:
    """Mean loss per target token over the first `train.eval_batches` batches of the
    validation split: the same batches at every evaluation, from one iterator built once and
    rewound each time."""

    def __init__(self, s: setup.Setup, rows):
        self.setup, self.num_batches = s, s.c.train.eval_batches
        self.batches = s.task.make_iterator(s.c, "validation", s.c.train.seq_len, rows)
        self.start = self.batches.get_state()
        loop.first_batch(self.batches)
        self.progress = metrics.show_progress(s.c.train.progress_bar)

    def __call__(self, state) -> float:
        from tqdm import tqdm

        params = self.setup.full_params(state)
        self.batches.set_state(self.start)
        nll = count = 0.0
        for _ in tqdm(range(self.num_batches), desc="eval", unit="batch", leave=False,
                      disable=not self.progress):  # fmt: skip
            batch = self.setup.global_batch(next(self.batches))
            n, k = jax.device_get(self.setup.eval_step(params, batch, state.beside))
            nll, count = nll + float(n), count + float(k)
        return nll / max(count, 1.0)

    def record(self, state) -> dict[str, float]:
        """The evaluation's scalars for a step's record: {"eval_loss": ...}."""
        return {"eval_loss": self(state)}
