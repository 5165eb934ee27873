"""Fine-tuning on CPU, measured: a synthetic chat task whose answers can be checked exactly.

    .venv/bin/python bench/finetune.py [--base runs/demo] [--steps 150] [--workdir runs/finetune]

A small Llama (the demo model's shape: dim 256, 4 layers, 8 heads over 4) pretrained on this
Python installation's standard library sources, as `make demo` trains it (`--base` takes a
`make demo` workdir; without one, a shorter pretraining of `--base-steps` steps is run), is
fine-tuned on dialogs of a lookup task: 16 made-up places, each with a code (`Velmor` ->
`amber 1`), asked about in several phrasings, with follow-up turns ("And Quiren?") and
system prompts. Training dialogs use four question phrasings, held-out dialogs two others
and other combinations, so a right answer needs the fact and the format, not the sentence.
Each variant trains `--steps` steps of 16 packed rows of 128 tokens with `llamax-train`'s
loop: full SFT, LoRA of rank 4, 16 and 64 on every matrix, LoRA r16 on an int8 and on an nf4
base, and full SFT with the loss on every token (prompts too). Reported per variant, one JSON line
each: exact-match accuracy of greedy answers to the last question of 96 held-out dialogs,
parameters + optimizer state per step (bytes), trainable parameters, and tokens/s; then a
markdown table for docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sysconfig
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PLACES = ["Velmor", "Quiren", "Ostrava", "Dellin", "Marrow", "Tesk", "Brindle", "Calder",
          "Fennick", "Gorse", "Halden", "Ivor", "Jessup", "Korrin", "Lathe", "Mirren"]  # fmt: skip
COLOURS = ["amber", "blue", "coral", "dusk", "ember", "frost", "green", "hazel"]
TRAIN_ASK = ["What is the code of {p}?", "Tell me {p}'s code.", "Which code does {p} have?",
             "Give the code for {p}."]  # fmt: skip
HELD_OUT_ASK = ["I need the code of {p}, please.", "{p}: what code?"]
FOLLOW = ["And {p}?", "What about {p}?"]
SYSTEMS = ["", "Answer with the code only.", "You are a helpful assistant."]


def code(place: str) -> str:
    i = PLACES.index(place)
    return f"{COLOURS[i % len(COLOURS)]} {i % 7 + 1}"


def dialog(rng: random.Random, asks: list[str]) -> list[dict]:
    turns = []
    system = rng.choice(SYSTEMS)
    if system:
        turns.append({"role": "system", "content": system})
    places = rng.sample(PLACES, rng.randint(1, 3))
    for i, place in enumerate(places):
        template = rng.choice(asks) if i == 0 else rng.choice(FOLLOW + asks)
        turns += [{"role": "user", "content": template.format(p=place)},
                  {"role": "assistant", "content": code(place)}]  # fmt: skip
    return turns


def demo_tokenizer(workdir: str) -> str:
    """`workdir`/tokenizer.model: the demo's 2,048-piece tokenizer, trained on this Python's
    standard library sources the first time."""
    from llamax.data.tokenizer import train_tokenizer

    tokenizer = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(tokenizer):
        stdlib, texts = sysconfig.get_paths()["stdlib"], []
        for name in sorted(os.listdir(stdlib)):
            if name.endswith(".py"):
                with open(os.path.join(stdlib, name), errors="replace") as f:
                    texts += [line for line in f.read().splitlines() if line.strip()]
        train_tokenizer(texts, tokenizer, vocab_size=2048)
    return tokenizer


def write_jsonl(path: str, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def pretrain_base(workdir: str, steps: int, tokenizer: str) -> str:
    from llamax import train
    from llamax.experiment import default_config

    c = default_config()
    c.task = "lm"
    c.model.update(preset="tiny", dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                   multiple_of=64, vocab_size=2048, max_seq_len=256)  # fmt: skip
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.update(source="tfds", files=os.path.join(sysconfig.get_paths()["stdlib"], "*.py"),
                  tfds_data_dir=os.path.join(workdir, "tfds"), tokenizer=tokenizer)  # fmt: skip
    c.optimizer.update(learning_rate=3e-3, warmup_steps=30)
    c.train.update(steps=steps, batch_size=16, seq_len=256, log_every=50, eval_every=0,
                   progress_bar=False)  # fmt: skip
    path = os.path.join(workdir, "base")
    if not os.path.exists(os.path.join(path, "checkpoints")):
        train.run(c, path)
    return path


# LoRA's learning rate is 10x full SFT's, the usual ratio (QLoRA: 2e-4 against 2e-5).
VARIANTS = {  # name: (lora rank, base dtype, train on, learning rate)
    "full SFT": (0, "", "answers", 1e-3),
    "LoRA r4": (4, "float32", "answers", 1e-2),
    "LoRA r16": (16, "float32", "answers", 1e-2),
    "LoRA r64": (64, "float32", "answers", 1e-2),
    "LoRA r16, int8 base": (16, "int8", "answers", 1e-2),
    "LoRA r16, nf4 base": (16, "nf4", "answers", 1e-2),
    "full SFT, loss on everything": (0, "", "everything", 1e-3),
}


def finetune(name, base, data, tokenizer, workdir, steps) -> dict:
    import jax
    import numpy as np

    from llamax import experiment, setup, train
    from llamax.metrics import read_metrics

    rank, base_dtype, train_on, lr = VARIANTS[name]
    c = experiment.default_config()
    c.task = "sft"
    c.model.update(preset="tiny", dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                   multiple_of=64, vocab_size=2048, max_seq_len=256)  # fmt: skip
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.update(source="chat", files=data, tokenizer=tokenizer, chat_train_on=train_on,
                  validation_fraction=0.0)  # fmt: skip
    c.optimizer.update(learning_rate=lr, warmup_steps=10, weight_decay=0.0)
    c.train.update(steps=steps, batch_size=16, seq_len=128, log_every=10, eval_every=0,
                   progress_bar=False)  # fmt: skip
    c.checkpoint.every = 0
    c.init_from = base
    if rank:
        c.lora.update(rank=rank, alpha=2.0 * rank, targets="wq,wk,wv,wo,w1,w2,w3",
                      base_dtype=base_dtype)  # fmt: skip
    s = setup.build(c, setup.make_mesh(c))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    trainable = sum(x.size for x in jax.tree.leaves(s.abstract.params))
    path = os.path.join(workdir, name.replace(" ", "_").replace(",", ""))
    start = time.perf_counter()
    train.run(c, path)
    seconds = time.perf_counter() - start
    speeds = [r["tokens_per_second"] for r in read_metrics(path) if r["tokens_per_second"]]
    return {"path": path, "trainable_params": int(trainable),
            "state_bytes": nbytes(s.abstract.params) + nbytes(s.abstract.opt_state)
            + nbytes(s.abstract.frozen),
            "tokens_per_second": float(np.median(speeds)), "train_seconds": seconds}  # fmt: skip


def accuracy(path: str, tokenizer_path: str, dialogs: list[list[dict]]) -> float:
    from llamax import generation, loading
    from llamax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    model, params = loading.load_pretrained(path)
    right = 0
    for start in range(0, len(dialogs), 32):
        batch = dialogs[start : start + 32]
        prompts = [generation.chat_tokens(d[:-1], tok) for d in batch]
        outs = generation.generate(model, params, prompts, max_new_tokens=8, eos_id=tok.eos_id)
        right += sum(
            tok.decode(o).strip() == d[-1]["content"] for o, d in zip(outs, batch, strict=True)
        )
    return right / len(dialogs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a `make demo` workdir (default: pretrain one here)")
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default="runs/finetune")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    if args.base:
        tokenizer = os.path.join(args.base, "tokenizer.model")
    else:
        tokenizer = demo_tokenizer(args.workdir)
    base = args.base or pretrain_base(args.workdir, args.base_steps, tokenizer)

    rng = random.Random(0)
    train_dialogs = [dialog(rng, TRAIN_ASK) for _ in range(4000)]
    held_out = [dialog(rng, HELD_OUT_ASK) for _ in range(96)]
    data = os.path.join(args.workdir, "train.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"messages": d}) + "\n" for d in train_dialogs)

    rows = [
        {"variant": "base, before fine-tuning", "accuracy": accuracy(base, tokenizer, held_out)}
    ]
    print(json.dumps({"bench": "finetune", **rows[0]}), flush=True)
    for name in VARIANTS:
        r = finetune(name, base, data, tokenizer, args.workdir, args.steps)
        r = {"variant": name, "accuracy": accuracy(r["path"], tokenizer, held_out), **r}
        print(json.dumps({"bench": "finetune", **r}), flush=True)
        rows.append(r)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.steps} steps of 16 x 128 tokens each, on {machine}:\n")
    print("| variant | exact match (96 held-out dialogs) | trainable parameters | "
          "parameters + optimizer state | tokens/s |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        if "trainable_params" not in r:
            print(f"| {r['variant']} | {r['accuracy']:.0%} | | | |")
            continue
        print(f"| {r['variant']} | {r['accuracy']:.0%} | {r['trainable_params']:,} | "
              f"{r['state_bytes'] / 2**20:.1f} MiB | {r['tokens_per_second']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
