"""Meta's Llama 2 chat format, token for token: dialogs and prompt/completion pairs as token
ids with a loss mask, for fine-tuning (`llamax.data.chat`), preferences
(`llamax.data.preference`) and generation (`llamax.generation`). No data pipeline here: this
module is what every reader of a dialog shares.

- a dialog, `[{"role": "system"|"user"|"assistant", "content": ...}, ...]`: an optional system
  prompt, then user and assistant turns alternating; formatted as Meta's
  `Llama.chat_completion` formats the dialogs it is given (`dialog_tokens`): the system prompt
  inside `<<SYS>>` in the first user turn, each exchange `BOS [INST] question [/INST] answer
  EOS`, a last question awaiting its answer `BOS [INST] question [/INST]`;
- a training record (`example_tokens`): a dialog ending with the assistant's turn
  (`{"messages": [...]}`), or a prompt/completion pair (`{"prompt": ..., "completion": ...}`:
  `BOS prompt completion EOS`, the texts as they are, no chat markup).

The loss mask is 1 on the tokens a model is trained to predict: each answer (completion) and
the EOS that closes it; 0 on system and user turns, the `[INST]` markup and the BOS
(`train_on="everything"`: 1 on every token). An assistant message may carry `"weight": 0`
(the key of OpenAI's chat fine-tuning format; 1 is the default): its answer is context, not
a target, and its loss is 0, as Ghost Attention's dialogs need for every turn before the last
(`llamax.gatt`). What cannot be an example is a `BadRecord`
with its reason: roles out of order or unknown, an empty answer, special tags in the text,
text that is not valid Unicode, a weight other than 0 or 1 (or on a turn that is not the
assistant's), no answer left to train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llamax.data.records import BadRecord, parse
from llamax.data.tokenizer import NotUnicode, Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def _encode(tokenizer: Tokenizer, text: str, bos: bool, eos: bool) -> list[int]:
    """`tokenizer.encode`, text that is not valid Unicode a bad record."""
    try:
        return tokenizer.encode(text, bos=bos, eos=eos)
    except NotUnicode as e:
        raise BadRecord("not valid Unicode", e.detail) from None


def exchanges(dialog: Sequence[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """A dialog as (question, answer) pairs and the last question still awaiting an answer
    (None when it ends with an answer), the system prompt merged into the first question.
    The answers' weights: `weights`."""
    if not isinstance(dialog, list | tuple) or not dialog:
        raise BadRecord("malformed", "the messages must be a non-empty list")
    for turn in dialog:
        if not (isinstance(turn, dict) and isinstance(turn.get("content"), str)):
            raise BadRecord("malformed", "each message needs a role and a string content")
        if "weight" in turn and (turn.get("role") != "assistant" or turn["weight"] not in (0, 1)
                                 or isinstance(turn["weight"], bool)):  # fmt: skip
            detail = f"a weight must be 0 or 1, on an assistant message; got {turn['weight']!r}"
            raise BadRecord("malformed", f"{detail} ({turn.get('role')})")
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


def weights(dialog: Sequence[dict]) -> list[int]:
    """Each assistant message's weight, in order: its `"weight"` (0 or 1, checked by
    `exchanges`), 1 when it has none."""
    return [int(turn.get("weight", 1)) for turn in dialog if turn.get("role") == "assistant"]


def dialog_tokens(dialog: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a dialog in Meta's chat format, and the loss mask (1 on each answer and its
    EOS, unless the answer's weight is 0). A dialog ending with a user turn ends with that
    question awaiting its answer (what generation continues); one ending with the assistant's
    is a whole training example."""
    pairs, last = exchanges(dialog)
    ids: list[int] = []
    mask: list[int] = []
    for (question, answer), weight in zip(pairs, weights(dialog), strict=True):
        prompt = f"{B_INST} {question.strip()} {E_INST}"
        whole = _encode(tokenizer, f"{prompt} {answer.strip()} ", True, True)
        # The answer starts where the prompt's own tokens stop matching the whole exchange's
        # (the space before the answer always starts a new piece in Llama's tokenizer).
        head = _encode(tokenizer, prompt, True, False)
        cut = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), None)
        cut = min(len(head), len(whole) - 1) if cut is None else cut
        ids += whole
        mask += [0] * cut + [weight] * (len(whole) - cut)
    if last is not None:
        question = _encode(tokenizer, f"{B_INST} {last.strip()} {E_INST}", True, False)
        ids += question
        mask += [0] * len(question)
    return ids, mask


def example_tokens(
    record: Any, tokenizer: Tokenizer, train_on: str = "answers"
) -> tuple[np.ndarray, np.ndarray]:
    """One record (a dialog or a prompt/completion pair, parsed or as its JSON line) as int32
    tokens and its int32 loss mask; `BadRecord` for one that cannot be an example."""
    record = parse(record)
    if "messages" in record:
        pairs, last = exchanges(record["messages"])
        if last is not None:
            raise BadRecord("roles", "a training dialog must end with the assistant's turn")
        if any(not answer.strip() for _, answer in pairs):
            raise BadRecord("empty answer")
        if not any(weights(record["messages"])):
            raise BadRecord("no answer to train on", "every assistant message has weight 0")
        ids, mask = dialog_tokens(record["messages"], tokenizer)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise BadRecord("malformed", "prompt and completion must be strings")
        if not completion.strip():
            raise BadRecord("empty answer")
        head = _encode(tokenizer, prompt, True, False)
        ids = _encode(tokenizer, prompt + completion, True, True)
        cut = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), None)
        cut = min(len(head), len(ids) - 1) if cut is None else cut
        mask = [0] * cut + [1] * (len(ids) - cut)
    else:
        raise BadRecord("malformed", 'a record needs "messages", or "prompt" and "completion"')
    if train_on == "everything":
        mask = [1] * len(ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
