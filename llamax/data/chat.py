"""Chat and prompt/completion data for supervised fine-tuning: Meta's chat format with a loss
mask per token, packed into rows, resumable.

Records are JSON objects, one per line of `.jsonl` (or `.jsonl.gz`) files, or the examples of
a prepared tfds dataset (`TfdsRecords`: the same fields as features, or one JSON record in a
text feature):
- a dialog, `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`:
  an optional system prompt, then user and assistant turns alternating, ending with the
  assistant's; formatted token for token as Meta's `Llama.chat_completion` formats the
  dialogs it is given (`dialog_tokens`, which generation uses too): the system prompt inside
  `<<SYS>>` in the first user turn, each exchange `BOS [INST] question [/INST] answer EOS`;
- a prompt/completion pair, `{"prompt": ..., "completion": ...}`: `BOS prompt completion EOS`,
  the texts as they are (no chat markup).

The loss mask is 1 on the tokens the model is trained to predict: each answer (completion)
and the EOS that closes it; 0 on system and user turns, the `[INST]` markup, the BOS, and
padding. `train_on="everything"` puts 1 on every token of the example.

Bad records are skipped, counted by reason and logged: not JSON or not an object, roles out
of order or unknown, an empty answer, special tags in the text, and, with `too_long="drop"`,
an example longer than a row (`too_long="truncate"` keeps its first `seq_len` tokens, if an
answer token is among them).

Packing: whole examples, in shuffled order, one after the other into rows of `seq_len`; an
example that does not fit in what is left of a row starts the next one (the rest of the
row is padding, segment 0). Each example is a segment (ids 1, 2, ...) with positions from
0, so nothing is attended or predicted across examples. The iterator's state is grain's
state of the record stream before the example waiting for the next row, and the skip counts:
a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llamax import fs
from llamax.data.pipeline import READ_AHEAD, record_indices
from llamax.data.tokenizer import Tokenizer

log = logging.getLogger("llamax")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
TRAIN_ON = ("answers", "everything")
TOO_LONG = ("drop", "truncate")


class BadRecord(ValueError):
    """A record that cannot be an example; `reason` is its short, countable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _exchanges(dialog: Sequence[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """A dialog as (question, answer) pairs and the last question still awaiting an answer
    (None when it ends with an answer), the system prompt merged into the first question."""
    if not isinstance(dialog, list | tuple) or not dialog:
        raise BadRecord("malformed", "the messages must be a non-empty list")
    for turn in dialog:
        if not (isinstance(turn, dict) and isinstance(turn.get("content"), str)):
            raise BadRecord("malformed", "each message needs a role and a string content")
        if any(tag in turn["content"] for tag in SPECIAL_TAGS):
            detail = f"Special tags {SPECIAL_TAGS} are not allowed in a message"
            raise BadRecord("special tags", detail)
    dialog = list(dialog)
    if dialog[0].get("role") == "system":
        if len(dialog) < 2:
            raise BadRecord("roles", "a system prompt needs a user turn after it")
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1].get("role"), "content": first}, *dialog[2:]]
    roles = [turn.get("role") for turn in dialog]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise BadRecord("roles", f"Roles must be (system), user, assistant, user, ...; got {roles}")
    pairs = [(q["content"], a["content"]) for q, a in zip(dialog[::2], dialog[1::2], strict=False)]
    last = dialog[-1]["content"] if roles[-1] == "user" else None
    return pairs, last


def dialog_tokens(dialog: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a dialog in Meta's chat format, and the loss mask (1 on each answer and its
    EOS). A dialog ending with a user turn ends with that question awaiting its answer (what
    generation continues); one ending with the assistant's is a whole training example."""
    pairs, last = _exchanges(dialog)
    ids: list[int] = []
    mask: list[int] = []
    for question, answer in pairs:
        prompt = f"{B_INST} {question.strip()} {E_INST}"
        whole = tokenizer.encode(f"{prompt} {answer.strip()} ", bos=True, eos=True)
        # The answer starts where the prompt's own tokens stop matching the whole exchange's
        # (the space before the answer always starts a new piece in Llama's tokenizer).
        head = tokenizer.encode(prompt, bos=True, eos=False)
        cut = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), None)
        cut = min(len(head), len(whole) - 1) if cut is None else cut
        ids += whole
        mask += [0] * cut + [1] * (len(whole) - cut)
    if last is not None:
        question = tokenizer.encode(f"{B_INST} {last.strip()} {E_INST}", bos=True, eos=False)
        ids += question
        mask += [0] * len(question)
    return ids, mask


def example_tokens(
    record: Any, tokenizer: Tokenizer, train_on: str = "answers"
) -> tuple[np.ndarray, np.ndarray]:
    """One record (a dialog or a prompt/completion pair, parsed or as its JSON line) as int32
    tokens and its int32 loss mask; `BadRecord` for one that cannot be an example."""
    if isinstance(record, bytes | str):
        try:
            record = json.loads(record)
        except ValueError as e:
            raise BadRecord("not JSON", f"not JSON: {str(e)[:100]}") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed", "a record must be a JSON object")
    if "messages" in record:
        pairs, last = _exchanges(record["messages"])
        if last is not None:
            raise BadRecord("roles", "a training dialog must end with the assistant's turn")
        if any(not answer.strip() for _, answer in pairs):
            raise BadRecord("empty answer")
        ids, mask = dialog_tokens(record["messages"], tokenizer)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise BadRecord("malformed", "prompt and completion must be strings")
        if not completion.strip():
            raise BadRecord("empty answer")
        head = tokenizer.encode(prompt, bos=True, eos=False)
        ids = tokenizer.encode(prompt + completion, bos=True, eos=True)
        cut = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), None)
        cut = min(len(head), len(ids) - 1) if cut is None else cut
        mask = [0] * cut + [1] * (len(ids) - cut)
    else:
        raise BadRecord("malformed", 'a record needs "messages", or "prompt" and "completion"')
    if train_on == "everything":
        mask = [1] * len(ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def read_records(files: str) -> list[bytes]:
    """Every non-blank line of the jsonl(.gz) files the comma-separated glob patterns match,
    in sorted path order (parsed later, so that a bad line is one skipped record)."""
    from llamax.data.corpus import expand_patterns

    lines: list[bytes] = []
    for path in expand_patterns(files):
        data = fs.read_bytes(path)
        if path.endswith(".gz"):
            try:
                data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
            except (OSError, EOFError) as e:
                raise ValueError(f"{path}: not a readable gzip file ({e})") from None
        lines += [line for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"No records in the files {files!r}")
    return lines


def split_records(records: list[bytes], split: str, validation_fraction: float) -> list[bytes]:
    """The train or validation share, by a hash of each record's text: the same record lands
    in the same split whatever the files' order."""
    if split not in ("train", "validation"):
        raise ValueError(f"Unknown split {split!r}; expected train or validation")
    cut = int(validation_fraction * 2**32)
    held_out = [zlib.crc32(r) < cut for r in records]
    chosen = [r for r, h in zip(records, held_out, strict=True) if h == (split == "validation")]
    if not chosen:
        raise ValueError(
            f"The {split} split of {len(records)} records is empty (data.validation_fraction "
            f"{validation_fraction})"
        )
    return chosen


def _text(value) -> str:
    """A tfds text value (UTF-8 bytes, or a numpy scalar of them) as a string."""
    value = value.item() if isinstance(value, np.ndarray | np.generic) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_record(example: dict, text_field: str = "text") -> dict | str:
    """A tfds example as a chat record: a `messages` feature (a sequence of `{role, content}`,
    which tfds returns as a dict of arrays), `prompt` and `completion` features, or else a
    text feature `text_field` holding one record's JSON."""
    if "messages" in example:
        turns = example["messages"]
        if isinstance(turns, dict):  # tfds.features.Sequence of a FeaturesDict
            roles, contents = turns.get("role", ()), turns.get("content", ())
            if len(roles) != len(contents):
                raise BadRecord("malformed", "each message needs a role and a content")
            return {"messages": [{"role": _text(r), "content": _text(c)}
                                 for r, c in zip(roles, contents, strict=True)]}  # fmt: skip
        return {"messages": [{k: _text(v) for k, v in turn.items()} for turn in turns]}
    if "prompt" in example and "completion" in example:
        return {"prompt": _text(example["prompt"]), "completion": _text(example["completion"])}
    return _text(example[text_field])


class TfdsRecords(Sequence):
    """One split of a prepared tfds dataset (random access, ArrayRecord) as chat records."""

    def __init__(self, source, text_field: str = "text", name: str = "the tfds dataset"):
        self.source, self.text_field = source, text_field
        features = set(source[0])
        if not ("messages" in features or {"prompt", "completion"} <= features
                or text_field in features):  # fmt: skip
            raise ValueError(
                f"{name} has the features {sorted(features)}; chat data needs `messages` (a "
                "sequence of {role, content}), `prompt` and `completion`, or a text feature "
                f"data.text_field ({text_field!r}) holding one JSON record"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        return tfds_record(self.source[int(index)], self.text_field)


class _Examples:
    """Record index -> {"tokens", "loss_mask"} or {"skip": reason}; runs on grain's threads."""

    def __init__(self, records, tokenizer_path, seq_len, train_on, too_long):
        self.records, self.tokenizer_path, self.seq_len = records, tokenizer_path, seq_len
        self.train_on, self.too_long = train_on, too_long
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __call__(self, index) -> dict[str, Any]:
        try:
            tokens, mask = example_tokens(self.records[int(index)], self.tokenizer, self.train_on)
        except BadRecord as e:
            detail = str(e) if str(e).startswith(e.reason) else f"{e.reason}: {e}"
            return {"skip": e.reason, "index": int(index), "detail": detail}
        if tokens.size > self.seq_len:
            if self.too_long == "drop" or not mask[: self.seq_len].any():
                detail = f"too long: {tokens.size} tokens > seq_len {self.seq_len}"
                return {"skip": "too long", "index": int(index), "detail": detail}
            tokens, mask = tokens[: self.seq_len], mask[: self.seq_len]
        return {"tokens": tokens, "loss_mask": mask}


class PackedExamples(grain.IterDataset):
    """Rows of `seq_len` tokens packed from whole examples."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len

    def __iter__(self) -> _PackedExamplesIterator:
        return _PackedExamplesIterator(self._parent.__iter__(), self.seq_len)

    def __str__(self) -> str:
        return f"PackedExamples(seq_len={self.seq_len})"


class _PackedExamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len
        self._pending: dict | None = None  # an example waiting for the next row
        self._pending_state = None  # the stream's state before it
        self.skipped: collections.Counter = collections.Counter()

    def _take(self) -> dict | None:
        while self._pending is None:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                return None
            if "skip" in element:
                self.skipped[element["skip"]] += 1
                total = sum(self.skipped.values())
                if total <= 10 or total % 1000 == 0:
                    log.warning(
                        "data: skipped record %d (%s); %d skipped so far: %s",
                        element["index"], element["detail"], total, dict(self.skipped),
                    )  # fmt: skip
                continue
            self._pending, self._pending_state = element, state
        return self._pending

    def __next__(self) -> dict[str, np.ndarray]:
        t = self.seq_len
        fields = ("tokens", "segment_ids", "positions", "loss_mask")
        row = {k: np.zeros(t, np.int32) for k in fields}
        filled = segment = 0
        while (example := self._take()) is not None:
            n = example["tokens"].size
            if filled + n > t:
                break  # it starts the next row
            segment += 1
            row["tokens"][filled : filled + n] = example["tokens"]
            row["loss_mask"][filled : filled + n] = example["loss_mask"]
            row["segment_ids"][filled : filled + n] = segment
            row["positions"][filled : filled + n] = np.arange(n)
            filled += n
            self._pending = None
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self.skipped = collections.Counter(state.get("skipped", {}))


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
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows of examples for this process (`shard`: its index,
    the process count), with the fields `tokens`, `segment_ids`, `positions`, `loss_mask`;
    `num_epochs=None` repeats forever."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.chat_train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"data.chat_too_long must be one of {TOO_LONG}, got {too_long!r}")
    examples = _Examples(records, tokenizer_path, seq_len, train_on, too_long)
    ds = record_indices(len(records), seed, shard, num_epochs).map(examples)
    packed = PackedExamples(ds.to_iter_dataset(READ_AHEAD), seq_len)
    return packed.batch(batch_size, drop_remainder=num_epochs is None)
