"""Generation for people and programs that hold a model and its parameters: `generate`, the
public function (`llamax.generate`), on the inference engine (`llamax.inference.Engine`); and
Meta's Llama 2 chat format for prompts (`chat_tokens`) and answers (`answer_text`).

`generate` takes token-id prompts of any lengths, decodes them all at once (one slot each)
and returns each one's new tokens up to and without the first EOS. Each call unstacks the
weights again: a caller with many requests builds one `Engine` and calls its `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from llamax import inference
from llamax.data import chat_format
from llamax.data import records as records_lib
from llamax.model import Llama


def check_text(text: str, what: str) -> None:
    """A `ValueError` when `text` cannot be encoded as UTF-8 (a lone surrogate: what Python
    makes of an undecodable byte in a command line or of a `\\udcxx` escape in JSON), which
    no tokenizer can read; `what` names it ("--prompt")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 text: an undecodable byte or a lone surrogate "
            f"({text[e.start]!r}) at character {e.start}"
        ) from None


def generate(
    model: Llama,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int = 2,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), up to and without
    the first EOS. The request is checked first (`inference.SamplingConfig`,
    `inference.check_request`): a bad setting, a prompt and its new tokens past the model's
    window, or buffers the device cannot hold are a `ValueError`, before anything is
    allocated. Prompt `i` draws from the random stream `i` of `seed`."""
    sampling = inference.SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)
    inference.check_request(model, [len(p) for p in prompts], sampling)
    engine = inference.Engine(model, params)
    done = engine.generate(prompts, sampling, eos_id)
    return [c.tokens[:-1] if c.stop == "eos" else c.tokens for c in done]


def answer_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of a chat answer's tokens, without trailing whitespace: Meta's chat format
    closes each answer with a space before EOS (`chat_format.dialog_tokens`), which a chat model
    learns to produce and is no part of the answer."""
    return tokenizer.decode(ids).rstrip()


def chat_tokens(dialog: Sequence[dict], tokenizer) -> list[int]:
    """A dialog (`{"role": "system"|"user"|"assistant", "content": ...}`, ending with a user
    turn) as Meta's `Llama.chat_completion` tokenizes it: the system prompt merged into the
    first user turn inside `<<SYS>>`, each finished exchange `[INST] q [/INST] a` between BOS
    and EOS, the last question after a BOS and awaiting its answer. The same formatting as
    fine-tuning's (`llamax.data.chat_format.dialog_tokens`)."""
    if not dialog or dialog[-1].get("role") != "user":
        raise ValueError("The last turn of a dialog must be the user's")
    for i, turn in enumerate(dialog):
        if isinstance(turn, dict) and isinstance(turn.get("content"), str):
            check_text(turn["content"], f"message {i} ({turn.get('role')})")
    try:
        return chat_format.dialog_tokens(dialog, tokenizer)[0]
    except records_lib.BadRecord as e:
        raise ValueError(str(e)) from None
