"""`llamax-convert --from meta|hf|llamax|peft --to llamax|hf|meta|peft --input DIR --output DIR`.

    llamax-convert --from meta --to llamax --input llama-2-7b --output ckpt/llama2-7b
    llamax-convert --from llamax --to hf --input ckpt/llama2-7b --output hf/llama2-7b
    llamax-convert --from llamax --to meta --shards 2 --input ckpt/x --output meta/x
    llamax-convert --verify ckpt/llama2-7b

LoRA (docs/finetuning.md): a LoRA run's workdir reads as its base with the adapters merged
in (`--from llamax --input RUN --to llamax|hf|meta`); `--to peft` writes its adapters alone
in Hugging Face PEFT's format, for PEFT to load on the base named by `--base-name` (a hub id
or a Hugging Face directory; default: the one the run's base was converted from); `--from
peft --input ADAPTERS --base CKPT` merges PEFT adapters into a llamax checkpoint.

The input is verified before anything is written (a directory llamax wrote against its
manifest.json, Meta's release against its checklist.chk), and every tensor written is
checked finite: a NaN, an infinite value or one beyond the output dtype's range is refused
with the tensor named.

The output appears only when complete (written to a temporary directory, then renamed), with
a manifest.json that `--verify` checks. Ctrl-C or SIGTERM stop the conversion and remove the
temporary directory; one left by a killed process is removed by the next conversion to the
same output. `tokenizer.model` is taken from the input directory
or its parent (Meta's release puts it there), or from `--tokenizer`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from llamax.cli import error, setup_logging
from llamax.convert import FORMATS
from llamax.execution import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="src", choices=(*FORMATS, "peft"))
    parser.add_argument("--to", dest="dst", choices=(*FORMATS, "peft"))
    parser.add_argument("--base", help="--from peft: the llamax checkpoint the adapters fit")
    parser.add_argument(
        "--base-name", help="--to peft: the base PEFT loads the adapters on (a Hugging Face hub "
        "id or directory; default: the Hugging Face directory the run's base was converted from)",
    )  # fmt: skip
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--shards", type=int, default=1, help="model-parallel shards (--to meta)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the input's")
    parser.add_argument(
        "--tokenizer", help="tokenizer.model to copy (default: found next to the input)"
    )
    parser.add_argument("--verify", metavar="DIR", help="check DIR against its manifest.json")
    args = parser.parse_args(argv)
    setup_logging()

    from llamax import convert

    if args.verify:
        try:
            problems = convert.verify(args.verify)
        except (ValueError, OSError) as e:
            return error("llamax-convert", e)
        for problem in problems:
            print(f"FAIL {problem}")
        print("OK" if not problems else f"{len(problems)} problem(s) in {args.verify}")
        return 1 if problems else 0
    if not (args.src and args.dst and args.input and args.output):
        parser.error("--from, --to, --input and --output are required (or --verify DIR)")
    # Both raise KeyboardInterrupt where the main thread is, cleaned up alike. SIGINT is set
    # too (rather than left to Python's default handler, which an asyncio runner replaces by
    # a cancellation of its task that a library may absorb).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        convert.convert(
            args.src, args.dst, args.input, args.output, args.shards, args.dtype,
            args.tokenizer, args.base, args.base_name,
        )  # fmt: skip
    except (ValueError, OSError) as e:  # bad input; a missing, existing or unwritable path
        return error("llamax-convert", e)
    except KeyboardInterrupt:
        print(f"llamax-convert: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
