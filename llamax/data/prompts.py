"""Prompts for PPO's rollouts (`data.source = "prompts"`): JSON records, one per line of
`.jsonl(.gz)` files (`data.files`, a `data.validation_fraction` held out for the held-out
reward) or the examples of a prepared tfds dataset, each a `prompt` (a question, or a dialog
ending with the user's turn) and optionally `is_safety` (true for a prompt of the safety set:
Llama 2's PPO then scores its answers with the safety reward model):

    {"prompt": "What is the code of Oslo?"}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ...}],
     "is_safety": true}

`PromptStream` yields them in a shuffled order, a new order each epoch (from `data.seed` and
the epoch), tokenized as Meta's chat format awaits the answer (`chat_format.dialog_tokens`).
Its state is (epoch, position), so a resumed run draws the prompts an uninterrupted one would
have. Every process reads the same prompts: rollouts are generated on the whole mesh, by
every process alike. A bad record (not JSON, no prompt, roles out of order, `is_safety` not
true, false or null) or a prompt longer than `max_tokens` is skipped, counted by reason and
logged the first time each reason occurs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from llamax.data import chat_format, preference
from llamax.data import records as records_lib
from llamax.data.records import BadRecord

log = logging.getLogger("llamax")


@dataclasses.dataclass(frozen=True)
class Prompt:
    tokens: list[int]  # the chat format's tokens, BOS first, awaiting the answer
    is_safety: bool
    index: int  # the record's index in the split


def prompt_record(record, tokenizer, max_tokens: int, index: int = 0) -> Prompt:
    """One record (parsed or its JSON line) as a `Prompt`; `BadRecord` otherwise."""
    record = records_lib.parse(record)
    if "prompt" not in record:
        raise BadRecord("malformed", 'a record needs a "prompt"')
    safety = record.get("is_safety")
    if safety is not None and not isinstance(safety, bool):
        raise BadRecord("malformed", f"is_safety must be true, false or null, got {safety!r}")
    messages = preference.prompt_messages(record["prompt"])
    tokens = chat_format.dialog_tokens(messages, tokenizer)[0]
    if len(tokens) > max_tokens:
        raise BadRecord("too long", f"too long: {len(tokens)} tokens, more than {max_tokens}")
    return Prompt(tokens, bool(safety), index)


class PromptStream:
    """The prompts of `records` (a split) in a shuffled order per epoch, `take(n)` at a time,
    with `get_state` / `set_state` for checkpoints."""

    def __init__(
        self, records: Sequence, tokenizer, max_tokens: int, seed: int, name: str = "data: prompts"
    ):
        if not len(records):
            raise ValueError(f"{name}: no records")
        self.records, self.tokenizer, self.max_tokens = records, tokenizer, max_tokens
        self.seed, self.name = seed, name
        self.epoch, self.position = 0, 0
        self.skipped: collections.Counter = collections.Counter()
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def take(self, n: int) -> list[Prompt]:
        """The next `n` usable prompts (across epochs)."""
        out, tried = [], 0
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            index = int(self._order[self.position])
            self.position += 1
            tried += 1
            try:
                out.append(
                    prompt_record(self.records[index], self.tokenizer, self.max_tokens, index)
                )
            except BadRecord as e:
                if not self.skipped[e.reason]:
                    where = records_lib.where(self.records, index)
                    log.warning(
                        "%s: skipping %s (%s; each such record is skipped and counted)",
                        self.name,
                        where,
                        e,
                    )
                self.skipped[e.reason] += 1
                if tried >= len(self.records) and not out:
                    reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
                    raise ValueError(
                        f"{self.name}: no usable prompt in its {len(self.records)} "
                        f"records (skipped: {reasons})"
                    ) from None
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
