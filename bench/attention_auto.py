"""What `attention="auto"` (the default of `load_pretrained`, `llamax-generate`, `llamax-eval`)
runs on this machine's platform, against the `xla` reference, in one process.

    python bench/attention_auto.py [--dim 2048 --layers 8 --seq 2048 --batch 4]

A Llama with grouped-query attention (32 heads, 4 kv heads) and random weights, bfloat16
compute: the backend `auto` resolves to, the largest logit difference from `xla` on packed
documents, the forward and the forward+backward times of both, and greedy decoding through
`llamax.generate` with `auto`. On a GPU `auto` is cuDNN's fused attention; on a CPU it is
`xla` itself. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import llamax
from llamax import attention
from llamax.model import init_params


def _time(f, *args, repeats=10) -> float:
    jax.block_until_ready(f(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    config = llamax.LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=32, n_kv_heads=4,
                                vocab_size=32000, max_seq_len=args.seq)  # fmt: skip
    params = init_params(llamax.Llama(config), jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    segments = np.ones((args.batch, args.seq), np.int32)
    segments[:, args.seq // 3 :] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(args.seq // 3), np.arange(args.seq - args.seq // 3)])
    positions = jnp.asarray(np.broadcast_to(positions, tokens.shape), jnp.int32)
    segments = jnp.asarray(segments)

    results = {}
    for backend in ("auto", "xla"):
        model = llamax.Llama(config, llamax.Execution(dtype="bfloat16", attention=backend))

        def forward(p, t, model=model):
            return model.apply({"params": p}, t, positions, segments)

        def loss(p, t, model=model):
            return jnp.mean(jax.nn.logsumexp(forward(p, t), -1))

        f, g = jax.jit(forward), jax.jit(jax.grad(loss))
        results[backend] = {
            "logits": np.asarray(f(params, tokens), np.float32),
            "forward_ms": 1e3 * _time(f, params, tokens),
            "forward_backward_ms": 1e3 * _time(g, params, tokens),
        }
    q = jnp.zeros((args.batch, args.seq, 32, config.head_dim), jnp.bfloat16)
    resolved = attention.resolve_backend("auto", q, q, True, 512, 512)
    diff = np.abs(results["auto"]["logits"] - results["xla"]["logits"])
    scale = float(np.abs(results["xla"]["logits"]).std())

    auto = llamax.Llama(config, llamax.Execution(dtype="bfloat16", attention="auto"))
    prompts = [list(rng.integers(3, 1000, 100)), list(rng.integers(3, 1000, 37))]
    start = time.perf_counter()
    out = llamax.generate(auto, params, prompts, max_new_tokens=64)
    generate_s = time.perf_counter() - start
    print(json.dumps({
        "bench": "attention_auto",
        "device": jax.devices()[0].device_kind,
        "auto_resolves_to": resolved,
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": 32, "n_kv_heads": 4},
        "batch": args.batch, "seq_len": args.seq, "dtype": "bfloat16",
        "max_abs_logit_diff_auto_vs_xla": float(diff.max()),
        "mean_abs_logit_diff_auto_vs_xla": float(diff.mean()),
        "logit_std": scale,
        **{f"{b}_{k}": round(v[k], 3) for b, v in results.items()
           for k in ("forward_ms", "forward_backward_ms")},
        "generate_2_prompts_64_tokens_s_with_compile": round(generate_s, 2),
        "generated_lengths": [len(o) for o in out],
        "jax": jax.__version__,
        "machine": platform.machine(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
