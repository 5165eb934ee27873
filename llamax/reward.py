"""Using a reward model (a Llama with `head="score"`, docs/preference.md): scores of token
sequences, read at each one's last token, and accuracy on preference pairs overall and by
rating level, in the layout of Llama 2's Table 8, with a plot.

A pair counts as ranked right when the chosen response scores strictly higher than the
rejected one (a tie counts as wrong).

A sequence is scored only within the model's window (`max_seq_len`): `score_sequences`
refuses a longer one, and a pair with a response longer than the window is skipped and
counted "too long" (`pair_sequences`); no score is ever read past the window. A call scores
at most as many rows as there are sequences, and its buffers are checked against the free
memory first (`generation.check_memory`).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from functools import partial

import jax
import numpy as np

from llamax import generation, losses
from llamax.data import preference
from llamax.data.ratings import RATINGS
from llamax.data.records import BadRecord

TOO_LONG = "too long"  # the reason a sequence longer than the model's window is left out

PAD_TO = 64  # rows are padded to a multiple of this many tokens: few shapes, few compiles


def _last_scores(params, tokens, segment_ids, *, model):
    scores = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    return losses.segment_last_values(scores, segment_ids, 1)[0][:, 0]


def score_sequences(model, params, sequences: Sequence, batch_size: int = 8) -> np.ndarray:
    """float32 [N]: each token sequence's score at its last token, `batch_size` rows a call
    (fewer when there are fewer sequences), right-padded (padding is segment 0: never
    attended, never read). A sequence longer than the model's window, or a call whose
    buffers the device cannot hold, is a `ValueError` before anything is scored."""
    if model.config.head != "score":
        raise ValueError("score_sequences needs a reward model (LlamaConfig.head 'score')")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(len(x) == 0 for x in sequences):
        raise ValueError("An empty sequence has no last token to score")
    if not len(sequences):
        return np.zeros(0, np.float32)
    window = model.config.max_seq_len
    longest = max(range(len(sequences)), key=lambda i: len(sequences[i]))
    if len(sequences[longest]) > window:
        raise ValueError(
            f"sequence {longest} is {len(sequences[longest]):,} tokens, longer than the reward "
            f"model's window of {window:,} tokens (max_seq_len): it cannot be scored"
        )
    rows = min(batch_size, len(sequences))
    width = -(-len(sequences[longest]) // PAD_TO) * PAD_TO
    generation.check_memory(
        f"scoring {rows:,} rows of up to {width:,} tokens",
        generation.forward_bytes(model, rows, width),
        "score fewer rows at a time (--batch-size)",
    )
    score = jax.jit(partial(_last_scores, model=model))
    out = []
    for start in range(0, len(sequences), rows):
        chunk = sequences[start : start + rows]
        width = -(-max(len(x) for x in chunk) // PAD_TO) * PAD_TO
        tokens = np.zeros((rows, width), np.int32)
        segments = np.zeros_like(tokens)
        for i, x in enumerate(chunk):
            tokens[i, : len(x)], segments[i, : len(x)] = x, 1
        out.append(np.asarray(score(params, tokens, segments))[: len(chunk)])
    return np.concatenate(out)


def pair_sequences(records: Sequence, tokenizer, max_seq_len: int):
    """(the token sequences of each usable pair, chosen then rejected [2P], their rating
    indices [P] (-1: none), skipped records counted by reason) of preference records. A pair
    with a response longer than `max_seq_len` (the reward model's window) is skipped as "too
    long". No usable pair at all is a `ValueError` giving the reasons and their counts."""
    sequences, ratings, skipped = [], [], collections.Counter()
    for i in range(len(records)):
        try:  # reading a record can fail too (a line too long to read: `JsonlRecords`)
            example = preference.pair_example(records[i], tokenizer)
        except BadRecord as e:
            skipped[e.reason] += 1
            continue
        segments = example["segments"]
        pair = [example["tokens"][segments == 1], example["tokens"][segments == 2]]
        if max(len(x) for x in pair) > max_seq_len:
            skipped[TOO_LONG] += 1
            continue
        sequences += pair
        ratings.append(int(example["rating"][0]) - 1)
    if not ratings:
        raise ValueError(f"no usable preference pair to evaluate: {describe_skipped(skipped)}")
    return sequences, np.asarray(ratings, np.int32), dict(skipped)


def describe_skipped(skipped: dict[str, int]) -> str:
    """What was skipped, by reason: "2 not JSON, 1 too long" ("no records" for none)."""
    if not skipped:
        return "no records"
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items()))
    return f"{sum(skipped.values()):,} skipped ({reasons})"


def pair_scores(model, params, tokenizer, records: Sequence, batch_size: int = 8):
    """(scores [P, 2] of each usable pair's chosen and rejected responses, their rating
    indices [P] (-1: none), skipped records counted by reason) of preference records
    (`pair_sequences`)."""
    sequences, ratings, skipped = pair_sequences(records, tokenizer, model.config.max_seq_len)
    scores = score_sequences(model, params, sequences, batch_size).reshape(-1, 2)
    return scores, ratings, skipped


def accuracy_by_rating(scores: np.ndarray, ratings: np.ndarray) -> dict:
    """Share of pairs ranked right, overall and per rating level (RATINGS; None where a
    level has no pairs), with the pair counts and the mean score margin."""
    if not len(scores):
        raise ValueError("No usable preference pair to evaluate")
    right = scores[:, 0] > scores[:, 1]
    levels = {}
    for i, level in enumerate(RATINGS):
        chosen = ratings == i
        accuracy = float(right[chosen].mean()) if chosen.any() else None
        levels[level] = {"accuracy": accuracy, "pairs": int(chosen.sum())}
    return {
        "accuracy": float(right.mean()), "pairs": int(len(right)), "by_rating": levels,
        "unrated_pairs": int((ratings < 0).sum()),
        "mean_margin": float((scores[:, 0] - scores[:, 1]).mean()),
    }  # fmt: skip


def plot_accuracy(results: dict[str, dict], path: str, title: str = "") -> None:
    """Bars of accuracy per rating level and overall, one group of bars per label
    ({label: accuracy_by_rating's result})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llamax.evaluate import save_figure

    names = [*RATINGS, "overall"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(results), 1)
    for k, (label, result) in enumerate(results.items()):
        values = [result["by_rating"][n]["accuracy"] for n in RATINGS]
        values = [np.nan if v is None else v for v in [*values, result["accuracy"]]]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=label)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(names)) + width * (len(results) - 1) / 2,
                  [n.replace(" / ", "/\n") for n in names], fontsize=8)  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("pairs ranked right")
    ax.set_title(title or "Reward model accuracy by rating")
    if len(results) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
