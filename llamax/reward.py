"""Using a reward model (a Llama with `head="score"`, docs/preference.md): scores of token
sequences, read at each one's last token, and accuracy on preference pairs overall and by
rating level, in the layout of Llama 2's Table 8, with a plot.

A pair counts as ranked right when the chosen response scores strictly higher than the
rejected one (a tie counts as wrong).

A sequence is scored only within the model's window (`max_seq_len`): `score_sequences`
refuses a longer one, and a pair with a response longer than the window is skipped and
counted "too long" (`pair_sequences`); no score is ever read past the window. Scores come
from the inference engine's scoring path (`llamax.inference.Engine.last_scores`): a call
scores at most as many rows as there are sequences, and its buffers are checked against the
free memory first.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence

import numpy as np

from llamax import fs, inference, loading, pretrained
from llamax.data import preference
from llamax.data import records as records_lib
from llamax.data.ratings import RATINGS
from llamax.data.records import BadRecord

TOO_LONG = "too long"  # the reason a sequence longer than the model's window is left out


def score_sequences(model, params, sequences: Sequence, batch_size: int = 8) -> np.ndarray:
    """float32 [N]: each token sequence's score at its last token, through the inference
    engine's scoring path (`Engine.last_scores`: `batch_size` rows a call, fewer when there
    are fewer sequences, right-padded to a length bucket). A sequence longer than the model's
    window, or a call whose buffers the device cannot hold, is a `ValueError` before anything
    is scored. `model` and `params`: a reward model and its parameters, stacked (unstacked
    here) or per layer (an `Engine`'s, used as they are)."""
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
    width = inference.bucket(len(sequences[longest]), window)
    inference.check_memory(
        f"scoring {rows:,} rows of up to {width:,} tokens",
        inference.forward_bytes(model, rows, width),
        "score fewer rows at a time (--batch-size)",
    )
    return inference.Engine(model, params).last_scores(sequences, batch_size)


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


def score_file(checkpoint: str, path: str, output: str, batch_size: int = 8,
               tokenizer: str | None = None, **load) -> np.ndarray:  # fmt: skip
    """`llamax-reward score`: the records of the jsonl file at `path` (a `prompt`, a question
    or a dialog ending with the user's turn, and a `response`), each scored by the reward
    model `checkpoint` and written with its `score` added, in order, to `output` (whole or
    not at all). Every record is read and checked (its format, its length against the reward
    model's window) before the model is loaded; a bad one, or a score that is not finite, is a
    `ValueError` naming its line, and nothing is written. `load`: `loading.load_engine`'s
    options (adapters, dtype, attention). The scores, float32 [N]."""
    config = pretrained.read_model_config(checkpoint)
    tok = loading.checkpoint_tokenizer(checkpoint, tokenizer, config.vocab_size)
    lines = records_lib.read_records(path, records_lib.max_record_bytes(config.max_seq_len, tok))
    parsed, sequences = [], []
    for i in range(len(lines)):
        try:
            record = records_lib.parse(lines[i])
            tokens, _ = preference.response_tokens(record.get("prompt"), record.get("response"),
                                                   tok)  # fmt: skip
        except BadRecord as e:
            raise ValueError(f"{lines.where(i)}: {e}; nothing was written") from None
        if len(tokens) > config.max_seq_len:
            raise ValueError(
                f"{lines.where(i)}: its prompt and response are {len(tokens):,} "
                f"tokens, longer than the reward model's window of {config.max_seq_len:,} "
                "tokens (max_seq_len): shorten the response or leave the record out; "
                "nothing was written"
            )
        parsed.append(record)
        sequences.append(tokens)
    engine, _ = loading.load_engine(checkpoint, tokenizer, head="score", **load)
    scores = score_sequences(engine.model, engine.params, sequences, batch_size)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{lines.where(int(bad[0]))}: the reward model gives a non-finite "
                         f"score ({scores[bad[0]]}); nothing was written")  # fmt: skip
    fs.write_lines(output, [json.dumps({**r, "score": float(s)}, allow_nan=False) + "\n"
                            for r, s in zip(parsed, scores, strict=True)])  # fmt: skip
    return scores


def evaluate_pairs(checkpoint: str, path: str, batch_size: int = 8,
                   tokenizer: str | None = None, **load) -> dict:  # fmt: skip
    """`llamax-reward eval`: the accuracy of the reward model `checkpoint` on the preference
    pairs of the jsonl file at `path` (`accuracy_by_rating`, with `skipped`: the records left
    out, by reason). The pairs are read, and the unusable ones counted (too long for the
    reward model's window among them), before the model is loaded; none usable, or scores
    that are not finite, is a `ValueError`. `load`: `loading.load_engine`'s options."""
    config = pretrained.read_model_config(checkpoint)
    tok = loading.checkpoint_tokenizer(checkpoint, tokenizer, config.vocab_size)
    limit = records_lib.max_record_bytes(config.max_seq_len, tok)
    try:
        sequences, ratings, skipped = pair_sequences(
            records_lib.read_records(path, limit), tok, config.max_seq_len
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    engine, _ = loading.load_engine(checkpoint, tokenizer, head="score", **load)
    scores = score_sequences(engine.model, engine.params, sequences, batch_size).reshape(-1, 2)
    bad = int((~np.isfinite(scores)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{path}: the reward model gives non-finite scores to {bad:,} of "
                         f"{len(scores):,} pairs; nothing was written")  # fmt: skip
    return {**accuracy_by_rating(scores, ratings), "skipped": skipped}


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
