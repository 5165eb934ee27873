"""`llamax-eval perplexity|passkey --checkpoint DIR --lengths 2048,4096,... --output DIR`.

    llamax-eval perplexity --checkpoint ckpt/x --lengths 2048,4096,8192,16384 \\
        --text 'pg19/*.txt' --output eval/x
    llamax-eval perplexity --checkpoint ckpt/x --lengths 4096 --tfds pg19 --split test \\
        --tfds-data-dir gs://bucket/tensorflow_datasets --output eval/x
    llamax-eval passkey --checkpoint ckpt/x --lengths 4096,8192,16384 --output eval/x
    llamax-eval perplexity --checkpoint ckpt/base --adapters peft/x --lengths 4096 ...

Each writes `perplexity.json` and `perplexity.png` (perplexity against context length), or
`passkey.json` and `passkey.png` (accuracy by length and depth), into `--output`.
`--adapters` merges LoRA adapters (a PEFT adapter directory or a llamax LoRA run's workdir)
into the checkpoint's weights first. `--rope-scaling` evaluates the checkpoint with another
rotary scaling than its own, e.g. dynamic NTK without fine-tuning:
`--rope-scaling '{"rope_type": "dynamic", "factor": 4}'`. `--batch-size` windows (prompts)
are scored a call, fewer when there are fewer, by the inference engine's scoring path
(`llamax.inference.Engine`); a call whose buffers the device cannot hold is refused before
any is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llamax import fs
from llamax.cli import add_model_flags, error, model_options, setup_logging


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from e
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected lengths of at least 2 tokens: {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from e
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1]: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_model_flags(common, batch_size=1)
    common.add_argument("--lengths", type=_ints, required=True, help="e.g. 2048,4096,8192")
    common.add_argument("--output", required=True, help="directory for the JSON and PNG")
    common.add_argument(
        "--rope-scaling", type=json.loads, default=argparse.SUPPRESS,
        help="JSON, replacing the checkpoint's rotary scaling ('null': none)",
    )  # fmt: skip
    common.add_argument("--label", help="name of this run in the plot (default: checkpoint)")
    ppl = sub.add_parser("perplexity", parents=[common], help="sliding-window perplexity")
    ppl.add_argument("--text", default="", help="comma-separated globs of .txt/.jsonl(.gz)")
    ppl.add_argument("--tfds", default="", help="a prepared tfds dataset, e.g. pg19")
    ppl.add_argument("--tfds-data-dir", default="")
    ppl.add_argument("--split", default="validation")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--stride", type=int, help="window step (default: the length)")
    ppl.add_argument("--max-tokens", type=int, help="read at most this many tokens of text")
    key = sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy")
    key.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    key.add_argument("--trials", type=int, default=5, help="random keys per length and depth")
    key.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "passkey" and args.trials < 1:
        parser.error("--trials must be positive")

    from llamax import data, evaluate, loading

    try:
        given = {"rope_scaling": args.rope_scaling} if "rope_scaling" in vars(args) else {}
        engine, tokenizer = loading.load_engine(args.checkpoint, config=given,
                                                **model_options(args))  # fmt: skip
        model, params = engine.model, engine.params
        fs.makedirs(args.output)
        label = args.label or os.path.basename(fs.absolute(args.adapters or args.checkpoint))
        if args.command == "perplexity":
            texts = data.documents(
                args.text, args.tfds, args.tfds_data_dir, args.split, args.text_field
            )
            stream = evaluate.token_stream(texts, tokenizer, args.max_tokens)
            bar = sys.stderr.isatty()  # a log file gets no bar's carriage returns
            results = [
                evaluate.perplexity(
                    model, params, stream, n, args.stride, args.batch_size, progress=bar
                )
                for n in args.lengths
            ]
            for r in results:
                print(f"context {r['length']}: perplexity {r['perplexity']:.3f} "
                      f"({r['tokens_scored']} tokens)")  # fmt: skip
            out = {"checkpoint": args.checkpoint, "adapters": args.adapters, "label": label,
                   "results": results,
                   "rope_scaling": model.config.to_dict()["rope_scaling"]}  # fmt: skip
            evaluate.write_json(fs.join(args.output, "perplexity.json"), out)
            curve = {r["length"]: r["perplexity"] for r in results}
            evaluate.plot_perplexity({label: curve}, fs.join(args.output, "perplexity.png"))
        else:
            result = evaluate.passkey(
                model, params, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                args.batch_size,
            )  # fmt: skip
            for n, row in result["accuracy"].items():
                print(f"context {n}: " + ", ".join(f"depth {d}: {a:.0%}" for d, a in row.items()))
            result.update(checkpoint=args.checkpoint, adapters=args.adapters, label=label)
            evaluate.write_json(fs.join(args.output, "passkey.json"), result)
            evaluate.plot_passkey(result, fs.join(args.output, "passkey.png"), label)
    except (ValueError, OSError) as e:
        return error("llamax-eval", e)
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
