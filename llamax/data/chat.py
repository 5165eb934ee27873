"""Chat and prompt/completion data for supervised fine-tuning: records in Meta's chat format
with a loss mask per token (`llamax.data.chat_format`), packed into rows, resumable
(`llamax.data.packing`).

Records are JSON objects, one per line of `.jsonl` (or `.jsonl.gz`) files, read in bounded
memory (`records.JsonlRecords`: their lines are indexed in one streaming pass and read when an
example needs them; a line too long for any example that fits a row,
`records.max_record_bytes`, is never read), or the examples of a prepared tfds dataset
(`records.TfdsRecords`: the same fields as features, or one JSON record in a text feature):
a dialog, `{"messages": [...]}` ending with the assistant's turn, or a prompt/completion pair,
`{"prompt": ..., "completion": ...}`. The loss is on the answers (`train_on="answers"`) or
on every token (`"everything"`).

Bad records are skipped, counted by reason and logged with their file and line: a line that
is not UTF-8, not JSON, nested too deeply or not an object, text that is not valid Unicode,
roles out of order or unknown, an empty answer, special tags in the text, a weight other than
0 or 1 or every answer's weight 0 (`chat_format`), a line too long to read, and, with
`too_long="drop"`, an example longer than a row (`too_long="truncate"` keeps its first
`seq_len` tokens, if an answer token is among them). A whole pass over this
process's share of the records with no usable one is an error that counts them by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import grain
import numpy as np

from llamax.data.chat_format import example_tokens
from llamax.data.packing import packed_dataset
from llamax.data.tokenizer import Tokenizer

TRAIN_ON = ("answers", "everything")
TOO_LONG = ("drop", "truncate")


def _chat_example(record, tokenizer: Tokenizer, train_on: str) -> dict[str, np.ndarray]:
    tokens, mask = example_tokens(record, tokenizer, train_on)
    return {"tokens": tokens, "loss_mask": mask}


def make_dataset(
    records: Sequence[bytes],
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    num_epochs: int | None = None,
    train_on: str = "answers",
    too_long: str = "drop",
    name: str = "data",
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows of examples for this process (`shard`: its index,
    the process count), with the fields `tokens`, `segment_ids`, `positions`, `loss_mask`;
    `num_epochs=None` repeats forever; `name` begins the log lines and errors."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.chat_train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"data.chat_too_long must be one of {TOO_LONG}, got {too_long!r}")
    encode = partial(_chat_example, train_on=train_on)
    return packed_dataset(records, tokenizer_path, seq_len, batch_size, seed, shard, num_epochs,
                          encode, too_long, name=name)  # fmt: skip
