"""From an SFT model to preferences, measured on CPU: a synthetic task whose true reward is known.

    .venv/bin/python bench/preference.py [--sft runs/finetune/full_SFT] [--workdir runs/preference]
    .venv/bin/python bench/preference.py --write-data DIR   # the task's files alone

The task is bench/finetune.py's lookup (16 made-up places, each with a code such as
`amber 2`), and the policy is its full-SFT model (`--sft`; without one, bench/finetune.py's
base and full SFT are trained first). The true reward of an answer to "what is the code of
P?" is 1 when it is P's code, 0.5 when only the colour is right, 0.25 when only the number is,
0 otherwise. Preference pairs set two such answers side by side (the right code and subtly
wrong ones), the better one chosen, rated by the gap in true reward as Llama 2's annotators
rated by how much better: 1 "significantly better", 0.75 "better", 0.5 "slightly better",
0.25 "negligibly better / unsure". Training pairs ask with bench/finetune.py's training
phrasings, held-out pairs and prompts with its held-out ones.

Measured, one JSON line each, then markdown tables for docs/preference.md:
1. reward models (`model.head=score`, from the SFT model's body) trained with Llama 2's small
   margins and with none: accuracy on held-out pairs per rating level (Table 8's layout);
2. the true reward of greedy answers to held-out prompts, before and after one and two rounds
   of rejection sampling (K samples per prompt at temperature 1, scored by the margin reward
   model, the best kept, `llamax.rejection`; then SFT on them), and after DPO on the
   training pairs (reference: the SFT model);
3. the time per step of each training run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import finetune  # noqa: E402  (bench/finetune.py: the task and its SFT model)
from finetune import COLOURS, HELD_OUT_ASK, PLACES, SYSTEMS, TRAIN_ASK, code  # noqa: E402

GAP_RATING = {1.0: "significantly better", 0.75: "better", 0.5: "slightly better",
              0.25: "negligibly better / unsure"}  # fmt: skip
ROWS, SEQ_LEN = 16, 128


def true_reward(place: str, answer: str) -> float:
    colour, number = code(place).split()
    words = answer.strip().split()
    if words == [colour, number]:
        return 1.0
    right_colour = len(words) == 2 and words[0] == colour
    right_number = len(words) == 2 and words[1] == number
    return 0.5 if right_colour else 0.25 if right_number else 0.0


def answers(place: str, rng: random.Random) -> dict[float, str]:
    """An answer of each true reward: right, colour only, number only, neither."""
    colour, number = code(place).split()
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    other_number = str(rng.choice([n for n in range(1, 8) if str(n) != number]))
    return {1.0: f"{colour} {number}", 0.5: f"{colour} {other_number}",
            0.25: f"{other_colour} {number}", 0.0: f"{other_colour} {other_number}"}  # fmt: skip


def prompt(rng: random.Random, asks: list[str], place: str) -> list[dict]:
    system = rng.choice(SYSTEMS)
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": rng.choice(asks).format(p=place)}]


def pairs(rng: random.Random, asks: list[str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        place = rng.choice(PLACES)
        options = answers(place, rng)
        better, worse = sorted(rng.sample(sorted(options), 2), reverse=True)
        out.append({"prompt": prompt(rng, asks, place), "chosen": options[better],
                    "rejected": options[worse], "rating": GAP_RATING[better - worse],
                    "place": place})  # fmt: skip
    return out


def config(task: str, init_from: str, tokenizer: str, files: str, steps: int, lr: float, **keys):
    from llamax import experiment

    c = experiment.default_config()
    c.task = task
    c.model.update(preset="tiny", dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                   multiple_of=64, vocab_size=2048, max_seq_len=256)  # fmt: skip
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.update(files=files, tokenizer=tokenizer, validation_fraction=0.0)
    c.optimizer.update(learning_rate=lr, warmup_steps=5, weight_decay=0.0)
    c.train.update(steps=steps, batch_size=ROWS, seq_len=SEQ_LEN, log_every=5, eval_every=0,
                   progress_bar=False)  # fmt: skip
    c.checkpoint.every = 0
    c.init_from = init_from
    for key, value in keys.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def train(c, path: str) -> dict:
    """Runs (or reuses) a training run; its median seconds per step after the first."""
    import numpy as np

    from llamax import train as loop
    from llamax.metrics import read_metrics

    if not os.path.exists(os.path.join(path, "checkpoints")):
        loop.run(c, path)
    records = read_metrics(path)
    speeds = [r["tokens_per_second"] for r in records if r["tokens_per_second"]]
    tokens = c.train.batch_size * c.train.seq_len
    return {"path": path, "steps": c.train.steps, "seconds_per_step": tokens / np.median(speeds),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "last": records[-1]}  # fmt: skip


def greedy_reward(path: str, tokenizer: str, prompts: list[tuple[str, list[dict]]]) -> float:
    from llamax import generation, loading
    from llamax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    model, params = loading.load_pretrained(path)
    total = 0.0
    for start in range(0, len(prompts), 32):
        batch = prompts[start : start + 32]
        ids = [generation.chat_tokens(p, tok) for _, p in batch]
        outs = generation.generate(model, params, ids, max_new_tokens=8, eos_id=tok.eos_id)
        pairs = zip(outs, batch, strict=True)
        total += sum(true_reward(place, tok.decode(o)) for o, (place, _) in pairs)
    return total / len(prompts)


def write_data(directory: str, seed: int = 0) -> None:
    """The task's files for the walkthrough (docs/finetuning.md, configs/walkthrough.py):
    `chat.jsonl` (dialogs of the lookup task), `pairs.jsonl` (preference pairs with ratings)
    and `prompts.jsonl` (questions for a rejection-sampling round)."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    files = {
        "chat.jsonl": [{"messages": finetune.dialog(rng, TRAIN_ASK)} for _ in range(400)],
        "pairs.jsonl": pairs(rng, TRAIN_ASK, 400),
        "prompts.jsonl": [{"prompt": prompt(rng, TRAIN_ASK, rng.choice(PLACES))}
                          for _ in range(16)],
    }  # fmt: skip
    for name, records in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {', '.join(files)} to {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sft",
        default="runs/finetune/full_SFT",
        help="bench/finetune.py's full-SFT run (made when missing)",
    )
    parser.add_argument("--workdir", default="runs/preference")
    parser.add_argument("--rm-steps", type=int, default=60)
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--dpo-lr", type=float, nargs="+", default=[1e-4, 1e-5])
    parser.add_argument("--rs-steps", type=int, default=30, help="SFT steps per round")
    parser.add_argument("--rs-prompts", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--write-data",
        metavar="DIR",
        help="only write the task's chat, pair and prompt files into DIR",
    )
    args = parser.parse_args()
    if args.write_data:
        write_data(args.write_data)
        return
    os.makedirs(args.workdir, exist_ok=True)
    from llamax import loading, rejection, reward
    from llamax.data import records as records_lib
    from llamax.data.tokenizer import Tokenizer

    tokenizer = os.path.join(os.path.dirname(args.sft), "tokenizer.model")
    if not os.path.exists(os.path.join(args.sft, "checkpoints")):  # bench/finetune.py's
        import sys

        sys.argv = ["finetune.py", "--workdir", os.path.dirname(args.sft), "--steps", "150"]
        finetune.VARIANTS = {"full SFT": finetune.VARIANTS["full SFT"]}
        finetune.main()
    rng = random.Random(0)
    train_pairs, held_pairs = pairs(rng, TRAIN_ASK, 3000), pairs(rng, HELD_OUT_ASK, 400)
    held_prompts = [(p, prompt(rng, HELD_OUT_ASK, p)) for p in PLACES for _ in range(6)]
    files = os.path.join(args.workdir, "pairs.jsonl")
    with open(files, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in train_pairs)
    emit = lambda r: print(json.dumps({"bench": "preference", **r}), flush=True)  # noqa: E731

    # 1. reward models, with and without margins
    tok, rms = Tokenizer(tokenizer), {}
    for margins in ("small", "none"):
        c = config("reward", args.sft, tokenizer, files, args.rm_steps, 3e-4,
                   **{"data.source": "preference",
                      "data.pairs_per_row": 2, "reward.margins": margins})  # fmt: skip
        run = train(c, os.path.join(args.workdir, f"rm_{margins}"))
        model, params = loading.load_pretrained(run["path"])
        scores, ratings, _ = reward.pair_scores(model, params, tok, held_pairs)
        rms[margins] = {**run, "eval": reward.accuracy_by_rating(scores, ratings)}
        emit({"run": f"reward model, {margins} margins", "accuracy": rms[margins]["eval"],
              "seconds_per_step": run["seconds_per_step"]})  # fmt: skip

    # 2. rejection sampling: two rounds from the SFT model, scored by the margin RM
    rewards = {"SFT model": greedy_reward(args.sft, tokenizer, held_prompts)}
    emit({"policy": "SFT model", "true_reward": rewards["SFT model"]})
    policy, timing = args.sft, {}
    rs_prompts = [prompt(rng, TRAIN_ASK, rng.choice(PLACES)) for _ in range(args.rs_prompts)]
    for n in (1, 2):
        data = os.path.join(args.workdir, f"rs_round{n}.jsonl")
        if not os.path.exists(data):
            start = time.perf_counter()
            loaded = loading.load_with_tokenizer(policy)
            rm = loading.load_with_tokenizer(rms["small"]["path"], head="score")
            done = rejection.run_round(loaded, rm, rs_prompts, args.k, batch_size=64,
                                       temperature=1.0, max_new_tokens=8, seed=n)  # fmt: skip
            rejection.write_dataset(data, done.records)
            emit({"round": n, **done.report, "sample_seconds": time.perf_counter() - start})
        c = config("sft", policy, tokenizer, data, args.rs_steps, 3e-4,
                   **{"data.source": "chat"})  # fmt: skip
        run = train(c, os.path.join(args.workdir, f"rs_round{n}"))
        policy, timing[f"rejection sampling round {n} (SFT)"] = run["path"], run
        name = f"after rejection sampling round {n}"
        rewards[name] = greedy_reward(policy, tokenizer, held_prompts)
        emit(
            {
                "policy": name,
                "true_reward": rewards[name],
                "chosen": len(records_lib.read_records(data)),
            }
        )

    # 3. DPO on the training pairs from the SFT model, at two learning rates
    for lr in args.dpo_lr:
        c = config("dpo", args.sft, tokenizer, files, args.dpo_steps, lr,
                   **{"data.source": "preference", "data.pairs_per_row": 2})  # fmt: skip
        run = train(c, os.path.join(args.workdir, f"dpo_lr{lr:g}"))
        name = f"after DPO (lr {lr:g})"
        timing[f"DPO (lr {lr:g})"] = run
        rewards[name] = greedy_reward(run["path"], tokenizer, held_prompts)
        emit({"policy": name, "true_reward": rewards[name], "last_step": run["last"],
              "seconds_per_step": run["seconds_per_step"]})  # fmt: skip

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\nReward models ({args.rm_steps} steps of {ROWS} rows x 2 pairs), accuracy on "
          f"{len(held_pairs)} held-out pairs, on {machine}:\n")  # fmt: skip
    print("| margins | " + " | ".join(GAP_RATING.values()) + " | overall |")
    print("|---|---|---|---|---|---|")
    for margins, r in rms.items():
        cells = []
        for level in GAP_RATING.values():
            row = r["eval"]["by_rating"][level]
            cells.append(f"{row['accuracy']:.1%} ({row['pairs']})")
        print(f"| {margins} | " + " | ".join(cells) + f" | {r['eval']['accuracy']:.1%} |")
    print(f"\nTrue reward of greedy answers to {len(held_prompts)} held-out prompts:\n")
    print("| policy | mean true reward |\n|---|---|")
    for name, value in rewards.items():
        print(f"| {name} | {value:.3f} |")
    print("\nDPO's last logged step (means over its pairs):\n")
    print("| learning rate | loss | implicit reward accuracy | margin | log p chosen | "
          "log p rejected |\n|---|---|---|---|---|---|")  # fmt: skip
    for lr in args.dpo_lr:
        m = timing[f"DPO (lr {lr:g})"]["last"]
        print(
            f"| {lr:g} | {m['loss']:.3f} | {m['reward_accuracy']:.0%} | "
            f"{m['reward_margin']:.3f} | {m['chosen_logp']:.2f} | {m['rejected_logp']:.2f} |"
        )
    print("\nTime per step:\n\n| run | steps | seconds per step |\n|---|---|---|")
    for name, r in [*((f"reward model, {m} margins", r) for m, r in rms.items()),
                    *timing.items()]:  # fmt: skip
        print(f"| {name} | {r['steps']} | {r['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
