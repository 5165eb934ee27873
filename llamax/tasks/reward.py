"""`reward`: a reward model as Llama 2-Chat's (section 3.2.2): a score head on a language
model's body (from `init_from`, a new head when it is a language model), trained on preference
pairs (`data.source` `preference`: chosen and rejected as two segments, with a rating) with
the ranking loss and its margins by rating (`reward.margins`) and reward centering
(`reward.centering`); its step metrics are the share of pairs ranked right and the mean score
gap."""

from __future__ import annotations

from functools import partial

import ml_collections

from llamax import losses
from llamax.data.ratings import MARGINS
from llamax.tasks.base import Field, Task, register


class RewardModel(Task):
    name = "reward"
    head = "score"
    sources = ("preference",)
    shown = ("accuracy",)

    def check(self, c: ml_collections.ConfigDict) -> list[str]:
        errors = super().check(c)
        if c.reward.margins not in MARGINS:
            errors.append(f"reward.margins must be one of {sorted(MARGINS)}, got "
                          f"{c.reward.margins!r}")  # fmt: skip
        centering = c.reward.centering
        if not (isinstance(centering, int | float) and 0 <= centering < float("inf")):
            errors.append(f"reward.centering must be a finite number >= 0, got {centering!r}")
        return errors

    def fields(self, c: ml_collections.ConfigDict) -> dict[str, Field]:
        return {**super().fields(c), "rating": Field.per_position(c.train.seq_len)}

    def loss(self, c: ml_collections.ConfigDict):
        r = c.reward
        return partial(losses.reward_loss, margins=r.margins, centering=r.centering,
                       pairs_per_row=c.data.pairs_per_row)  # fmt: skip


TASK = register(RewardModel())
