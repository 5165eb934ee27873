"""A training loop's mechanics, for any trainer: `Loop` holds the workdir (its check and its
lock), the state a run starts from (`llamax.state`: resumed or new), checkpoint cadence and
saves with the data position, the metrics' bookkeeping (`llamax.metrics.TrainLog`: the
console lines, the progress bar, `metrics.jsonl` and TensorBoard, uploaded with each
checkpoint), held-out evaluations, preemption, and the check that no non-finite step is saved;
`supervise` runs a trainer under the cluster's watchdog and says how it ended.

A trainer is its step and nothing else (big_vision's shape); `llamax.train.run` is the
supervised one:

    with loop.Loop(c, workdir) as lp:
        s = setup.build(c, setup.make_mesh(c))
        batches = s.task.make_iterator(c, "train", c.train.seq_len, s.local_rows())
        state = lp.start(s, batches)
        for step in lp.steps():
            state, metrics = s.train_step(state, s.global_batch(next(batches)))
            lp.step_done(step, state, metrics)

A step that is several updates (PPO's rollout, score and k updates; a rejection-sampling
round) is the same loop with another body: `lp.step_done` counts the trainer's steps (what
checkpoints are numbered by and a resume restarts after), whatever `state.step` counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections

from llamax import checkpoint, cluster, experiment, fs, lock, metrics, state
from llamax import data as data_lib
from llamax.setup import Setup
from llamax.step import TrainState

log = logging.getLogger("llamax")
TOKENIZED = ("tfds", "chat", "preference", "prompts")  # the sources read through data.tokenizer
# What a training run writes into its workdir (and nothing else may be there without a
# run's config.json).
RUN_ENTRIES = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model",
               lock.NAME)  # fmt: skip
# A held-out evaluation: the state -> the scalars of its record ({"eval_loss": ...}).
Evaluation = Callable[[TrainState], Mapping[str, float]]


class Loop:
    """One training run's mechanics in `workdir`, around a trainer's steps. Entered, it has
    checked the workdir (`check_workdir`) and holds its lock; `start` gives the state to train
    from; `steps` the step numbers still to run; `step_done` after each does the bookkeeping,
    the held-out evaluation, the saves, and stops at a preemption. On leaving, the last save is
    waited for (or, after an error, let finish without raising), and the lock released."""

    def __init__(self, c: ml_collections.ConfigDict, workdir: str):
        self.c, self.workdir = c, workdir
        self.saves: checkpoint.Checkpoints | None = None
        self.log: metrics.TrainLog | None = None
        self.preemption: checkpoint.PreemptionWatcher | None = None
        self.stopped = False

    def __enter__(self) -> Loop:
        check_workdir(self.workdir)  # before anything is written to it
        with contextlib.ExitStack() as stack:
            stack.enter_context(fs.no_empty_directory_on_error(self.workdir))
            # One writer: a second run on this workdir is refused here, naming this one.
            self.held = stack.enter_context(lock.workdir(self.workdir))
            self._stack = stack.pop_all()
        return self

    def start(
        self,
        s: Setup,
        data,
        evaluate: Evaluation | None = None,
        tokens_per_step: int | None = None,
        others: Mapping[str, Setup] | None = None,
    ) -> TrainState:
        """The state to train from (`llamax.state.restore_or_init`: a resume sets `data`, the
        trainer's iterator, to its saved position), once the resume is known to fit the
        workdir's recorded config (`check_resume`); then the config is recorded, and the
        log and the preemption watcher start. `evaluate`: the held-out evaluation run every
        `train.eval_every` steps and at the last; `tokens_per_step`: what a step trains on,
        for tokens/s and MFU (default: one global batch); `others`: the setups of models
        trained beside the run's own (PPO's value model), by name, whose starting states are
        then `self.others` (resumed from the same checkpoint, or new), saved with each
        checkpoint (`step_done`'s `others`)."""
        c = self.c
        self.setup, self.data, self.evaluate = s, data, evaluate
        self.other_setups = dict(others or {})
        self.tokens_per_step = tokens_per_step or c.train.batch_size * c.train.seq_len
        self.saves = checkpoint.Checkpoints(fs.join(self.workdir, "checkpoints"), c.checkpoint,
                                            tuple(self.other_setups))  # fmt: skip
        check_resume(c, self.workdir, self.saves)
        train_state, meta = state.restore_or_init(s, self.saves, data)
        self.others = {name: state.restore_or_init_other(o, self.saves, name, meta)
                       for name, o in self.other_setups.items()}  # fmt: skip
        write_config(c, self.workdir)
        self.done = int(meta.get("step", self.saves.latest_step() or 0))
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.resolved = json.loads(c.to_json_best_effort())
        self.log = metrics.TrainLog(self.workdir, s, self.done, self.tokens_per_step)
        self.preemption = checkpoint.PreemptionWatcher()
        return train_state

    def steps(self) -> Iterator[int]:
        """The numbers of the steps still to run, up to `train.steps`; none after a
        preemption's save."""
        for step in range(self.done + 1, self.c.train.steps + 1):
            if self.stopped:
                return
            yield step

    def step_done(self, step: int, train_state: TrainState, step_metrics: dict,
                  others: Mapping[str, TrainState] | None = None) -> None:  # fmt: skip
        """After step `step` gave `train_state` (and the states of the models trained beside,
        `others`) and its `step_metrics` (device values, not waited for): queued for the log;
        at a log or save step fetched and checked (a non-finite step raises before it can be
        saved), logged with the held-out evaluation when one is due, and saved with the data
        position; at a preemption, saved, and the loop stops."""
        t, every = self.c.train, self.c.checkpoint.every
        self.done = step
        self.tokens_seen += self.tokens_per_step
        self.log.add(step, step_metrics)
        self.saves.raise_if_failed()  # a save in the background failed: stop now
        preempted = self.preemption.reached(step)
        last = step == t.steps or preempted
        save_now = bool(every and step % every == 0) or last
        eval_now = self.evaluate is not None and t.eval_every > 0
        eval_now = eval_now and (step % t.eval_every == 0 or last)
        log_now = bool(t.log_every and step % t.log_every == 0) or last or eval_now
        if save_now or log_now:  # else the metrics stay on the device
            # A NaN step raises here, before it can be saved.
            latest = self.log.fetch(resume_from=self.saves.saving or self.saves.good)
            if save_now:  # the save before this one is done, or its failure raised
                self.saves.finish_saving()
            if log_now:
                self.log.write(step, latest, self.evaluate(train_state) if eval_now else None)
            if save_now:
                self.save(step, train_state, others)
        if preempted:
            log.warning("preempted: saved the checkpoint of step %d; exiting", step)
            self.stopped = True

    def stop_early(
        self,
        step: int,
        train_state: TrainState,
        others: Mapping[str, TrainState] | None = None,
        why: str = "",
    ) -> None:
        """Ends the run after step `step` (a trainer's early stopping): its state saved, unless
        this step's save is already written or in flight, and no step after it. A rerun
        resumes from it and trains on to `train.steps`."""
        if self.log.pending:
            self.log.write(step, self.log.fetch(resume_from=self.saves.saving or self.saves.good))
        if step not in (self.saves.saving, self.saves.good):
            self.saves.finish_saving()
            self.save(step, train_state, others)
        log.info("stopped after step %d: %s", step, why)
        self.stopped = True

    def save(self, step: int, train_state: TrainState,
             others: Mapping[str, TrainState] | None = None) -> None:  # fmt: skip
        """The checkpoint of `step`: the state (and those of the models trained beside), the
        data position, and the run's facts (its config, tokens seen, the models it was
        trained with: `llamax.state.run_meta`, the others' under their names)."""
        if set(others or {}) != set(self.other_setups):
            raise ValueError(f"a checkpoint of this run holds the models "
                             f"{sorted(self.other_setups)} beside its own, given "
                             f"{sorted(others or {})}")  # fmt: skip
        lock.check(self.held)  # still this run's workdir (object storage)
        # The metrics up to this step reach the workdir (on object storage, an upload)
        # before the checkpoint does, so none are lost by a kill.
        self.log.flush()
        meta = {"step": step, "tokens_seen": self.tokens_seen, "config": self.resolved,
                **state.run_meta(self.setup),
                **{name: state.run_meta(o) for name, o in self.other_setups.items()}}  # fmt: skip
        self.saves.save(step, train_state, self.data.get_state(), meta, others)

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._close(failed=kind is not None)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.__exit__(kind, error, traceback)
        return False

    def _close(self, failed: bool) -> None:
        """The last save waited for (after an error: let finish, never raising), the watcher
        and the log closed, and on success the run's summary logged."""
        try:
            if self.saves is not None and failed:
                self.saves.abandon()
            elif self.saves is not None:
                try:
                    self.saves.close()
                except BaseException:
                    self.saves.abandon()
                    raise
        finally:
            if self.preemption is not None:
                self.preemption.close()
            if self.log is not None:
                self.log.close()
        if not failed and self.log is not None:
            self.log.summarize()


def supervise(trainer: Callable[[], Any], heartbeat_timeout: float,
              prog: str = "llamax-train") -> tuple[int, str | None]:  # fmt: skip
    """Runs `trainer()` with the cluster's watchdog (`llamax.cluster.Watchdog`, which names a
    lost peer and exits): (0, None) when it returns; (2, the error) for bad input (a config,
    a workdir, data: `ValueError`, `OSError`); (1, the error) when training stopped (a
    non-finite step, a checkpoint not written or corrupt); an error of a collective whose
    peer is gone waits for the watchdog's verdict, else is (1, the error). Anything else is
    raised as it is."""
    watchdog = cluster.Watchdog(heartbeat_timeout, prog).start()
    try:
        trainer()
    except (ValueError, OSError) as e:  # bad input; a missing or unwritable path
        return 2, str(e)
    except (FloatingPointError, checkpoint.CheckpointError) as e:
        return 1, str(e)
    except Exception as e:
        if not watchdog.watching:
            raise
        watchdog.wait_for_verdict()
        return 1, f"{type(e).__name__}: {e}"
    watchdog.stop()
    return 0, None


def check_workdir(workdir: str) -> None:
    """A workdir is new, empty, or a llamax training run's; anything else (a converted
    checkpoint, a Hugging Face or Meta model, another program's files) is refused before a
    file is written, so that mixing up `--workdir` and `--config.init_from` loses nothing."""
    if not fs.exists(workdir):
        return
    if not fs.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    entries = set(fs.listdir(workdir))
    recorded = None
    if "config.json" in entries:
        try:
            recorded = fs.read_json(fs.join(workdir, "config.json"))
        except (ValueError, OSError):
            recorded = None
    if isinstance(recorded, dict) and {"model", "train", "checkpoint"} <= set(recorded):
        return  # an earlier run's: resumed, or refused later if it does not fit
    if "config.json" not in entries and entries <= set(RUN_ENTRIES):
        return  # empty, or a run stopped before it wrote its config.json
    if "manifest.json" in entries or isinstance(recorded, dict) and "dim" in recorded:
        what = "a converted llamax checkpoint"
    elif isinstance(recorded, dict) and "model_type" in recorded:
        what = "a Hugging Face model directory"
    elif "params.json" in entries:
        what = "a Meta checkpoint"
    else:
        what = f"not a llamax training run (it holds {sorted(entries)[:5]})"
    raise ValueError(
        f"--workdir {workdir} is {what}; nothing was written to it. A workdir is a new or "
        "empty directory, or an earlier run's to resume. To train from these weights, pass "
        f"--config.init_from={workdir} and a new --workdir."
    )


def check_resume(c: ml_collections.ConfigDict, workdir: str, saves) -> None:
    """Resuming with a config that alters the run (the task, the model, the schedule, the
    optimizer, the batches) is refused, listing the changes, unless `train.accept_changes`;
    other changes are logged."""
    path = fs.join(workdir, "config.json")
    if saves.latest_step() is None or not fs.exists(path):
        return
    recorded = fs.read_json(path)
    altering, free = experiment.changes(recorded, c)
    for change in free:
        log.info("resuming with %s", change)
    if altering and not c.train.accept_changes:
        raise ValueError(
            f"The run in {workdir} was configured differently (its config.json); resuming "
            f"would change {'; '.join(altering)}. Rerun with --config.train.accept_changes="
            "true to continue with the new values, or give a new --workdir."
        )
    for change in altering:
        log.warning("resuming with %s (accepted)", change)


def first_batch(iterator) -> None:
    """Makes the iterator's first batch and rewinds it: data that gives none (every record
    skipped, an empty split) stops the run before anything is written."""
    start = iterator.get_state()
    next(iterator)
    iterator.set_state(start)


def check_data(c: ml_collections.ConfigDict, s: Setup, workdir: str) -> None:
    """The data fits the model: its ids the vocabulary, its tokenizer the one the model was
    trained with (`check_tokenizer`), its rows the context (a warning)."""
    check_tokenizer(c, workdir)
    data_vocab, model_vocab = data_lib.vocab_size(c.data), s.model.config.vocab_size
    if data_vocab > model_vocab:
        raise ValueError(
            f"The data's tokenizer has {data_vocab} ids, more than the model's vocab_size "
            f"({model_vocab}): when training from scratch, set --config.model.vocab_size="
            f"{data_vocab} (or more); when continuing a model's training, use the tokenizer it "
            "was trained with"
        )
    if c.train.seq_len > s.model.config.max_seq_len:
        log.warning(
            "train.seq_len %d is longer than the model's max_seq_len %d: positions beyond it "
            "are outside what the model is meant for (set model.max_seq_len, or a "
            "model.rope_scaling to extend the context)", c.train.seq_len,
            s.model.config.max_seq_len,
        )  # fmt: skip


def check_tokenizer(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`data.tokenizer` must be the tokenizer of what the run continues: the `tokenizer.model`
    an earlier run recorded in this workdir, and `init_from`'s. Another file gives other ids
    for the same text, and the model would train on what it reads as noise."""
    if c.data.source not in TOKENIZED or not c.data.tokenizer:
        return
    mine = fs.expand(c.data.tokenizer)
    for what, path in (("this workdir's earlier run", workdir), ("init_from", c.init_from)):
        own = fs.join(fs.expand(path), "tokenizer.model") if path else None
        if own is None or not fs.isdir(fs.expand(path)):
            continue
        if not fs.exists(own):
            if what == "init_from":
                log.warning("init_from %s keeps no tokenizer.model: data.tokenizer %s cannot "
                            "be checked against the model's", path, mine)  # fmt: skip
            continue
        if fs.sha256(own) != fs.sha256(mine):
            raise ValueError(
                f"data.tokenizer {mine} is not the tokenizer of {what} ({own} differs): the "
                "same text would become other ids. Use --config.data.tokenizer="
                f"{own}, or train from scratch with this tokenizer"
            )


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`workdir/config.json`: the resolved config (its task stated), its `model.resolved` the
    architecture that `llamax.load_pretrained` reads; and a copy of the data's tokenizer as
    `tokenizer.model`, which `llamax-generate` and `llamax-eval` use. Written atomically by
    process 0."""
    if jax.process_index() != 0:
        return
    resolved = json.loads(c.to_json_best_effort())
    resolved["task"] = experiment.task_name(c)
    resolved["model"]["resolved"] = experiment.model_config(c).to_dict()
    fs.write_json(fs.join(workdir, "config.json"), resolved, indent=2, sort_keys=True)
    if c.data.source in TOKENIZED and c.data.tokenizer:
        fs.copy_file(fs.expand(c.data.tokenizer), fs.join(workdir, "tokenizer.model"))
