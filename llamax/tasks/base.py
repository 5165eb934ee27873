"""What a task is, and the registry of tasks by name.

A task is what a run trains (the experiment config's `task`): the trained model's head, the
data it reads and the batch fields that data gives (`Field`: each one's per-row shape and
dtype), the loss the train step differentiates (composed from `llamax.losses`' math), the
models it needs beside the trained one (`Beside`: a frozen reference, reward models; how each
is read and known by its content), its FLOPs per token, the step metrics its log line shows,
its config checks, and the config keys a resumed run may not change. `llamax.setup`, the step,
`llamax.metrics` and `llamax.aot` read all of it from the task, so a task defined anywhere
(registered with `register`) trains, logs and compiles ahead of time as the built-in ones do.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from llamax import data as data_lib
from llamax import metrics
from llamax.config import LlamaConfig
from llamax.step import LossFn


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a batch: each row's `shape` and `dtype`, with the logical axis name of each
    dimension of a row (`"length"`: a sequence's positions, split over the mesh's `context`
    axis; None: whole wherever the row is). A batch holds [batch_size, *shape]."""

    shape: tuple[int, ...]
    dtype: str = "int32"
    axes: tuple[str | None, ...] = ("length",)

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"a field of shape {self.shape} needs one axis name per dimension, "
                             f"got {self.axes}")  # fmt: skip

    @classmethod
    def per_position(cls, seq_len: int, dtype: str = "int32") -> Field:
        """A value at every position of a row (tokens, segment ids, a loss mask)."""
        return cls((seq_len,), dtype, ("length",))

    @classmethod
    def per_row(cls, shape: Sequence[int] = (), dtype: str = "float32") -> Field:
        """Values of the row as a whole (a label; k rewards), not split along the sequence."""
        return cls(tuple(shape), dtype, (None,) * len(shape))


@dataclasses.dataclass(frozen=True)
class Beside:
    """A model a task needs beside the one it trains, given to its loss by name: not trained,
    not checkpointed with the run, read again from its checkpoint (the config key `key` names
    it) at every start and resume, and known by its content: a checkpoint records its
    fingerprint as the meta entry `meta`, and a resume whose checkpoint there now differs is
    refused, naming the model (`what`) and the reason a run keeps it (`rule`)."""

    key: str  # the config key of its checkpoint's path, e.g. "init_from"
    meta: str  # its fingerprint's entry in a checkpoint's meta, e.g. "dpo_reference"
    what: str  # how errors name it, e.g. "DPO reference"
    rule: str  # why a run keeps it, e.g. "a run keeps the reference it started with"
    config: LlamaConfig | None = None  # its architecture; None: the trained model's

    def path(self, c: ml_collections.ConfigDict) -> str:
        """The checkpoint it is read from: the value of `key` in config `c`."""
        node: Any = c
        for part in self.key.split("."):
            node = node[part]
        return node


class Task(abc.ABC):
    """A task: subclass it, set `name` (and `head`, `sources`, `shown`), define `loss`, and
    override what differs from a language model on `data.source` text; then `register` it."""

    name: str = ""
    head: str = "lm"  # the trained model's head (`LlamaConfig.head`)
    sources: tuple[str, ...] = ()  # the `data.source` values it reads; (): any
    shown: tuple[str, ...] = ()  # its step metrics on the log line, after the loss

    def check(self, c: ml_collections.ConfigDict) -> list[str]:
        """The problems of config `c` for this task (empty: none): its data source and the
        model's head, then the task's own settings (subclasses add theirs)."""
        errors = []
        if self.sources and c.data.source not in self.sources:
            readers = [t.name for t in _TASKS.values() if c.data.source in t.sources]
            hint = f" ({c.data.source!r} data is read by task {' or '.join(map(repr, readers))})"
            errors.append(
                f"task {self.name!r} reads data.source {' or '.join(map(repr, self.sources))}, "
                f"got {c.data.source!r}{hint if readers else ''}"
            )
        if c.model.head is not None and c.model.head != self.head:
            errors.append(
                f"task {self.name!r} trains a model with the {self.head!r} head, but model.head "
                f"is {c.model.head!r}: leave model.head unset (the task sets it) or choose the "
                "task that trains that head"
            )
        return errors

    def fields(self, c: ml_collections.ConfigDict) -> dict[str, Field]:
        """What each batch holds: packed sequences' tokens, segment ids and positions."""
        seq = Field.per_position(c.train.seq_len)
        return {"tokens": seq, "segment_ids": seq, "positions": seq}

    def make_iterator(self, c: ml_collections.ConfigDict, split: str, seq_len: int,
                      rows: Sequence[int]):  # fmt: skip
        """This process's rows of each global batch of `split` ("train", "validation"), as
        dicts of numpy arrays [len(rows), *field.shape], with `get_state()` / `set_state()`:
        `llamax.data`'s iterator of `data.source`."""
        return data_lib.make_iterator(c.data, split, seq_len, rows)

    @abc.abstractmethod
    def loss(self, c: ml_collections.ConfigDict) -> LossFn:
        """The loss the train step differentiates (`llamax.step.LossFn`)."""

    def beside(self, c: ml_collections.ConfigDict) -> dict[str, Beside]:
        """The models it needs beside the trained one, by the name its loss takes them as."""
        return {}

    def forwards_per_token(self, c: ml_collections.ConfigDict) -> float:
        """The model's forward passes a train step costs per token, a backward counting as
        two: 3 (forward and backward); more with a model beside it run forward too."""
        return 3

    def flops_per_token(self, c: ml_collections.ConfigDict, config: LlamaConfig) -> float:
        """Model FLOPs of a train step per token (`llamax.metrics.flops_per_token`), for the
        throughput and MFU of the log and of `llamax.aot`."""
        return metrics.flops_per_token(config, c.train.seq_len, self.forwards_per_token(c))

    # The trainer of a run of this task when it is not `llamax.train.run`'s supervised loop
    # (PPO's iterations): "module:function", a `(config, workdir, devices) -> final state`
    # that `llamax.train.run` imports when the run starts (programs sit above tasks).
    trainer: str = ""

    def optimizer_steps(self, c: ml_collections.ConfigDict) -> int:
        """The optimizer updates of the whole run, which the learning-rate schedule spans: one
        per train step (`train.steps`); more where a step is several updates (PPO)."""
        return c.train.steps

    def fixed_on_resume(self, c: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Config keys a resumed run may not change even where others may (`init_from`, once
        it is a LoRA base or names a model beside the trained one)."""
        keys = {b.key for b in self.beside(c).values()}
        if c.lora.rank:
            keys.add("init_from")
        return tuple(sorted(keys))

    def __repr__(self) -> str:
        return f"<task {self.name!r}: {type(self).__module__}.{type(self).__qualname__}>"


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Makes `task` the one `get(task.name)` returns (the config's `task`); the same class
    may register again (a module imported twice), another one under a taken name may not."""
    if not task.name or not isinstance(task.name, str):
        raise ValueError(f"{task!r}: a task needs a name")
    known = _TASKS.get(task.name)
    if known is not None and type(known).__qualname__ != type(task).__qualname__:
        raise ValueError(f"task {task.name!r} is already registered as {known!r}; give "
                         f"{type(task).__qualname__} another name")  # fmt: skip
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """The task registered as `name`."""
    if name not in _TASKS:
        raise ValueError(f"task must be one of {names()}, got {name!r} (a task of your own: "
                         "llamax.tasks.register it before the run)")  # fmt: skip
    return _TASKS[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))
