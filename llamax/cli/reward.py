"""`llamax-reward score|eval --checkpoint RM ...`: use a reward model (docs/preference.md).

    llamax-reward score --checkpoint runs/7b-rm --input answers.jsonl --output scored.jsonl
    llamax-reward eval --checkpoint runs/7b-rm --pairs held_out.jsonl --output eval/7b-rm

A LoRA reward model's run is a checkpoint as any other (its base with the adapters merged and
its own score head); `--adapters` puts a reward model's LoRA adapters (a PEFT sequence
classifier's directory, or a llamax LoRA reward run) on the base `--checkpoint` instead.

`score` reads jsonl records with a `prompt` (a question, or a dialog ending with the user's
turn) and a `response`, and writes each record with its `score` added, in order, to a new
`--output` (an existing one is refused); a bad record, or one longer than the reward model's
window (`max_seq_len`), is an error naming its line, and nothing is written. `eval` reads
preference pairs (as `data.source=preference` does; bad ones, and those longer than the
window, are skipped and counted; none usable is an error giving the reasons) and writes
`accuracy.json` (overall and per rating level, Llama 2's Table 8 layout) and `accuracy.png`
into `--output`. Records are checked before the model is loaded; `--batch-size` rows are
scored a call, fewer when there are fewer.

    llamax-reward sample --policy runs/sft --checkpoint runs/7b-rm --prompts prompts.jsonl \
        --k 4 --temperature 1.0 --output round1.jsonl --report round1.json \
        [--finetune configs/llama2_7b_chat_sft.py --workdir runs/round1]

`sample` is one round of rejection sampling (`llamax.rejection`): `--k` responses to each
prompt (jsonl records with a `prompt`: a question or a dialog ending with the user's turn; a
bad line is an error naming it, and nothing is written) from the policy, each scored by the
reward model `--checkpoint`, the best per prompt written to `--output` as chat SFT data
(`data.source=chat`), with the round's mean and max reward printed and, with `--report`,
written as JSON. With `--finetune CONFIG --workdir DIR` it then fine-tunes the policy on that
data: CONFIG's `get_config()` with `--config.KEY=VALUE` overrides (after the other flags, as
llamax-train takes them), then `data.source=chat`, `data.files=OUTPUT`, `data.tokenizer` the
policy's tokenizer and `init_from=POLICY`, trained into DIR as llamax-train would. An existing
`--output` or `--report` is refused, and so is a round beyond the policy's window or the
host's memory (`--k`, `--max-new-tokens`), before the policy is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys

from llamax import fs
from llamax.cli import (
    add_model_flags,
    add_sampling_flags,
    error,
    load_config,
    model_options,
    refuse_existing,
    sampling_config,
    setup_logging,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-reward", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scoring = argparse.ArgumentParser(add_help=False)
    add_model_flags(scoring, "a reward model: converted or run", batch_size=8)
    score = sub.add_parser("score", parents=[scoring], help="score prompt/response records")
    score.add_argument("--input", required=True, help="jsonl of {prompt, response}")
    score.add_argument("--output", required=True, help="jsonl: each record with its score")
    evaluate = sub.add_parser("eval", parents=[scoring], help="accuracy on preference pairs")
    evaluate.add_argument("--pairs", required=True, help="jsonl of {prompt, chosen, rejected}")
    evaluate.add_argument("--output", required=True, help="directory for the JSON and PNG")
    evaluate.add_argument("--label", help="name in the plot (default: the checkpoint's)")
    rounds = sub.add_parser("sample", help="a round of rejection sampling: best of K per prompt")
    add_model_flags(rounds, "the reward model: converted or run", adapters=False, batch_size=8)
    rounds.add_argument("--policy", required=True, help="the language model sampled from")
    rounds.add_argument("--policy-tokenizer", help="default: POLICY/tokenizer.model")
    rounds.add_argument("--policy-adapters", help="LoRA adapters on the policy: PEFT dir or run")
    rounds.add_argument("--prompts", required=True, help="jsonl of {prompt}")
    rounds.add_argument("--k", type=int, default=4, help="responses sampled per prompt")
    add_sampling_flags(rounds, max_new_tokens=128, temperature=1.0)
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
        help="then fine-tune the policy on OUTPUT: an experiment config file (overrides: "
        "--config.KEY=VALUE after the other flags)",
    )
    rounds.add_argument("--workdir", help="--finetune: the training run's directory")
    args, extra = parser.parse_known_args(argv)
    overrides = _overrides(parser, args, extra)
    setup_logging()
    if args.command == "sample":
        sampling = sampling_config(parser, args)
        problem = _sample_flags_problem(args)
        if problem:
            parser.error(problem)
        try:
            return _sample(args, sampling, overrides)
        except (ValueError, OSError) as e:
            return error("llamax-reward", e)
    try:
        return _score(args) if args.command == "score" else _evaluate(args)
    except (ValueError, OSError) as e:
        return error("llamax-reward", e)


def _overrides(parser, args, extra: list[str]) -> list[str]:
    """The `--config.KEY=VALUE` overrides of `sample --finetune` (what argparse left); any
    other argument it left is an error."""
    if not extra:
        return []
    if args.command == "sample" and args.finetune and extra[0].startswith("--config."):
        return extra
    hint = ("; --config.KEY=VALUE overrides go with sample --finetune, after its flags"
            if any(a.startswith("--config.") for a in extra) else "")  # fmt: skip
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _score(args) -> int:
    """`llamax-reward score` (`reward.score_file`)."""
    from llamax import reward

    refuse_existing("--output", args.output)
    options = model_options(args)
    scores = reward.score_file(args.checkpoint, args.input, args.output, args.batch_size,
                               **options)  # fmt: skip
    print(f"scored {len(scores)} responses: mean {scores.mean():.4f}, "
          f"min {scores.min():.4f}, max {scores.max():.4f} -> {args.output}")  # fmt: skip
    return 0


def _evaluate(args) -> int:
    """`llamax-reward eval` (`reward.evaluate_pairs`): the accuracy table and its plot."""
    from llamax import reward

    result = reward.evaluate_pairs(args.checkpoint, args.pairs, args.batch_size,
                                   **model_options(args))  # fmt: skip
    label = args.label or os.path.basename(fs.absolute(args.adapters or args.checkpoint))
    result.update(checkpoint=args.checkpoint, adapters=args.adapters, pairs_file=args.pairs)
    fs.makedirs(args.output)
    fs.write_json(fs.join(args.output, "accuracy.json"), result, indent=1)
    reward.plot_accuracy({label: result}, fs.join(args.output, "accuracy.png"))
    for level, row in result["by_rating"].items():
        shown = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        print(f"{level}: {shown} ({row['pairs']} pairs)")
    print(f"overall: {result['accuracy']:.1%} ({result['pairs']} pairs; "
          f"{sum(result['skipped'].values())} skipped)")  # fmt: skip
    return 0


def _sample_flags_problem(args) -> str | None:
    if args.k < 1:
        return "--k must be positive"
    if bool(args.finetune) != bool(args.workdir):
        return "--finetune and --workdir go together"
    return None


def _sample(args, sampling, overrides: list[str]) -> int:
    """`llamax-reward sample`: one round of rejection sampling (`rejection.plan_round`, then
    `rejection.run_plan`), then its fine-tune if asked. Everything that can be checked is,
    before the policy is loaded: the outputs are new, the round fits (its prompts, the
    policy's window, the host's memory), and so does the fine-tune's config."""
    from llamax import rejection

    refuse_existing("--output", args.output)
    refuse_existing("--report", args.report)
    plan = rejection.plan_round(
        args.policy, args.checkpoint, args.prompts, args.output, args.k, sampling,
        args.batch_size, report=args.report, keep_truncated=args.keep_truncated,
        policy_tokenizer=args.policy_tokenizer, policy_adapters=args.policy_adapters,
        reward_tokenizer=args.tokenizer, dtype=args.dtype, attention=args.attention,
    )  # fmt: skip
    c = None
    if args.finetune:  # checked before anything is sampled
        from llamax import rounds

        spec = load_config(args.finetune, overrides, "--finetune")
        c = rounds.finetune_config(args.policy, args.output, plan.tokenizer_path, spec,
                                   overrides, args.workdir, args.policy_adapters)  # fmt: skip
    report = rejection.run_plan(plan)
    print(f"round: {rejection.summary(report)} -> {args.output}")
    if c is None:
        return 0
    from llamax import checkpoint

    try:
        rounds.finetune(c, args.workdir)
    except (FloatingPointError, checkpoint.CheckpointError) as e:
        print(f"llamax-reward: error: the fine-tune stopped: {e}", file=sys.stderr)
        return 1
    print(f"fine-tuned {args.policy} on {args.output} -> {args.workdir}")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
