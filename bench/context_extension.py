"""A small-scale reproduction of context extension by position interpolation, on CPU: a model
that must retrieve across its whole window, extended 4x by four rotary scalings, each with and
without a short fine-tune.

    .venv/bin/python bench/context_extension.py [--work DIR] [--out DIR]

1. Pretrain a Llama (dim 128, 4 layers, 4 heads / 2 kv heads, vocab 2048) at context 256 on a
   mix of code (this Python installation's standard library sources, as `make demo`; the
   demo's tokenizer, trained here if missing) and passkey episodes: `llamax.evaluate`'s own
   passkey prompt (the needle at a random depth of filler, the question) followed by its
   answer, 136 to 256 tokens long. So the pretrained model learns, within its window, the
   retrieval that the passkey test asks for: an episode's answer can only be copied from
   wherever its needle is.
2. Extend to 1,024 tokens (4x) with (a) no scaling (extrapolation), (b) linear interpolation,
   (c) static NTK and (d) YaRN, each as is and after the same short fine-tune from the same
   pretrained weights: `FINETUNE_STEPS` steps of 4 x 1,024 tokens of the same mix, learning
   rate 2e-4. Its episodes are no longer than the pretraining window, so a fine-tuned model
   that retrieves across 1,024 tokens does so because its positions let it, as in the paper,
   whose fine-tune is plain text.
3. Evaluate each: sliding-window perplexity on held-out standard-library files at 256 to
   2,048 tokens, and passkey accuracy (the same prompt, new keys) at 256, 512 and 1,024 tokens,
   5 depths x `--trials` keys each.

Prints one JSON line per variant and writes `results.json`, `perplexity.png` and
`passkey_*.png` into `--out` (default docs/context_extension). Training phases already done
in `--work` (default runs/context_extension) are not redone (delete it to start over).
Single device; about 46 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np

import llamax
from llamax import evaluate, experiment, train
from llamax.data import corpus
from llamax.data.tokenizer import Tokenizer

SHORT, LONG, FACTOR = 256, 1024, 4.0
PPL_LENGTHS = (SHORT, 2 * SHORT, LONG, 2 * LONG)  # 2,048: beyond every variant's window
PASSKEY_LENGTHS = (SHORT, 2 * SHORT, LONG)
EPISODES = 15_000  # about 2.7M tokens: 62% of the tokens the pipeline reads
PRETRAIN_STEPS, FINETUNE_STEPS = 1500, 100
SCALINGS = {  # name: rope_scaling
    "(a) no scaling": None,
    "(b) linear x4": {"rope_type": "linear", "factor": FACTOR},
    "(c) NTK x4": {"rope_type": "ntk", "factor": FACTOR},
    "(d) YaRN x4": {
        "rope_type": "yarn",
        "factor": FACTOR,
        "original_max_position_embeddings": SHORT,
    },
}


def write_episodes(path: str, tokenizer: Tokenizer, count: int, seed: int) -> None:
    """Passkey episodes as jsonl text: `evaluate.passkey_prompt` and its answer, each checked
    to tokenize as the test's prompt does; lengths from 136 tokens (one filler passage) to
    SHORT, depths uniform."""
    rng = np.random.default_rng(seed)
    with open(path + ".tmp", "w") as f:
        for _ in range(count):
            length, depth = int(rng.integers(136, SHORT + 1)), float(rng.uniform())
            key = int(rng.integers(10000, 100000))
            prompt, answer = evaluate.passkey_prompt(tokenizer, length, depth, key)
            text = tokenizer.decode(prompt[1:] + answer)
            if tokenizer.encode(text, bos=False, eos=False) != prompt[1:] + answer:
                raise ValueError(f"an episode's text does not tokenize as its prompt: {text!r}")
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(path + ".tmp", path)


def base_config(work: str, tokenizer: str):
    c = experiment.default_config()
    c.task = "lm"
    c.model.preset = "tiny"
    c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 128, 4, 4, 2
    c.model.multiple_of, c.model.vocab_size, c.model.max_seq_len = 64, 2048, SHORT
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.data.source = "tfds"
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    c.data.files = f"{stdlib},{os.path.join(work, 'episodes.jsonl')}"
    c.data.tfds_data_dir = os.path.join(work, "tfds")
    c.data.tokenizer = tokenizer
    c.train.progress_bar = False
    c.train.log_every = 50
    c.train.eval_every = 0
    return c


def pretrain_config(work, tokenizer):
    c = base_config(work, tokenizer)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 50
    c.train.steps, c.train.batch_size, c.train.seq_len = PRETRAIN_STEPS, 16, SHORT
    c.checkpoint.every = 500
    return c


def finetune_config(work, tokenizer, scaling):
    c = base_config(work, tokenizer)
    if scaling is not None:
        c.model.rope_scaling.update(scaling)
    c.model.max_seq_len = LONG
    c.init_from = os.path.join(work, "pretrain")
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 2e-4, 10
    c.train.steps, c.train.batch_size, c.train.seq_len = FINETUNE_STEPS, 4, LONG
    c.checkpoint.every = FINETUNE_STEPS
    return c


def _last_loss(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return round(losses[-1], 4)


def main() -> None:
    from llamax.cli import setup_logging

    setup_logging("%(asctime)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/context_extension")
    parser.add_argument("--out", default="docs/context_extension")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    tokenizer_path = "runs/tokenizer/demo.model"
    if not os.path.exists(tokenizer_path):  # the demo's tokenizer, as `make demo` trains it
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "llamax-tokenizer"), "train",
             "--input", stdlib, "--vocab-size", "2048", "--output", tokenizer_path],
            check=True,
        )  # fmt: skip
    tokenizer = Tokenizer(tokenizer_path)
    start = time.perf_counter()
    episodes = os.path.join(args.work, "episodes.jsonl")
    if not os.path.exists(episodes):
        write_episodes(episodes, tokenizer, EPISODES, seed=1)

    pretrained = os.path.join(args.work, "pretrain")
    train.run(pretrain_config(args.work, tokenizer_path), pretrained)
    variants = {}  # name: (rope_scaling, workdir)
    for name, scaling in SCALINGS.items():
        variants[name] = (scaling, pretrained)
        tuned = os.path.join(args.work, "finetune_" + name.split(")")[0].strip("("))
        train.run(finetune_config(args.work, tokenizer_path, scaling), tuned)
        variants[f"{name} + fine-tune"] = (scaling, tuned)

    # Held-out code only (the validation split is by a hash of each document, so these
    # files are held out of the training mix too), the first --eval-tokens tokens.
    builder = corpus.build_corpus(stdlib, os.path.join(args.work, "tfds"), "text", 0.05)
    source = corpus.data_source(builder, "validation")
    texts = (corpus.record_text(source[i], "text") for i in range(len(source)))
    stream = evaluate.token_stream(texts, tokenizer)[: args.eval_tokens]

    results, curves = {}, {}
    for name, (scaling, workdir) in variants.items():
        model, params = llamax.load_pretrained(workdir)
        model = llamax.Llama(model.config.replace(rope_scaling=scaling), model.execution)
        ppl = {n: evaluate.perplexity(model, params, stream, n, batch_size=8)["perplexity"]
               for n in PPL_LENGTHS}  # fmt: skip
        key = evaluate.passkey(model, params, tokenizer, PASSKEY_LENGTHS, trials=args.trials)
        results[name] = {
            "rope_scaling": scaling,
            "fine_tuned": workdir != pretrained,
            "final_train_loss": _last_loss(workdir),
            "perplexity": {str(n): round(p, 3) for n, p in ppl.items()},
            "passkey": key["accuracy"],
            "passkey_mean": {n: sum(a.values()) / len(a) for n, a in key["accuracy"].items()},
        }
        curves[name] = ppl
        print(json.dumps({"bench": "context_extension", "variant": name, **results[name]}))
        slug = name.split(")")[0].strip("(") + ("_tuned" if workdir != pretrained else "")
        evaluate.plot_passkey(key, os.path.join(args.out, f"passkey_{slug}.png"), name)

    evaluate.plot_perplexity(
        curves, os.path.join(args.out, "perplexity.png"),
        "Pretrained at 256 tokens (code + passkey episodes), extended to 1,024",
    )  # fmt: skip
    meta = {
        "command": "bench/context_extension.py",
        "tokens_in_eval_stream": int(len(stream)),
        "episodes": EPISODES,
        "pretrain_steps": PRETRAIN_STEPS,
        "finetune_steps": FINETUNE_STEPS,
        "seconds": round(time.perf_counter() - start),
        "machine": f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
    }
    evaluate.write_json(os.path.join(args.out, "results.json"), {**meta, "variants": results})


if __name__ == "__main__":
    main()
