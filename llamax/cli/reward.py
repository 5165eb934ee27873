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
        help="then fine-tune the policy on OUTPUT: an experiment config file (overrides: "
        "--config.KEY=VALUE after the other flags)",
    )
    rounds.add_argument("--workdir", help="--finetune: the training run's directory")
    args, extra = parser.parse_known_args(argv)
    overrides = _overrides(parser, args, extra)
    setup_logging()
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.command == "sample":
        from llamax.generation import Sampling

        try:
            sampling = Sampling.from_flags(args)
        except ValueError as e:
            parser.error(str(e))
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


def _refuse_existing(flag: str, path: str | None) -> None:
    """An output that exists is not overwritten: a `FileExistsError` naming it."""
    if path and fs.exists(path):
        raise FileExistsError(f"{flag} {path} exists; remove it or choose another path")


def _reward_model(args):
    """(the reward model's LlamaConfig, its tokenizer), read without loading its weights: the
    records are checked against its window before anything is allocated."""
    from llamax import loading, pretrained

    config = pretrained.read_model_config(args.checkpoint)
    return config, loading.checkpoint_tokenizer(args.checkpoint, args.tokenizer,
                                                   config.vocab_size)  # fmt: skip


def _load_reward_model(args):
    from llamax.loading import load_with_tokenizer

    model, params, _ = load_with_tokenizer(
        args.checkpoint, args.tokenizer, dtype=args.dtype, adapters=args.adapters,
        head="score", attention=args.attention,
    )  # fmt: skip
    return model, params


def _score(args) -> int:
    """`llamax-reward score`: every record is read and checked (its format, its length
    against the reward model's window) before the model is loaded; a bad one stops it."""
    import numpy as np

    from llamax import reward
    from llamax.data import preference
    from llamax.data import records as records_lib

    _refuse_existing("--output", args.output)
    config, tokenizer = _reward_model(args)
    lines = records_lib.read_records(
        args.input, records_lib.max_record_bytes(config.max_seq_len, tokenizer)
    )
    parsed, sequences = [], []
    for i in range(len(lines)):
        try:
            record = records_lib.parse(lines[i])
            tokens, _ = preference.response_tokens(
                record.get("prompt"), record.get("response"), tokenizer
            )
        except records_lib.BadRecord as e:
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
    model, params = _load_reward_model(args)
    scores = reward.score_sequences(model, params, sequences, args.batch_size)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{lines.where(int(bad[0]))}: the reward model gives a non-finite "
                         f"score ({scores[bad[0]]}); nothing was written")  # fmt: skip
    text = "".join(json.dumps({**r, "score": float(s)}, allow_nan=False) + "\n"
                   for r, s in zip(parsed, scores, strict=True))  # fmt: skip
    fs.write_text(args.output, text)
    print(f"scored {len(parsed)} responses: mean {scores.mean():.4f}, "
          f"min {scores.min():.4f}, max {scores.max():.4f} -> {args.output}")  # fmt: skip
    return 0


def _evaluate(args) -> int:
    """`llamax-reward eval`: the pairs are read, and the unusable ones counted (too long for
    the reward model's window among them), before the model is loaded."""
    import numpy as np

    from llamax import reward
    from llamax.data import records as records_lib

    config, tokenizer = _reward_model(args)
    limit = records_lib.max_record_bytes(config.max_seq_len, tokenizer)
    try:
        sequences, ratings, skipped = reward.pair_sequences(
            records_lib.read_records(args.pairs, limit), tokenizer, config.max_seq_len
        )
    except ValueError as e:
        raise ValueError(f"{args.pairs}: {e}") from None
    model, params = _load_reward_model(args)
    scores = reward.score_sequences(model, params, sequences, args.batch_size).reshape(-1, 2)
    bad = int((~np.isfinite(scores)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{args.pairs}: the reward model gives non-finite scores to {bad:,} of "
                         f"{len(scores):,} pairs; nothing was written")  # fmt: skip
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
    return 0


def _sample_flags_problem(args) -> str | None:
    if args.k < 1:
        return "--k must be positive"
    if bool(args.finetune) != bool(args.workdir):
        return "--finetune and --workdir go together"
    return None


# What the round sets in its fine-tune's config (`rejection.finetune_config`).
ROUND_KEYS = ("data.source", "data.files", "data.tfds_name", "data.tokenizer", "init_from")


def apply_overrides(c, overrides: list[str], where: str):
    """The experiment config `c` with `--config.KEY=VALUE` overrides applied as llamax-train
    applies them (each value typed as the key's own); an unknown key, a bad value, or a key
    the round sets itself (`ROUND_KEYS`) is a `ValueError` naming it. `where` names the
    config in the messages."""
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    from llamax.cli import flag_error_text

    for arg in overrides:
        if not arg.startswith("--config."):
            continue  # the value of the override before it (--config.KEY VALUE), or absl's
        key = arg.removeprefix("--config.").partition("=")[0]
        if key in ROUND_KEYS:
            raise ValueError(f"--config.{key}: the round sets it ({', '.join(ROUND_KEYS)}: "
                             "its data and the policy); train with llamax-train to change "
                             "it")  # fmt: skip
        node = c
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"--config.{key}: no config key {key!r} in {where}")
            node = node[part]
    values, argv = flags.FlagValues(), ["llamax-reward", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", c, "the fine-tune's config", flag_values=values,
                                        lock_config=True, sys_argv=argv)  # fmt: skip
        rest = values(argv)
    except Exception as e:  # absl's flags errors: a value that is not of the key's type
        raise ValueError(f"{where}: {flag_error_text(e)}") from None
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments after the --config overrides: {rest[1:]}")
    return values["config"].value


def load_config_file(path: str):
    """The experiment config of a config file (`configs/X.py`): its `get_config()`; as with
    llamax-train, `configs/X.py:ARG` passes ARG (`get_config(ARG)`)."""
    import importlib.util

    path, colon, arg = path.partition(":") if ".py:" in path else (path, "", "")
    try:
        fs.require_file(path, "--finetune: ")
    except FileNotFoundError:
        raise FileNotFoundError(f"--finetune: no config file {path}") from None
    try:
        spec = importlib.util.spec_from_file_location("llamax_finetune_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if colon else module.get_config()
    except Exception as e:  # the file's own error, whatever it is
        raise ValueError(f"--finetune: cannot load the config file {path}: "
                         f"{type(e).__name__}: {e}") from None  # fmt: skip


def _finetune_setup(args, tokenizer_path: str, overrides: list[str]):
    """The round's training config, checked before any sampling: CONFIG with the
    `--config.KEY=VALUE` overrides, it fits the policy, the workdir can take it, the policy
    can be its `init_from`."""
    from llamax import experiment, pretrained, rejection, train

    if args.policy_adapters or pretrained.lora_run(args.policy) is not None:
        raise ValueError(
            "--finetune starts from the policy's own parameters (init_from), which LoRA "
            "adapters are not part of: merge them into a checkpoint first (llamax-convert "
            "--from llamax --input RUN --to llamax, or --from peft --base CKPT) and sample "
            "from that"
        )
    c = apply_overrides(load_config_file(args.finetune), overrides, f"--finetune {args.finetune}")
    c = rejection.finetune_config(c, fs.absolute(args.output), args.policy, tokenizer_path)
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


def _sample(args, sampling, overrides: list[str]) -> int:
    """`llamax-reward sample`: one round of rejection sampling, then its fine-tune if asked.
    Everything that can be checked is, before the policy is loaded: the outputs are new, the
    prompts read, the fine-tune's config fits, and the round fits the policy's window and the
    host's memory (`rejection.check_round`)."""
    import gc

    from llamax import loading, pretrained, rejection
    from llamax.data import records as records_lib
    from llamax.loading import load_with_tokenizer

    _refuse_existing("--output", args.output)
    _refuse_existing("--report", args.report)
    policy_config = pretrained.read_model_config(args.policy)
    policy_tokenizer = loading.checkpoint_tokenizer(args.policy, args.policy_tokenizer,
                                                       policy_config.vocab_size)  # fmt: skip
    # A prompt line too long for the policy's window is refused unread.
    limit = records_lib.max_record_bytes(policy_config.max_seq_len, policy_tokenizer)
    prompts = rejection.read_prompts(args.prompts, limit)
    records = [{k: v for k, v in r.items() if k != "prompt"} for r in prompts]
    prompts = [r["prompt"] for r in prompts]
    if pretrained.read_model_config(args.checkpoint).head != "score":
        raise ValueError(f"--checkpoint {args.checkpoint} is a language model; this needs a "
                         "reward model (a score head)")  # fmt: skip
    # The fine-tune's config is checked before anything is sampled (its data is tokenized
    # with the tokenizer the policy is loaded with, which load_with_tokenizer checks).
    tokenizer_path = args.policy_tokenizer or fs.join(args.policy, "tokenizer.model")
    c = _finetune_setup(args, tokenizer_path, overrides) if args.finetune else None
    # So is the reward model's tokenizer, which scoring needs after the sampling.
    vocab = pretrained.read_model_config(args.checkpoint).vocab_size
    loading.checkpoint_tokenizer(args.checkpoint, args.tokenizer, vocab)
    # And the round itself: the prompts and new tokens within the policy's window, the
    # prompts x K samples within the host's memory.
    rejection.check_round(policy_config, policy_tokenizer, prompts, args.k, sampling,
                          args.batch_size)  # fmt: skip
    policy = load_with_tokenizer(
        args.policy, args.policy_tokenizer, dtype=args.dtype, adapters=args.policy_adapters,
        head="lm", attention=args.attention,
    )  # fmt: skip
    samples = rejection.sample(
        *policy, prompts, args.k, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens, seed=sampling.seed,
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
