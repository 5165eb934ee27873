"""Long-context evaluation: sliding-window perplexity and passkey retrieval, with plots.

Perplexity at context length L (as in Chen et al. 2023, arXiv:2306.15595): the evaluation text
is tokenized document by document (BOS before each, EOS after), concatenated into one stream
and read through windows of L tokens that start every `stride` tokens. Each window scores only
the targets no earlier window scored, so every token is counted once, predicted from up to
L - 1 tokens of context; with `stride == L` (the default) the windows are disjoint, and a
smaller stride gives each scored token more context for more compute.

Passkey retrieval (Mohtashami and Jaggi 2023, arXiv:2305.16300): a random 5-digit key is hidden
at a relative depth of repeated filler text that fills the context to L tokens, and the model is
asked for it. A trial succeeds when greedy decoding would produce the key's tokens: the argmax
at each answer position equals the answer token (teacher forcing gives exactly greedy decoding
while the answer is right, so one forward pass decides it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from llamax import fs, inference

log = logging.getLogger("llamax")

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


# ----- text -----


def token_stream(texts: Iterable[str], tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """The documents tokenized with BOS and EOS and concatenated, int32, up to `max_tokens`."""
    pieces, total = [], 0
    for text in texts:
        ids = tokenizer.encode_array(text, bos=True, eos=True)
        pieces.append(ids)
        total += len(ids)
        if max_tokens and total >= max_tokens:
            break
    if not pieces:
        raise ValueError("The evaluation text has no documents")
    stream = np.concatenate(pieces)
    return stream[:max_tokens] if max_tokens else stream


# ----- perplexity -----


def windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored prediction) of each window: predictions i >= first of the window
    starting at `start` are scored (prediction i is of token start + i + 1)."""
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in (0, length]; got {stride} for length {length}")
    if n_tokens < length:
        raise ValueError(f"{n_tokens} tokens of text cannot fill one window of {length}")
    out, scored_until = [], 0  # tokens with index < scored_until have been scored
    for start in range(0, n_tokens - length + 1, stride):
        first = max(scored_until - start - 1, 0)
        out.append((start, first))
        scored_until = start + length
    return out


def _padded(model, length: int) -> int:
    """The length the scoring path pads a row of `length` tokens to (`inference.bucket`)."""
    return inference.bucket(length, model.config.max_seq_len)


def perplexity(
    model,
    params,
    stream: np.ndarray,
    length: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Sliding-window perplexity of `stream` at context `length` (see the module docstring),
    each window's token log-probabilities from the inference engine's scoring path
    (`Engine.token_logprobs`: the model's chunked cross-entropy), `batch_size` windows a call
    (fewer when there are fewer), refused before any is scored when the device cannot hold a
    call's buffers; `progress` shows a bar of the windows scored. `model` and `params`: a
    model and its parameters, stacked (unstacked here) or per layer (an `Engine`'s, used as
    they are)."""
    from tqdm import tqdm

    spans = windows(len(stream), length, stride or length)
    batch_size = min(batch_size, len(spans))
    inference.check_memory(
        f"perplexity at {length:,} tokens, {batch_size:,} windows a call",
        inference.forward_bytes(model, batch_size, _padded(model, length), logits=False),
        "lower --batch-size or --lengths",
    )
    engine = inference.Engine(model, params)
    bar = tqdm(total=len(spans), desc=f"perplexity at {length}", unit="window",
               disable=not progress, leave=False)  # fmt: skip
    logprobs = engine.token_logprobs([stream[s : s + length] for s, _ in spans], batch_size,
                                     progress=lambda n: bar.update(n - bar.n))  # fmt: skip
    bar.close()
    # Prediction i of a window is of its token i + 1; a window scores those from `first` on.
    nll = -sum(float(np.sum(lp[first:], dtype=np.float64))
               for lp, (_, first) in zip(logprobs, spans, strict=True))  # fmt: skip
    count = sum(length - 1 - first for _, first in spans)
    return {
        "length": length,
        "stride": stride or length,
        "windows": len(spans),
        "tokens_scored": int(count),
        "nll": nll / count,
        "perplexity": math.exp(nll / count),
    }


# ----- passkey -----


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with the key's sentence at `depth` (0: first, 1: last) of the
    filler, the whole at most `length` tokens."""

    def enc(text):
        return tokenizer.encode(text, bos=False, eos=False)

    intro, filler, question = enc(INTRO), enc(FILLER), enc(QUESTION)
    needle, answer = enc(NEEDLE.format(key=key)), enc(str(key))
    fixed = 1 + len(intro) + len(needle) + len(question) + len(answer)
    repeats = (length - fixed) // len(filler)
    if repeats < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt ({fixed} tokens)")
    before = round(repeats * depth)
    prompt = [tokenizer.bos_id, *intro, *filler * before, *needle]
    prompt += [*filler * (repeats - before), *question]
    return prompt, answer


def answer_right(greedy: np.ndarray, prompt: int, answer: int) -> bool:
    """Whether greedy decoding after a prompt of `prompt` tokens produces the `answer` tokens
    that follow it: `greedy` (bool [len - 1], prediction j of token j + 1 is the argmax) holds
    at each answer token's prediction, j in [prompt - 1, prompt + answer - 1)."""
    return bool(np.all(greedy[prompt - 1 : prompt + answer - 1]))


def passkey(
    model,
    params,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """Passkey accuracy for each length and depth, over `trials` random keys each, through
    the inference engine's scoring path (`Engine.greedy_logprobs`), `batch_size` prompts a
    call (fewer when there are fewer), refused before any is scored when the device cannot
    hold a call's buffers. `model` and `params` as `perplexity` takes them."""
    rng = np.random.default_rng(seed)
    accuracy: dict[str, dict[str, float]] = {}
    batch_size = min(batch_size, len(depths) * trials)
    for length in lengths:
        inference.check_memory(
            f"passkey at {length:,} tokens, {batch_size:,} prompts a call",
            inference.forward_bytes(model, batch_size, _padded(model, length)),
            "lower --batch-size or --lengths",
        )
    engine = inference.Engine(model, params)
    for length in lengths:
        cases = []
        for depth in depths:
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                cases.append((depth, *passkey_prompt(tokenizer, length, depth, key)))
        scored = engine.greedy_logprobs([prompt + answer for _, prompt, answer in cases],
                                        batch_size)  # fmt: skip
        hits = {depth: 0 for depth in depths}
        for (depth, prompt, answer), (_, greedy) in zip(cases, scored, strict=True):
            hits[depth] += answer_right(greedy, len(prompt), len(answer))
        accuracy[str(length)] = {str(d): hits[d] / trials for d in depths}
        mean = sum(hits.values()) / (trials * len(depths))
        log.info("passkey at %d tokens: %.0f%% (%s)", length, 100 * mean, accuracy[str(length)])
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "accuracy": accuracy,
    }


# ----- output -----


def write_json(path: str, data) -> None:
    """An evaluation's results as JSON; a perplexity that is not finite (a model whose loss
    overflows) is written as null."""
    fs.write_json(path, fs.json_safe(data), indent=1)


def save_figure(fig, path: str) -> None:
    """A matplotlib figure as a PNG at `path` (local or gs://), written whole or not at all."""
    with fs.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def plot_perplexity(curves: dict[str, dict[int, float]], path: str, title: str = "") -> None:
    """Perplexity against context length, one line per label ({label: {length: ppl}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        lengths = sorted(points, key=int)
        ax.plot([int(n) for n in lengths], [points[n] for n in lengths], marker="o", label=label)
    ax.set_xscale("log", base=2)
    values = [v for points in curves.values() for v in points.values()]
    if max(values) > 10 * min(values):  # a blow-up: show it on a log scale
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Sliding-window perplexity")
    ax.grid(True, which="both", alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_passkey(result: dict, path: str, title: str = "") -> None:
    """A heatmap of passkey accuracy: depth (rows) by context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = [str(n) for n in result["lengths"]], [str(d) for d in result["depths"]]
    grid = np.array([[result["accuracy"][n][d] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or f"Passkey retrieval ({result['trials']} keys per cell)")
    save_figure(fig, path)
    plt.close(fig)
