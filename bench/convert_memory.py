"""Peak host memory and speed of converting a Meta checkpoint to llamax.

    .venv/bin/python bench/convert_memory.py [--layers 9]

Writes a Meta-layout checkpoint with Llama 2 7B's widths (dim 4096, ffn 11008, vocab 32000,
bfloat16, one shard) and fewer layers (9: 4.2 GB), then runs `llamax-convert --from meta
--to llamax` in a child process, which reports its own peak resident set size (`ru_maxrss`);
its anonymous memory (`RssAnon`) is sampled too. The checkpoint is written by another child,
so that no memory of the writer's is counted. Prints one JSON
line. Goal: peak <= 25% of the checkpoint size, and >= 200 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def write_meta(directory: str, layers: int) -> int:
    import torch

    dim, ffn, vocab = 4096, 11008, 32000
    os.makedirs(directory)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    state = {
        "tok_embeddings.weight": w(vocab, dim),
        "norm.weight": w(dim),
        "output.weight": w(vocab, dim),
    }
    state["rope.freqs"] = torch.ones(64)
    for i in range(layers):
        for name in ("wq", "wk", "wv", "wo"):
            state[f"layers.{i}.attention.{name}.weight"] = w(dim, dim)
        state[f"layers.{i}.feed_forward.w1.weight"] = w(ffn, dim)
        state[f"layers.{i}.feed_forward.w3.weight"] = w(ffn, dim)
        state[f"layers.{i}.feed_forward.w2.weight"] = w(dim, ffn)
        state[f"layers.{i}.attention_norm.weight"] = w(dim)
        state[f"layers.{i}.ffn_norm.weight"] = w(dim)
    path = os.path.join(directory, "consolidated.00.pth")
    torch.save(state, path)
    params = {
        "dim": dim,
        "multiple_of": 256,
        "n_heads": 32,
        "n_layers": layers,
        "norm_eps": 1e-5,
        "vocab_size": -1,
    }
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--write-meta", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_meta:
        write_meta(args.write_meta, args.layers)
        return
    work = tempfile.mkdtemp(prefix="llamax-convert-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        meta_dir, out_dir = os.path.join(work, "meta"), os.path.join(work, "out")
        # The checkpoint is written by a child of its own: a converter forked from this
        # process would otherwise count the pages torch left here in its peak.
        subprocess.run(
            [sys.executable, __file__, "--write-meta", meta_dir, "--layers", str(args.layers)],
            check=True,
        )
        size = os.path.getsize(os.path.join(meta_dir, "consolidated.00.pth"))
        # The converter reports its own peak (ru_maxrss of RUSAGE_SELF) as it exits.
        code = (
            "import resource, sys; from llamax.cli.convert import main; rc = main(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)"
        )
        cmd = [sys.executable, "-c", code, "--from", "meta", "--to", "llamax",
               "--input", meta_dir, "--output", out_dir]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        anon = [0]

        def sample():  # anonymous (heap) memory, without the file pages mapped for I/O
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                anon[0] = max(anon[0], int(line.split()[1]) * 1024)
                except FileNotFoundError:
                    break
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, err = proc.communicate()
        sampler.join()
        elapsed = time.perf_counter() - start
        if proc.returncode:
            sys.exit(err[-3000:])
        peak = int(err.split("maxrss")[-1].split()[0]) * 1024
        print(
            json.dumps(
                {
                    "bench": "convert_memory",
                    "checkpoint_bytes": size,
                    "layers": args.layers,
                    "peak_rss_bytes": peak,
                    "peak_rss_fraction": round(peak / size, 4),
                    "peak_anon_bytes": anon[0],
                    "peak_anon_fraction": round(anon[0] / size, 4),
                    "seconds": round(elapsed, 1),
                    "mb_per_second": round(size / 1e6 / elapsed, 1),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, local disk",
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
