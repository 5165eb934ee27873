"""`lm`: a language model trained on text (pretraining, continued training, context
extension): next-token prediction on packed documents (`llamax.losses.lm_loss`), from
`data.source` `tfds` (a corpus or a catalog dataset) or `markov` (a synthetic chain)."""

from __future__ import annotations

from functools import partial

import ml_collections

from llamax import losses
from llamax.tasks.base import Task, register


class LanguageModel(Task):
    name = "lm"
    head = "lm"
    sources = ("tfds", "markov")

    def loss(self, c: ml_collections.ConfigDict):
        return partial(losses.lm_loss, z_loss=c.train.z_loss)


TASK = register(LanguageModel())
