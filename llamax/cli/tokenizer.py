"""`llamax-tokenizer train --input PATTERNS --vocab-size N --output FILE.model`.

Trains a BPE sentencepiece model with byte fallback and Llama 2's conventions (UNK 0, BOS 1,
EOS 2, no pad) on text files (.txt, .jsonl with a text field, optionally gzipped, local or on
gs://). A .jsonl record without the text field that is a chat record (`messages`,
`prompt`/`completion`, or `prompt`/`chosen`/`rejected`, as `llamax-train` reads them)
contributes its texts. The model sees lines, as sentencepiece trains on; newlines, like any
byte never learned as a piece, are encoded by byte fallback (as in Meta's tokenizer). It says
how many lines it read; a vocabulary the text cannot fill, or too small for its characters,
is refused with the size that would do.

`llamax-tokenizer encode --model FILE.model TEXT` prints the ids of TEXT (BOS and EOS added).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llamax import fs
from llamax.cli import error, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a BPE model on local text")
    train.add_argument("--input", required=True, help="comma-separated glob patterns")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument(
        "--text-field", default="text",
        help="JSON field of .jsonl documents (chat records without it give their texts)",
    )  # fmt: skip
    train.add_argument(
        "--max-lines", type=int, default=2_000_000,
        help="lines sampled at most, uniformly across all files (seeded)",
    )  # fmt: skip
    train.add_argument("--seed", type=int, default=0, help="of the sample of lines")
    encode = sub.add_parser("encode", help="print the ids of a text")
    encode.add_argument("--model", required=True)
    encode.add_argument("text")
    args = parser.parse_args(argv)
    setup_logging()

    from llamax.data.corpus import sample_lines
    from llamax.data.tokenizer import Tokenizer, train_tokenizer

    try:
        if args.command == "encode":
            print(Tokenizer(args.model).encode(args.text, bos=True, eos=True))
            return 0
        if fs.exists(args.output):
            raise FileExistsError(
                f"--output {args.output} exists; remove it or choose another path"
            )
        if args.vocab_size < 1:
            raise ValueError(
                f"--vocab-size must be a positive number of pieces, got {args.vocab_size}"
            )
        lines = sample_lines(args.input, args.text_field, args.max_lines, args.seed, chat=True)
        tok = train_tokenizer(
            lines, args.output, args.vocab_size, input_sentence_size=args.max_lines,
            vocab_name="--vocab-size",
        )  # fmt: skip
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: sentencepiece's
        return error("llamax-tokenizer", e)
    logging.getLogger("llamax").info("wrote %s: %d pieces", args.output, tok.vocab_size)
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
