"""Tasks (`llamax.tasks`): each built-in task's fields, loss, FLOPs and checks; configs without
a task derive the one llamax inferred before, with a deprecation warning, and resume a run
recorded then; and a fifth task defined in this file alone (a sequence classifier with a
float label per row and its own data) trains, logs its metric, resumes exactly and compiles
ahead of time, with nothing in step, setup, metrics or aot written for it."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import chat_records, load_config

import llamax
from llamax import experiment, losses, metrics, setup, tasks, train
from llamax.metrics import read_metrics

# ----- a fifth task, in this file only -----


class Halves:
    """Rows of one sequence each, padded: its tokens all from the lower or all from the upper
    half of `vocab` (never 0, the padding), its label 1.0 for the upper. A row is a function of
    (seed, split, step, row index) alone, so each process makes its own rows of a batch."""

    def __init__(self, vocab: int, seq_len: int, rows, seed: int, split: str):
        self.vocab, self.seq_len, self.rows = vocab, seq_len, list(rows)
        self.seed, self.split, self.step = seed, 0 if split == "train" else 1, 0

    def __iter__(self):
        return self

    def __next__(self):
        half, rows = self.vocab // 2, len(self.rows)
        batch = {name: np.zeros((rows, self.seq_len), np.int32)
                 for name in ("tokens", "segment_ids", "positions")}  # fmt: skip
        batch["label"] = np.zeros(rows, np.float32)
        for i, row in enumerate(self.rows):
            rng = np.random.default_rng([self.seed, self.split, self.step, row])
            label, length = int(rng.integers(2)), int(rng.integers(self.seq_len // 2, self.seq_len))
            low = 1 if label == 0 else half
            batch["tokens"][i, :length] = rng.integers(low, low + half - 1, length)
            batch["segment_ids"][i, :length] = 1
            batch["positions"][i, :length] = np.arange(length)
            batch["label"][i] = label
        self.step += 1
        return batch

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def classification_loss(params, model, batch, rngs=None):
    """Binary cross-entropy of the score at each row's last token against its 0/1 label,
    summed over rows, and the rows classified right."""
    scores = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"], rngs=rngs)  # fmt: skip
    values, present = losses.segment_last_values(scores, batch["segment_ids"], 1)
    logit, valid, label = values[:, 0], present[:, 0], batch["label"]
    nll = -(label * jax.nn.log_sigmoid(logit) + (1 - label) * jax.nn.log_sigmoid(-logit))
    total = jnp.where(valid, nll, 0.0).sum()
    right = jnp.where(valid, (logit > 0) == (label > 0.5), False).sum().astype(jnp.float32)
    return total, (total, valid.sum().astype(jnp.float32), {"accuracy": right})


class SequenceClassification(tasks.Task):
    name = "classify"
    head = "score"
    shown = ("accuracy",)

    def fields(self, c):
        return {**super().fields(c), "label": tasks.Field.per_row((), "float32")}

    def make_iterator(self, c, split, seq_len, rows):
        return Halves(c.data.markov_states, seq_len, rows, c.data.seed, split)

    def loss(self, c):
        return classification_loss


tasks.register(SequenceClassification())

CLASSIFY = {"task": "classify", "train.steps": 4, "train.log_every": 1, "train.eval_every": 2,
            "train.eval_batches": 1, "checkpoint.every": 2, "optimizer.learning_rate": 1e-2,
            "optimizer.warmup_steps": 0}  # fmt: skip


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("classify") / "run")
    state = train.run(load_config("tiny", **CLASSIFY), workdir)
    return workdir, state


@pytest.mark.slow
def test_a_task_of_ones_own_trains_logs_its_metric_and_resumes_exactly(classified, tmp_path,
                                                                       caplog):  # fmt: skip
    workdir, state = classified
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert all(0 <= r["accuracy"] <= 1 for r in records) and records[-1]["accuracy"] > 0.5
    assert "eval_loss" in records[1] and "eval_loss" in records[3]
    assert records[0]["target_tokens"] == 8  # rows: the loss counts one per sequence
    recorded = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert recorded["task"] == "classify" and recorded["model"]["resolved"]["head"] == "score"

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    with caplog.at_level(logging.INFO, logger="llamax"):
        again = train.run(load_config("tiny", **CLASSIFY), resumed)
    assert "resuming from the checkpoint of step 2" in caplog.text
    line = [m for m in caplog.messages if m.startswith("step 4: loss")]
    assert line and "accuracy" in line[0], caplog.messages

    def values(records):
        return [(r["step"], r["loss"], r["accuracy"], r.get("eval_loss")) for r in records]

    assert values(read_metrics(resumed)) == values(records)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_task_of_ones_own_declares_a_float_label_per_row():
    c = load_config("tiny", **CLASSIFY)
    s = setup.build(c, setup.make_mesh(c))
    batch = s.abstract_batch()
    assert batch["label"].shape == (8,) and batch["label"].dtype == jnp.float32
    assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == jnp.int32
    assert s.model.config.head == "score" and s.task.name == "classify"
    rows = s.task.make_iterator(s.c, "train", 64, s.local_rows())
    local = next(rows)
    with pytest.raises(ValueError, match="no batch field 'label', which task 'classify' reads"):
        s.global_batch({k: v for k, v in local.items() if k != "label"})
    with pytest.raises(ValueError, match=r"batch field 'label': .* \(3,\) float32, task "
                       r"'classify' reads \(\) float32"):  # fmt: skip
        s.global_batch({**local, "label": np.zeros((8, 3), np.float32)})


@pytest.mark.slow
def test_a_task_of_ones_own_compiles_ahead_of_time():
    from llamax import aot

    c = load_config("tiny", **CLASSIFY)
    r = aot.check(c, "v5e-4")
    assert r["compiled"] and r["fits"]
    config = experiment.model_config(c)
    flops = metrics.flops_per_token(config, c.train.seq_len)
    assert r["model_flops_per_step"] == flops * c.train.batch_size * c.train.seq_len


# ----- the built-in tasks -----


def _config(name, **overrides):
    sources = {"lm": "markov", "sft": "chat", "reward": "preference", "dpo": "preference"}
    start = {"init_from": "/a/reference"} if name == "dpo" else {}
    return load_config("tiny", **{"task": name, "data.source": sources[name], **start,
                                  **overrides})  # fmt: skip


@pytest.mark.parametrize(
    "name, extra, head",
    [("lm", (), "lm"), ("sft", ("loss_mask",), "lm"), ("reward", ("rating",), "score"),
     ("dpo", ("loss_mask",), "lm")],
)  # fmt: skip
def test_each_task_declares_the_fields_its_data_gives(name, extra, head, tmp_path,
                                                      tokenizer_path):  # fmt: skip
    """Every field is int32 per position; each is in the batches of the task's data, in its
    shape (the data's other fields are left out of the batch)."""
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records(8)))
    pairs = [{"prompt": f"{i} plus 2?", "chosen": f"{i + 2}", "rejected": "5", "rating": "better"}
             for i in range(8)]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    files = {"sft": "chat.jsonl", "reward": "pairs.jsonl", "dpo": "pairs.jsonl"}
    c = _config(name, **{"data.tokenizer": tokenizer_path, "data.validation_fraction": 0.0})
    if name in files:
        c.data.files = str(tmp_path / files[name])
    task = tasks.get(name)
    fields = task.fields(c)
    assert list(fields) == ["tokens", "segment_ids", "positions", *extra]
    assert set(fields.values()) == {tasks.Field((64,), "int32", ("length",))}
    assert task.head == head and experiment.model_config(c).head == head
    batch = next(task.make_iterator(c, "train", 64, range(2)))
    for field in fields:
        assert batch[field].shape == (2, 64) and batch[field].dtype == np.int32, field


def test_each_task_loss_is_its_objective_with_the_configs_settings():
    c = _config("lm", **{"train.z_loss": 1e-3})
    assert (tasks.get("lm").loss(c).func, tasks.get("lm").loss(c).keywords) == (
        losses.lm_loss, {"z_loss": 1e-3})  # fmt: skip
    assert tasks.get("sft").loss(c).func is losses.lm_loss  # with the batch's loss mask
    c = _config("reward", **{"reward.margins": "large", "reward.centering": 0.01,
                             "data.pairs_per_row": 3})  # fmt: skip
    loss = tasks.get("reward").loss(c)
    assert loss.func is losses.reward_loss
    assert loss.keywords == {"margins": "large", "centering": 0.01, "pairs_per_row": 3}
    c = _config("dpo", **{"dpo.beta": 0.25, "data.pairs_per_row": 2})
    loss = tasks.get("dpo").loss(c)
    assert loss.func is losses.dpo_objective
    assert loss.keywords == {"beta": 0.25, "pairs_per_row": 2}


def test_each_task_counts_its_forward_passes_in_the_flops():
    """A step is a forward and a backward (3 forwards' FLOPs); DPO's runs its reference
    forward too: 4. A reward model's head is one column, not the vocabulary."""
    c = load_config("llama2_7b")
    lm = llamax.LlamaConfig.preset("llama2-7b")
    matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    attention = 2 * 32 * 4096 * 4096  # per forward: 4 * L * T * D, halved (causal)
    forward = 2 * (matmul + 32000 * 4096) + attention
    assert tasks.get("lm").flops_per_token(c, lm) == 3 * forward
    assert tasks.get("sft").flops_per_token(c, lm) == 3 * forward
    assert tasks.get("dpo").flops_per_token(c, lm) == 4 * forward
    rm = lm.replace(head="score")
    assert tasks.get("reward").flops_per_token(c, rm) == 3 * (2 * (matmul + 4096) + attention)


@pytest.mark.parametrize(
    "name, overrides, message",
    [("lm", {"data.source": "chat"}, "task 'lm' reads data.source 'tfds' or 'markov', got "
      "'chat' \\('chat' data is read by task 'sft'\\)"),
     ("sft", {"data.source": "preference"}, "task 'sft' reads data.source 'chat', got "
      "'preference' \\('preference' data is read by task 'dpo' or 'reward'\\)"),
     ("sft", {"model.head": "score"}, "task 'sft' trains a model with the 'lm' head, but "
      "model.head is 'score'"),
     ("reward", {"model.head": "lm"}, "task 'reward' trains a model with the 'score' head"),
     ("reward", {"reward.margins": "huge"}, "reward.margins must be one of"),
     ("reward", {"reward.centering": -1.0}, "reward.centering must be a finite number >= 0"),
     ("dpo", {"init_from": ""}, "task 'dpo' starts from its reference model: set init_from"),
     ("dpo", {"dpo.beta": 0.0}, "dpo.beta must be a finite number > 0"),
     ("lm", {"task": "grpo"}, "task must be one of \\(.*'dpo', 'lm', 'ppo', 'ppo_value', "
      "'reward', 'sft'\\), got 'grpo'")],
)  # fmt: skip
def test_each_task_checks_its_config(name, overrides, message):
    c = _config(name, **overrides)
    with pytest.raises(ValueError, match=f"Invalid experiment config: .*{message}"):
        experiment.check(c)


def test_a_wrong_task_is_refused_before_anything_is_written(tmp_path):
    c = load_config("tiny", **{"task": "reward"})
    with pytest.raises(ValueError, match="task 'reward' reads data.source 'preference'"):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_what_a_resume_may_not_change_is_the_tasks():
    """init_from is a LoRA run's base and DPO's reference: a change alters the run; for a
    full fine-tuning it only started the run, and may change."""
    assert tasks.get("lm").fixed_on_resume(_config("lm")) == ()
    assert tasks.get("lm").fixed_on_resume(_config("lm", **{"lora.rank": 4})) == ("init_from",)
    assert tasks.get("dpo").fixed_on_resume(_config("dpo")) == ("init_from",)
    assert tasks.get("dpo").fixed_on_resume(_config("dpo", **{"lora.rank": 4})) == ("init_from",)
    for name, altering in (("sft", False), ("dpo", True)):
        c = _config(name)
        recorded = json.loads(c.to_json_best_effort())
        c.init_from = "/another/start"
        altered, free = experiment.changes(recorded, c)
        change = f"init_from: {recorded['init_from']!r} -> '/another/start'"
        assert (change in altered, change in free) == (altering, not altering)


def test_the_models_beside_are_the_tasks(tmp_path):
    """DPO keeps its reference beside the trained model (a frozen copy of init_from, shaped
    like the trained parameters), none with LoRA (the base with the adapters off)."""
    c = _config("dpo")
    (reference,) = tasks.get("dpo").beside(c).values()
    assert (reference.key, reference.meta, reference.path(c)) == (
        "init_from", "dpo_reference", "/a/reference")  # fmt: skip
    s = setup.build(c, setup.make_mesh(c))
    assert jax.tree.structure(s.abstract.beside["reference"]) == jax.tree.structure(
        s.abstract.params)  # fmt: skip
    assert tasks.get("dpo").beside(_config("dpo", **{"lora.rank": 4})) == {}
    assert tasks.get("lm").beside(_config("lm")) == {}


def test_a_task_name_is_registered_once():
    with pytest.raises(ValueError, match="task 'lm' is already registered as <task 'lm'"):
        tasks.register(type("Mine", (SequenceClassification,), {"name": "lm"})())
    with pytest.raises(ValueError, match="a task needs a name"):
        tasks.register(type("Nameless", (SequenceClassification,), {"name": ""})())


# ----- configs without a task -----


@pytest.mark.parametrize(
    "source, head, derived",
    [("markov", None, "lm"), ("tfds", None, "lm"), ("chat", None, "sft"),
     ("preference", "score", "reward"), ("preference", None, "dpo"),
     ("preference", "lm", "dpo")],
)  # fmt: skip
def test_a_config_without_a_task_derives_it_as_before_and_says_so(source, head, derived,
                                                                  caplog):  # fmt: skip
    c = load_config("tiny", **{"task": "", "data.source": source, "model.head": head})
    assert experiment.task_name(c) == derived
    with caplog.at_level(logging.WARNING, logger="llamax"):
        resolved = experiment.resolve_task(c)
    assert resolved.task == derived and c.task == ""  # a copy
    (warning,) = [m for m in caplog.messages if "states no task" in m]
    assert f"task {derived!r} derived from data.source {source!r}" in warning
    assert f"deprecated: set c.task = {derived!r}" in warning
    assert f"--config.task={derived}" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llamax"):
        assert experiment.resolve_task(resolved) is resolved
    assert not caplog.messages


@pytest.mark.slow
def test_a_run_recorded_before_tasks_resumes_with_a_config_without_one(tiny_run, tmp_path,
                                                                       caplog):  # fmt: skip
    """tiny_run's config.json without its task (as a run before this change recorded it),
    resumed from its step 1 by a config without a task: the same step 2, bit for bit, and
    its config.json now states the task. A task stated equal is no change; another is."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "2"))
    path = os.path.join(run, "config.json")
    recorded = json.loads(open(path).read())
    assert recorded.pop("task") == "sft"
    with open(path, "w") as f:
        json.dump(recorded, f)
    c = load_config("tiny", **{"task": "", "model.vocab_size": 600})
    for section in ("data", "train", "checkpoint"):
        c[section].update(recorded[section])
    c.init_from = recorded["init_from"]
    assert experiment.changes(recorded, c) == ([], [])
    stated = experiment.resolve_task(c)
    assert experiment.changes(recorded, stated) == ([], [])
    stated.task = "lm"
    assert experiment.changes(recorded, stated)[0] == ["task: 'sft' -> 'lm'"]

    with caplog.at_level(logging.INFO, logger="llamax"):
        train.run(c, run)
    assert "task 'sft' derived from data.source 'chat'" in caplog.text
    assert "resuming from the checkpoint of step 1" in caplog.text
    assert "accepted" not in caplog.text
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(tiny_run)]
    assert json.loads(open(path).read())["task"] == "sft"


def test_every_recipe_states_its_task():
    recipes = {
        "llama2_recipe": ("lm", ("llama2-7b", 3e-4)),
        "context_extension_recipe": ("lm", ("llama2-7b", 16384)),
        "chat_sft_recipe": ("sft", ("llama2-7b",)),
        "lora_recipe": ("sft", ("llama2-7b", 8, 16.0, "wq,wv")),
        "reward_recipe": ("reward", ("llama2-7b",)),
        "dpo_recipe": ("dpo", ("llama2-7b",)),
    }
    for recipe, (task, args) in recipes.items():
        c = getattr(experiment, recipe)(*args)
        assert c.task == task, recipe
        # What llamax inferred from the data and the head before: the same task.
        assert experiment.derive_task(c.data.source, experiment.head(c)) == task, recipe
    assert experiment.model_config(experiment.reward_recipe("llama2-7b")).head == "score"
