"""The training loop: `run(config, workdir)` trains, logs, evaluates, checkpoints and resumes.

Everything the loop steps with (mesh, model, optimizer, shardings, jitted steps) comes from
`llamax.setup.build`; the step itself is `llamax.step.train_step` with a task's loss from
`llamax.losses`; checkpoints are `llamax.checkpoint`'s and the bookkeeping of metrics is
`llamax.metrics.TrainLog`. Only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import json
import logging

import jax
import ml_collections

from llamax import checkpoint, experiment, fs, lock, metrics, setup, sharding
from llamax import data as data_lib
from llamax.step import TrainState

log = logging.getLogger("llamax")
TOKENIZED = ("tfds", "chat", "preference")  # the data sources read through data.tokenizer


def run(c: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains for `c.train.steps` steps; returns the final state."""
    check_workdir(workdir)  # before anything is written to it
    # One writer: a second run on this workdir is refused here, naming this one.
    with fs.no_empty_directory_on_error(workdir), lock.workdir(workdir) as held:
        t, every = c.train, c.checkpoint.every
        s = setup.build(c, setup.make_mesh(c, devices))
        check_data(c, s, workdir)
        rows = s.local_rows()
        train_iter = data_lib.make_iterator(c.data, "train", t.seq_len, rows)
        held_out = HeldOutLoss(s, rows) if t.eval_every > 0 else None
        # Data that gives no batch fails here, before the run writes anything.
        first_batch(train_iter)
        saves = checkpoint.Checkpoints(fs.join(workdir, "checkpoints"), c.checkpoint)
        check_resume(c, workdir, saves)
        state, meta = s.restore_or_init(saves, train_iter)
        write_config(c, workdir)
        tokens_seen, resolved = meta.get("tokens_seen", 0), json.loads(c.to_json_best_effort())
        train_log = metrics.TrainLog(workdir, s, start_step=int(state.step))
        preemption = checkpoint.PreemptionWatcher()
        try:
            with sharding.use_mesh(s.mesh):
                for done in range(int(state.step) + 1, t.steps + 1):
                    state, step_metrics = s.train_step(state, s.global_batch(next(train_iter)))
                    tokens_seen += t.batch_size * t.seq_len
                    train_log.add(done, step_metrics)
                    saves.raise_if_failed()  # a save in the background failed: stop now
                    preempted = preemption.reached(done)
                    last = done == t.steps or preempted
                    save_now = bool(every and done % every == 0) or last
                    eval_now = held_out is not None and (done % t.eval_every == 0 or last)
                    log_now = bool(t.log_every and done % t.log_every == 0) or last or eval_now
                    if not (save_now or log_now):
                        continue  # metrics stay on the device until a log or save step
                    # A NaN step raises here, before it can be saved.
                    latest = train_log.fetch(resume_from=saves.saving or saves.good)
                    if save_now:  # the save before this one is done, or its failure raised
                        saves.finish_saving()
                    if log_now:
                        eval_loss = held_out(state) if eval_now else None
                        train_log.write(done, latest, eval_loss)
                    if save_now:
                        lock.check(held)  # still this run's workdir (object storage)
                        # The metrics up to this step reach the workdir (on object storage,
                        # an upload) before the checkpoint does, so none are lost by a kill.
                        train_log.flush()
                        meta = {"step": done, "tokens_seen": tokens_seen, "config": resolved,
                                **s.run_meta()}  # fmt: skip
                        saves.save(done, state, train_iter.get_state(), meta)
                    if preempted:
                        log.warning("preempted: saved the checkpoint of step %d; exiting", done)
                        break
            saves.close()
        except BaseException:
            saves.abandon()
            raise
        finally:
            preemption.close()
            train_log.close()
        train_log.summarize()
        return state


# What a training run writes into its workdir (and nothing else may be there without a
# run's config.json).
RUN_ENTRIES = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model",
               lock.NAME)  # fmt: skip


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
    """Resuming with a config that alters the run (the model, the schedule, the optimizer,
    the batches) is refused, listing the changes, unless `train.accept_changes`; other
    changes are logged."""
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


def check_data(c: ml_collections.ConfigDict, s: setup.Setup, workdir: str) -> None:
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
    """`workdir/config.json`: the resolved config, its `model.resolved` the architecture that
    `llamax.load_pretrained` reads; and a copy of the data's tokenizer as `tokenizer.model`,
    which `llamax-generate` and `llamax-eval` use. Written atomically by process 0."""
    if jax.process_index() != 0:
        return
    resolved = json.loads(c.to_json_best_effort())
    resolved["model"]["resolved"] = experiment.model_config(c).to_dict()
    fs.write_json(fs.join(workdir, "config.json"), resolved, indent=2, sort_keys=True)
    if c.data.source in TOKENIZED and c.data.tokenizer:
        fs.copy_file(fs.expand(c.data.tokenizer), fs.join(workdir, "tokenizer.model"))


class HeldOutLoss:
    """Mean loss per target token over the first `train.eval_batches` batches of the
    validation split: the same batches at every evaluation, from one iterator built once and
    rewound each time."""

    def __init__(self, s: setup.Setup, rows):
        self.setup, self.num_batches = s, s.c.train.eval_batches
        self.batches = data_lib.make_iterator(s.c.data, "validation", s.c.train.seq_len, rows)
        self.start = self.batches.get_state()
        first_batch(self.batches)
        self.progress = metrics.show_progress(s.c.train.progress_bar)

    def __call__(self, state) -> float:
        from tqdm import tqdm

        params, reference = self.setup.full_params(state), state.reference

        self.batches.set_state(self.start)
        nll = count = 0.0
        for _ in tqdm(range(self.num_batches), desc="eval", unit="batch", leave=False,
                      disable=not self.progress):  # fmt: skip
            batch = self.setup.global_batch(next(self.batches))
            n, k = jax.device_get(self.setup.eval_step(params, batch, reference))
            nll, count = nll + float(n), count + float(k)
        return nll / max(count, 1.0)
