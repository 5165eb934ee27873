"""`llamax-reward score|eval --checkpoint RM ...`: use a reward model (docs/preference.md).

    llamax-reward score --checkpoint runs/7b-rm --input answers.jsonl --output scored.jsonl
    llamax-reward eval --checkpoint runs/7b-rm --pairs held_out.jsonl --output eval/7b-rm

A LoRA reward model's run is a checkpoint as any other (its base with the adapters merged and
its own score head); `--adapters` puts a reward model's LoRA adapters (a PEFT sequence
classifier's directory, or a llamax LoRA reward run) on the base `--checkpoint` instead.

`score` reads jsonl records with a `prompt` (a question, or a dialog ending with the user's
turn) and a `response`, and writes each record with its `score` added, in order; a bad record
is an error naming its line, and nothing is written. `eval` reads preference pairs (as
`data.source=preference` does; bad ones are skipped and counted) and writes `accuracy.json`
(overall and per rating level, Llama 2's Table 8 layout) and `accuracy.png` into `--output`.

    llamax-reward sample --policy runs/sft --checkpoint runs/7b-rm --prompts prompts.jsonl \
        --k 4 --temperature 1.0 --output round1.jsonl --report round1.json \
        [--finetune configs/llama2_7b_chat_sft.py --workdir runs/round1]

`sample` is one round of rejection sampling (`llamax.rejection`): `--k` responses to each
prompt (jsonl records with a `prompt`: a question or a dialog ending with the user's turn; a
bad line is an error naming it, and nothing is written) from the policy, each scored by the
reward model `--checkpoint`, the best per prompt written to `--output` as chat SFT data
(`data.source=chat`), with the round's mean and max reward printed and, with `--report`,
written as JSON. With `--finetune CONFIG --workdir DIR` it then fine-tunes the policy on that
data: CONFIG's `get_config()` with `data.source=chat`, `data.files=OUTPUT`, `data.tokenizer`
the policy's tokenizer and `init_from=POLICY`, trained into DIR as llamax-train would.
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
    scoring = argparse.ArgumentParser(add_help=False, parents=[common])
    scoring.add_argument("--adapters", help="a reward model's LoRA adapters on the checkpoint: "
                         "PEFT dir or run")  # fmt: skip
    score = sub.add_parser("score", parents=[scoring], help="score prompt/response records")
    score.add_argument("--input", required=True, help="jsonl of {prompt, response}")
    score.add_argument("--output", required=True, help="jsonl: each record with its score")
    evaluate = sub.add_parser("eval", parents=[scoring], help="accuracy on preference pairs")
    evaluate.add_argument("--pairs", required=True, help="jsonl of {prompt, chosen, rejected}")
    evaluate.add_argument("--output", required=True, help="directory for the JSON and PNG")
    evaluate.add_argument("--label", help="name in the plot (default: the checkpoint's)")
    rounds = sub.add_parser("sample", parents=[common],
                            help="a round of rejection sampling: best of K per prompt")  # fmt: skip
    rounds.add_argument("--policy", required=True, help="the language model sampled from")
    rounds.add_argument("--policy-tokenizer", help="default: POLICY/tokenizer.model")
    rounds.add_argument("--policy-adapters", help="LoRA adapters on the policy: PEFT dir or run")
    rounds.add_argument("--prompts", required=True, help="jsonl of {prompt}")
    rounds.add_argument("--k", type=int, default=4, help="responses sampled per prompt")
    rounds.add_argument("--temperature", type=float, default=1.0)
    rounds.add_argument("--top-p", type=float, default=1.0)
    rounds.add_argument("--top-k", type=int, default=0)
    rounds.add_argument("--max-new-tokens", type=int, default=128)
    rounds.add_argument("--seed", type=int, default=0)
    rounds.add_argument(
        "--keep-truncated",
        action="store_true",
        help="let answers cut off by --max-new-tokens be kept (default: not)",
    )
    rounds.add_argument("--output", required=True, help="jsonl: the chat SFT data of the round")
    rounds.add_argument("--report", help="JSON file for the round's rewards and counts")
    rounds.add_argument(
        "--finetune",
        metavar="CONFIG",
        help="then fine-tune the policy on OUTPUT: an experiment config file",
    )
    rounds.add_argument("--workdir", help="--finetune: the training run's directory")
    args = parser.parse_args(argv)
    setup_logging()
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.command == "sample":
        problem = _sample_flags_problem(args)
        if problem:
            parser.error(problem)
        try:
            return _sample(args)
        except (ValueError, OSError) as e:
            return error("llamax-reward", e)

    from llamax import reward
    from llamax.data import chat, preference
    from llamax.pretrained import load_with_tokenizer

    try:
        model, params, tokenizer = load_with_tokenizer(
            args.checkpoint, args.tokenizer, dtype=args.dtype, adapters=args.adapters,
            head="score", attention=args.attention,
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
            label = args.label or os.path.basename(fs.absolute(args.adapters or args.checkpoint))
            result.update(checkpoint=args.checkpoint, adapters=args.adapters,
                          pairs_file=args.pairs, skipped=skipped)  # fmt: skip
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


def _sample_flags_problem(args) -> str | None:
    if args.k < 1:
        return "--k must be positive"
    if args.max_new_tokens < 1:
        return "--max-new-tokens must be positive"
    if not args.temperature >= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        return "--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0"
    if args.seed < 0:
        return "--seed must be >= 0"
    if bool(args.finetune) != bool(args.workdir):
        return "--finetune and --workdir go together"
    return None


def load_config_file(path: str):
    """The experiment config of a config file (`configs/X.py`): its `get_config()`."""
    import importlib.util

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--finetune: no config file {path}")
    try:
        spec = importlib.util.spec_from_file_location("llamax_finetune_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # the file's own error, whatever it is
        raise ValueError(f"--finetune: cannot load the config file {path}: "
                         f"{type(e).__name__}: {e}") from None  # fmt: skip


def _finetune_setup(args, tokenizer_path: str):
    """The round's training config, checked before any sampling: it fits the policy, the
    workdir can take it, the policy can be its `init_from`."""
    from llamax import experiment, pretrained, rejection, train

    if args.policy_adapters or pretrained.lora_run(args.policy) is not None:
        raise ValueError(
            "--finetune starts from the policy's own parameters (init_from), which LoRA "
            "adapters are not part of: merge them into a checkpoint first (llamax-convert "
            "--from llamax --input RUN --to llamax, or --from peft --base CKPT) and sample "
            "from that"
        )
    c = rejection.finetune_config(load_config_file(args.finetune), fs.absolute(args.output),
                                  args.policy, tokenizer_path)  # fmt: skip
    experiment.check(c)
    want, have = experiment.model_config(c), pretrained.read_model_config(args.policy)
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "head")
    differ = [f"{f} {getattr(want, f)} (policy: {getattr(have, f)})"
              for f in fields if getattr(want, f) != getattr(have, f)]  # fmt: skip
    if differ:
        raise ValueError(f"--finetune {args.finetune} is not the policy's model: "
                         + "; ".join(differ))  # fmt: skip
    train.check_workdir(args.workdir)
    return c


def _sample(args) -> int:
    """`llamax-reward sample`: one round of rejection sampling, then its fine-tune if asked."""
    import gc

    from llamax import pretrained, rejection
    from llamax.pretrained import load_with_tokenizer

    prompts = rejection.read_prompts(args.prompts)
    records = [{k: v for k, v in r.items() if k != "prompt"} for r in prompts]
    prompts = [r["prompt"] for r in prompts]
    if pretrained.read_model_config(args.checkpoint).head != "score":
        raise ValueError(f"--checkpoint {args.checkpoint} is a language model; this needs a "
                         "reward model (a score head)")  # fmt: skip
    # The fine-tune's config is checked before anything is sampled (its data is tokenized
    # with the tokenizer the policy is loaded with, which load_with_tokenizer checks).
    tokenizer_path = args.policy_tokenizer or fs.join(args.policy, "tokenizer.model")
    c = _finetune_setup(args, tokenizer_path) if args.finetune else None
    # So is the reward model's tokenizer, which scoring needs after the sampling.
    vocab = pretrained.read_model_config(args.checkpoint).vocab_size
    pretrained.checkpoint_tokenizer(args.checkpoint, args.tokenizer, vocab)
    policy = load_with_tokenizer(
        args.policy, args.policy_tokenizer, dtype=args.dtype, adapters=args.policy_adapters,
        head="lm", attention=args.attention,
    )  # fmt: skip
    samples = rejection.sample(
        *policy, prompts, args.k, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed,
        batch_size=args.batch_size,
    )  # fmt: skip
    del policy
    gc.collect()  # the policy's arrays go before the reward model's come
    reward_model = load_with_tokenizer(args.checkpoint, args.tokenizer, dtype=args.dtype,
                                       head="score", attention=args.attention)  # fmt: skip
    result = rejection.finish_round(reward_model, prompts, samples, args.batch_size,
                                    keep_truncated=args.keep_truncated)  # fmt: skip
    del reward_model
    gc.collect()
    kept = [{**records[r["prompt_index"]], **r} for r in result.records]
    rejection.write_dataset(args.output, kept)
    report = {
        **result.report, "policy": args.policy, "policy_adapters": args.policy_adapters,
        "reward_model": args.checkpoint, "prompts_file": args.prompts, "output": args.output,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed,
    }  # fmt: skip
    if args.report:
        fs.write_json(args.report, report, indent=1)
    print(f"round: {rejection.summary(report)} -> {args.output}")
    if c is None:
        return 0
    from llamax import checkpoint, train

    try:
        train.run(c, args.workdir)
    except (FloatingPointError, checkpoint.CheckpointError) as e:
        print(f"llamax-reward: error: the fine-tune stopped: {e}", file=sys.stderr)
        return 1
    print(f"fine-tuned {args.policy} on {args.output} -> {args.workdir}")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
