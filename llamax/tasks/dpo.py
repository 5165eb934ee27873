"""`dpo`: direct preference optimization of a language model (Rafailov et al. 2023) on
preference pairs (`data.source` `preference`), against a reference model: `init_from`, the
starting policy, read again as a frozen copy beside the trained one (with LoRA there is none:
the base with the adapters off is the reference). Its step metrics are the implicit rewards'
accuracy and margin; a step also runs the reference forward (4 forwards per token, not 3)."""

from __future__ import annotations

from functools import partial

import ml_collections

from llamax import losses
from llamax.tasks.base import Beside, Field, Task, register

REFERENCE = Beside(key="init_from", meta="dpo_reference", what="DPO reference",
                   rule="a run keeps the reference it started with")  # fmt: skip


class DirectPreference(Task):
    name = "dpo"
    head = "lm"
    sources = ("preference",)
    shown = ("reward_accuracy", "reward_margin")

    def check(self, c: ml_collections.ConfigDict) -> list[str]:
        errors = super().check(c)
        if not c.init_from:
            errors.append("task 'dpo' starts from its reference model: set init_from")
        beta = c.dpo.beta
        if not (isinstance(beta, int | float) and 0 < beta < float("inf")):
            errors.append(f"dpo.beta must be a finite number > 0, got {beta!r}")
        return errors

    def fields(self, c: ml_collections.ConfigDict) -> dict[str, Field]:
        return {**super().fields(c), "loss_mask": Field.per_position(c.train.seq_len)}

    def loss(self, c: ml_collections.ConfigDict):
        return partial(losses.dpo_objective, beta=c.dpo.beta, pairs_per_row=c.data.pairs_per_row)

    def beside(self, c: ml_collections.ConfigDict) -> dict[str, Beside]:
        return {} if c.lora.rank else {"reference": REFERENCE}

    def forwards_per_token(self, c: ml_collections.ConfigDict) -> float:
        return 4  # the policy's forward and backward, and the reference's forward


TASK = register(DirectPreference())
