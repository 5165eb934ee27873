"""The loop's mechanics (`llamax.loop`) host a trainer other than the supervised one: a step of
two updates on two batches (the shape of PPO's rollout, score and k updates) is its own short
trainer, and resumes exactly; `supervise` turns how a trainer ended into an exit code."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import load_config

from llamax import checkpoint, lock, loop, setup, sharding, train
from llamax.metrics import read_metrics

# A constant learning rate: a step's updates do not depend on how many steps the schedule has.
RUN = {"train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 2,
       "optimizer.warmup_steps": 0, "optimizer.end_learning_rate_ratio": 1.0}  # fmt: skip


def two_updates(c, workdir):
    """A trainer whose step is two optimizer updates, each on a batch of its own."""
    with loop.Loop(c, workdir) as lp:
        s = setup.build(c, setup.make_mesh(c))
        batches = s.task.make_iterator(c, "train", c.train.seq_len, s.local_rows())
        tokens = 2 * c.train.batch_size * c.train.seq_len
        state = lp.start(s, batches, tokens_per_step=tokens)
        with sharding.use_mesh(s.mesh):
            for step in lp.steps():
                for _ in range(2):
                    state, metrics = s.train_step(state, s.global_batch(next(batches)))
                lp.step_done(step, state, metrics)
    return state


@pytest.mark.slow
def test_a_trainer_of_two_updates_a_step_resumes_exactly(tmp_path):
    """4 steps of two updates are the supervised trainer's 8 (its losses at steps 2, 4, 6, 8,
    its parameters); stopped after the checkpoint of step 2 and rerun, the same run bit for
    bit: the step count, the optimizer's state and the data position are restored."""
    workdir = str(tmp_path / "two")
    state = two_updates(load_config("tiny", **RUN, **{"train.steps": 4}), workdir)
    assert int(state.step) == 8  # optimizer updates; checkpoints count the trainer's steps
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    plain = str(tmp_path / "plain")
    want = train.run(load_config("tiny", **RUN, **{"train.steps": 8}), plain)
    np.testing.assert_array_equal([r["loss"] for r in records],
                                  [r["loss"] for r in read_metrics(plain)][1::2])  # fmt: skip
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    again = two_updates(load_config("tiny", **RUN, **{"train.steps": 4}), resumed)
    assert int(again.step) == 8

    def values(records):
        return [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in records]

    assert values(read_metrics(resumed)) == values(records)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_loop_refuses_a_workdir_before_writing_and_leaves_none_on_error(tmp_path):
    """The workdir is checked and locked on entry; an error inside leaves no empty directory
    and no lock behind, and a second loop on a held workdir is refused."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a llamax training run"):
        with loop.Loop(load_config("tiny"), str(tmp_path)):
            pass
    workdir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="inside"):
        with loop.Loop(load_config("tiny"), str(workdir)):
            assert (workdir / lock.NAME).exists()
            with pytest.raises(lock.Held):
                with loop.Loop(load_config("tiny"), str(workdir)):
                    pass
            raise RuntimeError("inside")
    assert not workdir.exists()


@pytest.mark.parametrize(
    "error, code",
    [(ValueError("bad config"), 2), (OSError("no such file"), 2),
     (FloatingPointError("Step 3 is not finite"), 1),
     (checkpoint.CheckpointError("Writing the checkpoint of step 6 failed"), 1)],
)  # fmt: skip
def test_supervise_says_how_a_trainer_ended(error, code):
    def trainer():
        raise error

    assert loop.supervise(trainer, 5) == (code, str(error))
    assert loop.supervise(lambda: None, 5) == (0, None)
    with pytest.raises(KeyError):  # a bug, not an outcome: raised as it is
        loop.supervise(lambda: {}["x"], 5)
