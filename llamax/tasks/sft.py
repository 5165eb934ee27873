"""`sft`: supervised fine-tuning of a language model on chat data (Llama 2-Chat's section
3.1): dialogs and prompt/completion pairs in Meta's chat format, packed whole
(`data.source` `chat`, `llamax.data.chat`), with next-token prediction on the tokens of their
`loss_mask` only (`data.chat_train_on`: the answers, or everything)."""

from __future__ import annotations

import ml_collections

from llamax.tasks.base import Field, register
from llamax.tasks.lm import LanguageModel


class ChatFineTuning(LanguageModel):
    name = "sft"
    sources = ("chat",)

    def fields(self, c: ml_collections.ConfigDict) -> dict[str, Field]:
        return {**super().fields(c), "loss_mask": Field.per_position(c.train.seq_len)}


TASK = register(ChatFineTuning())
