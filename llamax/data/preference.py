"""Preference pairs for reward models: a prompt, the response people preferred (`chosen`) and
the other (`rejected`), and optionally how much better it was (`rating`: one of Llama 2's four
levels, `llamax.data.ratings.RATINGS`, by name or index).

Records are JSON objects, one per line of `.jsonl(.gz)` files, or the examples of a prepared
tfds dataset (`records.TfdsRecords`):

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "rating": "better"}
    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                {"role": "assistant", "content": ...}, {"role": "user", "content": ...}],
     "chosen": ..., "rejected": ...}

A prompt is a question or a dialog ending with the user's turn; each response becomes the
assistant's answer to it, formatted by `chat_format.dialog_tokens` (Meta's chat format) and
closed by EOS. A pair is one example of two segments, chosen then rejected, each with
positions from 0: a reward model reads each segment's score at its last token
(`losses.segment_last_values`), so the pair shares a row without either seeing the other.
Fields: `tokens`, `segment_ids`, `positions`; `loss_mask`, 1 on the final answer's tokens and
its EOS (what DPO scores); `rating`, the rating's index + 1 on every token of the pair (0:
none). Pairs are packed whole, at most `pairs_per_row` a row (`packing.PackedExamples`); a
pair longer than a row is skipped and counted (cutting it would move the token its score is
read at).

Bad records are skipped, counted by reason and logged, as chat data's are: a line that is not
UTF-8, not JSON, nested too deeply or not an object, text that is not valid Unicode, a line
longer than any pair that fits a row, a missing or non-string response, an empty response,
identical responses, a prompt whose roles are out of order or that does not end with the
user's turn, an unknown rating, and (Llama 2's safety rule) a pair whose chosen response is
labelled unsafe and whose rejected one safe (`chosen_safe: false, rejected_safe: true`; the
labels are optional and otherwise unused, so one tool trains a helpfulness and a safety
reward model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llamax.data import chat_format, packing
from llamax.data import records as records_lib
from llamax.data.ratings import RATINGS
from llamax.data.records import BadRecord
from llamax.data.tokenizer import Tokenizer

# Rating names: RATINGS' own, and each half of the last one's, by index.
_RATING_ALIASES = {name: i for i, name in enumerate(RATINGS)} | {"negligibly better": 3,
                                                                  "unsure": 3}  # fmt: skip
FIELDS = ("rating",)  # the fields a batch holds beyond chat data's


def rating_index(value: Any) -> int:
    """A record's rating as an index into RATINGS, -1 for none."""
    if value is None:
        return -1
    if isinstance(value, str) and value.strip().lower() in _RATING_ALIASES:
        return _RATING_ALIASES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise BadRecord("rating", f"unknown rating {value!r}; expected one of {list(_RATING_ALIASES)}")


def check_safety_labels(record: dict) -> None:
    """Llama 2's rule for safety labels (section 3.2.1): a pair whose chosen response is
    unsafe (`chosen_safe` false) and whose rejected one is safe (`rejected_safe` true) is left
    out (`BadRecord("unsafe chosen over safe")`, counted as skipped), since the safer response
    should also be the preferred one. Labels are optional; a label that is not true, false or
    null is malformed."""
    labels = {k: record.get(k) for k in ("chosen_safe", "rejected_safe")}
    for key, value in labels.items():
        if value is not None and not isinstance(value, bool):
            raise BadRecord("malformed", f"{key} must be true, false or null, got {value!r}")
    if labels["chosen_safe"] is False and labels["rejected_safe"] is True:
        raise BadRecord("unsafe chosen over safe")


def _final_answer(mask: list[int]) -> np.ndarray:
    """The loss mask of the last answer only: its run of ones at the end of the dialog."""
    mask = np.asarray(mask, np.int32)
    zeros = np.flatnonzero(mask == 0)
    start = zeros[-1] + 1 if zeros.size else 0
    out = np.zeros_like(mask)
    out[start:] = mask[start:]
    return out


def prompt_messages(prompt: Any) -> list[dict]:
    """A record's prompt as the messages of a dialog awaiting the assistant's answer."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise BadRecord("malformed", "prompt must be a string or a list of messages")
    _, waiting = chat_format.exchanges(prompt)
    if waiting is None:
        raise BadRecord("roles", "a prompt must end with the user's turn")
    return prompt


def response_tokens(prompt: Any, response: Any, tokenizer: Tokenizer):
    """(int32 tokens, loss mask on the response and its EOS) of `response` as the assistant's
    answer to `prompt` (a question or a dialog ending with the user's turn), in Meta's chat
    format: what a reward model scores at its last token."""
    if not isinstance(response, str):
        raise BadRecord("malformed", "a response must be a string")
    if not response.strip():
        raise BadRecord("empty answer")
    dialog = [*prompt_messages(prompt), {"role": "assistant", "content": response}]
    ids, mask = chat_format.dialog_tokens(dialog, tokenizer)
    return np.asarray(ids, np.int32), _final_answer(mask)


def pair_example(record: Any, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """One record (parsed or its JSON line) as a two-segment example; `BadRecord` otherwise."""
    record = records_lib.parse(record)
    responses = [record.get("chosen"), record.get("rejected")]
    if not all(isinstance(r, str) for r in responses):
        raise BadRecord("malformed", "chosen and rejected must be strings")
    if all(r.strip() for r in responses) and responses[0].strip() == responses[1].strip():
        raise BadRecord("identical responses")
    check_safety_labels(record)
    rating = rating_index(record.get("rating"))
    (c, c_mask), (r, r_mask) = (response_tokens(record.get("prompt"), x, tokenizer)
                                for x in responses)  # fmt: skip
    n = c.size + r.size
    return {
        "tokens": np.concatenate([c, r]),
        "loss_mask": np.concatenate([c_mask, r_mask]),
        "segments": np.repeat(np.asarray([1, 2], np.int32), [c.size, r.size]),
        "positions": np.concatenate([np.arange(c.size), np.arange(r.size)]).astype(np.int32),
        "rating": np.full(n, rating + 1, np.int32),
    }


def make_dataset(
    records: Sequence,
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    num_epochs: int | None = None,
    pairs_per_row: int = 1,
    name: str = "data",
):
    """Batches of `batch_size` rows of packed pairs for this process (`shard`: its index, the
    process count); `num_epochs=None` repeats forever; `name` begins the log lines and
    errors."""
    return packing.packed_dataset(
        records, tokenizer_path, seq_len, batch_size, seed, shard, num_epochs, pair_example,
        too_long="drop", fields=FIELDS, per_row=pairs_per_row, name=name,
    )  # fmt: skip
