"""A small-scale reproduction of context extension by position interpolation, on CPU.

    .venv/bin/python bench/context_extension.py [--work DIR] [--out DIR]

1. Pretrain a Llama (dim 256, 4 layers, 8 heads / 4 kv heads, vocab 2048) at context 128 on the
   demo corpus (this Python installation's standard library sources, as `make demo`; the
   tokenizer is the demo's, trained here if missing).
2. Extend to 512 tokens, each variant fine-tuned from the same pretrained weights for the
   same short run (100 steps of 8 x 512 tokens, learning rate 3e-4):
   (a) no scaling (plain extrapolation), (b) linear interpolation x4, (c) YaRN x4;
   and without fine-tuning: the pretrained model as is, and (d) dynamic NTK x4.
3. Evaluate each on the corpus' held-out files: sliding-window perplexity at 128, 256, 512
   and 1,024 tokens, and passkey retrieval at 256 and 512 (5 depths x 10 keys; the prompt
   does not fit in 128 tokens of the demo tokenizer).

Prints one JSON line per variant and writes `results.json`, `perplexity.png` and
`passkey_*.png` into `--out` (default docs/context_extension). Training phases already done
in `--work` (default runs/context_extension) are not redone (delete it to start over).
Single device; about 30 minutes on the 2-core development machine (pretraining 16, the
three fine-tunes 8, the evaluation 7).
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

import llamax
from llamax import evaluate, experiment, train
from llamax.data import corpus
from llamax.data.tokenizer import Tokenizer

SHORT, LONG, FACTOR = 128, 512, 4.0
PPL_LENGTHS = (SHORT, 2 * SHORT, LONG, 2 * LONG)  # 1,024: beyond every variant's window
PASSKEY_LENGTHS = (2 * SHORT, LONG)  # the prompt needs more than 128 tokens of this tokenizer
VARIANTS = {  # name: (rope_scaling, fine-tuned)
    "pretrained (no scaling, no fine-tune)": (None, False),
    "(a) no scaling + fine-tune": (None, True),
    "(b) linear x4 + fine-tune": ({"rope_type": "linear", "factor": FACTOR}, True),
    "(c) YaRN x4 + fine-tune": (
        {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": SHORT},
        True,
    ),
    "(d) dynamic NTK x4, no fine-tune": ({"rope_type": "dynamic", "factor": FACTOR}, False),
}


def base_config(work: str, tokenizer: str):
    c = experiment.default_config()
    c.model.preset = "tiny"
    c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 256, 4, 8, 4
    c.model.multiple_of, c.model.vocab_size, c.model.max_seq_len = 64, 2048, SHORT
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.data.source = "tfds"
    c.data.files = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    c.data.tfds_data_dir = os.path.join(work, "tfds")
    c.data.tokenizer = tokenizer
    c.train.progress_bar = False
    c.train.log_every = 50
    return c


def pretrain_config(work, tokenizer):
    c = base_config(work, tokenizer)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 50
    c.train.steps, c.train.batch_size, c.train.seq_len = 800, 32, SHORT
    c.checkpoint.every = 200
    return c


def finetune_config(work, tokenizer, scaling):
    c = base_config(work, tokenizer)
    if scaling is not None:
        c.model.rope_scaling.update(scaling)
        c.model.max_seq_len = SHORT if scaling["rope_type"] == "dynamic" else LONG
    c.init_from = os.path.join(work, "pretrain")
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-4, 10
    c.train.steps, c.train.batch_size, c.train.seq_len = 100, 8, LONG
    c.checkpoint.every = 100
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

    train.run(pretrain_config(args.work, tokenizer_path), os.path.join(args.work, "pretrain"))
    workdirs = {}
    for name, (scaling, tuned) in VARIANTS.items():
        if tuned:
            slug = name.split(")")[0].strip("(")
            workdirs[name] = os.path.join(args.work, f"finetune_{slug}")
            c = finetune_config(args.work, tokenizer_path, scaling)
            train.run(c, workdirs[name])

    c = base_config(args.work, tokenizer_path)
    builder = corpus.build_corpus(c.data.files, c.data.tfds_data_dir, "text", 0.05)
    source = corpus.data_source(builder, "validation")
    texts = (corpus.record_text(source[i], "text") for i in range(len(source)))
    stream = evaluate.token_stream(texts, tokenizer)

    results, curves = {}, {}
    for name, (scaling, tuned) in VARIANTS.items():
        model, params = llamax.load_pretrained(
            workdirs.get(name, os.path.join(args.work, "pretrain"))
        )
        model = llamax.Llama(model.config.replace(rope_scaling=scaling), model.execution)
        ppl = {n: evaluate.perplexity(model, params, stream, n, batch_size=8)["perplexity"]
               for n in PPL_LENGTHS}  # fmt: skip
        key = evaluate.passkey(model, params, tokenizer, PASSKEY_LENGTHS, trials=args.trials)
        results[name] = {
            "rope_scaling": scaling,
            "fine_tuned": tuned,
            "final_train_loss": _last_loss(workdirs.get(name, os.path.join(args.work, "pretrain"))),
            "perplexity": {str(n): round(p, 3) for n, p in ppl.items()},
            "passkey": key["accuracy"],
            "passkey_mean": {n: sum(a.values()) / len(a) for n, a in key["accuracy"].items()},
        }
        curves[name] = ppl
        print(json.dumps({"bench": "context_extension", "variant": name, **results[name]}))
        slug = name.split(")")[0].strip("(").split(" ")[0]
        evaluate.plot_passkey(key, os.path.join(args.out, f"passkey_{slug}.png"), name)

    evaluate.plot_perplexity(
        curves, os.path.join(args.out, "perplexity.png"),
        "Pretrained at 128 tokens, extended to 512",
    )  # fmt: skip
    meta = {
        "command": "bench/context_extension.py",
        "tokens_in_eval_stream": int(len(stream)),
        "seconds": round(time.perf_counter() - start),
        "machine": f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
    }
    evaluate.write_json(os.path.join(args.out, "results.json"), {**meta, "variants": results})


if __name__ == "__main__":
    main()
