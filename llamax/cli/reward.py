"""`llamax-reward score|eval --checkpoint RM ...`: use a reward model (docs/preference.md).

    llamax-reward score --checkpoint runs/7b-rm --input answers.jsonl --output scored.jsonl
    llamax-reward eval --checkpoint runs/7b-rm --pairs held_out.jsonl --output eval/7b-rm

`score` reads jsonl records with a `prompt` (a question, or a dialog ending with the user's
turn) and a `response`, and writes each record with its `score` added, in order; a bad record
is an error naming its line, and nothing is written. `eval` reads preference pairs (as
`data.source=preference` does; bad ones are skipped and counted) and writes `accuracy.json`
(overall and per rating level, Llama 2's Table 8 layout) and `accuracy.png` into `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llamax import fs
from llamax.cli import add_execution_flags, error, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-reward", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a reward model: converted or run")
    common.add_argument("--tokenizer", help="default: CHECKPOINT/tokenizer.model")
    common.add_argument("--batch-size", type=int, default=8)
    add_execution_flags(common)
    score = sub.add_parser("score", parents=[common], help="score prompt/response records")
    score.add_argument("--input", required=True, help="jsonl of {prompt, response}")
    score.add_argument("--output", required=True, help="jsonl: each record with its score")
    evaluate = sub.add_parser("eval", parents=[common], help="accuracy on preference pairs")
    evaluate.add_argument("--pairs", required=True, help="jsonl of {prompt, chosen, rejected}")
    evaluate.add_argument("--output", required=True, help="directory for the JSON and PNG")
    evaluate.add_argument("--label", help="name in the plot (default: the checkpoint's)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")

    from llamax import reward
    from llamax.data import chat, preference
    from llamax.pretrained import load_with_tokenizer

    try:
        model, params, tokenizer = load_with_tokenizer(
            args.checkpoint, args.tokenizer, dtype=args.dtype, head="score",
            attention=args.attention,
        )  # fmt: skip
        if args.command == "score":
            records, sequences = [], []
            for i, line in enumerate(chat.read_records(args.input), 1):
                try:
                    record = chat.parse(line)
                    tokens, _ = preference.response_tokens(
                        record.get("prompt"), record.get("response"), tokenizer
                    )
                except chat.BadRecord as e:
                    raise ValueError(f"{args.input}: record {i}: {e.reason}: {e}") from None
                records.append(record)
                sequences.append(tokens)
            scores = reward.score_sequences(model, params, sequences, args.batch_size)
            text = "".join(json.dumps({**r, "score": float(s)}) + "\n"
                           for r, s in zip(records, scores, strict=True))  # fmt: skip
            fs.write_text(args.output, text)
            print(f"scored {len(records)} responses: mean {scores.mean():.4f}, "
                  f"min {scores.min():.4f}, max {scores.max():.4f} -> {args.output}")  # fmt: skip
        else:
            scores, ratings, skipped = reward.pair_scores(
                model, params, tokenizer, chat.read_records(args.pairs), args.batch_size
            )
            result = reward.accuracy_by_rating(scores, ratings)
            label = args.label or os.path.basename(fs.absolute(args.checkpoint))
            result.update(checkpoint=args.checkpoint, pairs_file=args.pairs, skipped=skipped)
            fs.makedirs(args.output)
            fs.write_json(fs.join(args.output, "accuracy.json"), result, indent=1)
            reward.plot_accuracy({label: result}, fs.join(args.output, "accuracy.png"))
            for level, row in result["by_rating"].items():
                shown = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
                print(f"{level}: {shown} ({row['pairs']} pairs)")
            print(f"overall: {result['accuracy']:.1%} ({result['pairs']} pairs; "
                  f"{sum(skipped.values())} skipped)")  # fmt: skip
    except (ValueError, OSError) as e:
        return error("llamax-reward", e)
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
