"""Input pipeline throughput: raw text to packed global batches, one process.

    .venv/bin/python bench/data_throughput.py

Builds a tfds ArrayRecord corpus from this Python's standard library sources (no download),
trains a 8,000-piece BPE sentencepiece model on them, then times the grain pipeline (global
shuffle, tokenization, packing into 4,096-token rows, batches of 8) and the assembly of each
batch into a global `jax.Array`, as `llamax-train` does. Then the same on a corpus of one
18 MB single-line document (the worst case for a pipeline that tokenizes whole documents),
with the peak memory the pipeline added. Prints one JSON line with tokens/s (tokens
delivered in packed rows, padding included). Goals: >= 200,000 tokens/s; memory for the huge
document bounded by a few batches and a few copies of its text, not by its tokens times the
read-ahead.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import sysconfig
import tempfile
import time

import jax
import numpy as np

from llamax import experiment, setup
from llamax.data import corpus, pipeline
from llamax.data.tokenizer import train_tokenizer

SEQ, BATCH, SECONDS, HUGE_MB = 4096, 8, 10.0, 18


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(s, source, tokenizer: str) -> dict:
    """tokens/s over SECONDS of batches, and how much the peak RSS grew meanwhile."""
    before = _peak_rss_mb()
    it = iter(pipeline.make_dataset(source, tokenizer, SEQ, BATCH, seed=0))
    next(it)  # first batch: opens files, loads the tokenizer
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        batch = s.global_batch(next(it))
        tokens += BATCH * SEQ
    jax.block_until_ready(batch)
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_second": round(tokens / elapsed),
        "peak_rss_growth_mb": round(_peak_rss_mb() - before),
        "non_padding_fraction_last_batch": round(
            float(np.mean(np.asarray(batch["segment_ids"]) > 0)), 4
        ),
    }


def main() -> None:
    work = tempfile.mkdtemp(prefix="llamax-bench-")
    pattern = os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")
    tokenizer = os.path.join(work, "tokenizer.model")
    train_tokenizer(corpus.sample_lines(pattern, "text", 300_000), tokenizer, 8000)
    # One single-line document: stdlib words joined by spaces, HUGE_MB megabytes.
    words = open(os.path.join(sysconfig.get_paths()["stdlib"], "typing.py")).read().split()
    random.seed(0)
    huge_path = os.path.join(work, "huge.txt")
    with open(huge_path, "w") as f:
        f.write(" ".join(random.choice(words) for _ in range(HUGE_MB * 2**20 // 7)))
    huge = corpus.data_source(
        corpus.build_corpus(huge_path, os.path.join(work, "tfds"), "text", 0.0), "train"
    )
    stdlib = corpus.data_source(
        corpus.build_corpus(pattern, os.path.join(work, "tfds"), "text", 0.01), "train"
    )

    c = experiment.default_config()
    c.task = "lm"
    c.train.batch_size, c.train.seq_len = BATCH, SEQ
    s = setup.build(c, setup.make_mesh(c, devices=jax.devices()[:1]))
    corpus_row = _measure(s, stdlib, tokenizer)
    huge_row = _measure(s, huge, tokenizer)
    print(
        json.dumps(
            {
                "bench": "data_throughput",
                "tokens_per_second": corpus_row["tokens_per_second"],
                "documents": len(stdlib),
                "seq_len": SEQ,
                "batch": BATCH,
                "non_padding_fraction_last_batch": corpus_row["non_padding_fraction_last_batch"],
                "one_huge_document": {
                    "megabytes": os.path.getsize(huge_path) / 2**20,
                    "tokens_per_second": huge_row["tokens_per_second"],
                    "peak_rss_growth_mb": huge_row["peak_rss_growth_mb"],
                },
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            }
        )
    )


if __name__ == "__main__":
    main()
