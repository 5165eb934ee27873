"""`llamax-gatt --checkpoint DIR --dialogs FILE --output FILE`: Ghost Attention's dialogs.

Ghost Attention (Llama 2, section 3.3; `llamax.gatt`) teaches a chat model to keep a system
instruction for a whole dialog.

Each dialog of `--dialogs` (jsonl of `{"messages": [...]}`: its user messages are kept, its
assistant messages sampled again; an optional `"instruction"`) gets an instruction (its own,
or a synthetic one from the families: hobbies, languages, public figures, or those of
`--instructions FILE`), its answers sampled from the checkpoint with the instruction on every
user message, and is written as chat SFT records (`data.source=chat`) with the instruction
only in the first turn (shortened with probability `--shorten`) and the loss on the last
turn only (`--turns every`: one record per turn, each turn once the last). The output is
written whole or not at all; `--report` takes the counts as JSON.
"""

from __future__ import annotations

import argparse
import sys

from llamax.cli import (
    add_model_flags,
    add_sampling_flags,
    error,
    model_options,
    refuse_existing,
    sampling_config,
    setup_logging,
)


def main(argv: list[str] | None = None) -> int:
    from llamax.gatt import TURNS

    parser = argparse.ArgumentParser(prog="llamax-gatt", description=__doc__.splitlines()[0])
    add_model_flags(parser, "the latest chat model: converted or run", batch_size=8)
    parser.add_argument("--dialogs", required=True, help="jsonl of {messages[, instruction]}")
    parser.add_argument("--output", required=True, help="jsonl: GAtt's chat SFT records")
    parser.add_argument("--instructions", help="JSON of instruction families (default: built in)")
    parser.add_argument("--shorten", type=float, default=0.5,
                        help="share of records whose system prompt is the short form")  # fmt: skip
    parser.add_argument("--turns", choices=TURNS, default="every",
                        help="a record per turn, or the whole dialog only")  # fmt: skip
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep answers cut off by --max-new-tokens (default: the dialog "
                        "ends before them)")  # fmt: skip
    parser.add_argument("--report", help="JSON file for the counts")
    add_sampling_flags(parser, max_new_tokens=128, temperature=0.7)
    args = parser.parse_args(argv)
    sampling = sampling_config(parser, args)
    if not 0.0 <= args.shorten <= 1.0:
        parser.error(f"--shorten must be a probability in [0, 1], got {args.shorten}")
    setup_logging()

    from llamax import gatt

    try:
        refuse_existing("--output", args.output)
        refuse_existing("--report", args.report)
        report = gatt.run(
            args.checkpoint, args.dialogs, args.output, sampling,
            families_file=args.instructions, shorten=args.shorten, turns=args.turns,
            slots=args.batch_size, keep_truncated=args.keep_truncated, report=args.report,
            **model_options(args),
        )  # fmt: skip
    except (ValueError, OSError) as e:
        return error("llamax-gatt", e)
    ended = ", ".join(f"{k}: {v}" for k, v in report["ended_early"].items()) or "none"
    print(f"gatt: {report['records']} records from {report['dialogs']} dialogs "
          f"({report['answers_sampled']} answers sampled; ended early: {ended}) "
          f"-> {args.output}")  # fmt: skip
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
