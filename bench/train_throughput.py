"""Train-step throughput: llamax vs Hugging Face transformers' FlaxLlamaForCausalLM.

    python bench/train_throughput.py --peer-python /tmp/peer/bin/python

Both sides train the same model (dim 512, 8 layers, 8 heads, ffn 1376, vocab 8192) on the
same batch (global batch 8 x 512 tokens) with the same loss and optax AdamW, float32
parameters and bfloat16 compute, on one CPU device, each in its own process: the peer needs
transformers 4.x (`FlaxLlamaForCausalLM` is gone from 5.x), which cannot share a virtual
environment with llamax's test extra. Set the peer up once with

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install transformers==4.46.3 jax==0.10.2 flax==0.12.8 optax==0.2.8

The script runs each side `--rounds` times, alternating, and keeps each side's best round.
MFU is relative to the best bfloat16 matmul throughput measured on the same machine (CPUs
have no published bf16 peak). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DIM, LAYERS, HEADS, FFN, VOCAB, SEQ, BATCH = 512, 8, 8, 1376, 8192, 512, 8


def flops_per_token() -> float:
    # MaxText's accounting (llamax.metrics.flops_per_token), written out so that the peer
    # process needs no llamax.
    matmul = LAYERS * (4 * DIM * DIM + 3 * DIM * FFN) + VOCAB * DIM
    return 6 * matmul + 6 * LAYERS * SEQ * DIM


def matmul_peak_flops() -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _time_steps(step, state, batch, steps: int) -> float:
    """Tokens per second of `steps` calls of `step(state, batch) -> (state, outputs)`."""
    import jax

    state, out = step(state, batch)  # compile
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        state, out = step(state, batch)
    jax.block_until_ready(out)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def _optimizer():
    import optax

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1),
    )


def run_llamax(steps: int) -> float:
    import jax
    import numpy as np

    from llamax import experiment, setup, sharding

    c = experiment.default_config()
    c.model.update(
        preset="llama2-7b",
        dim=DIM,
        n_layers=LAYERS,
        n_heads=HEADS,
        vocab_size=VOCAB,
        multiple_of=32,
        max_seq_len=SEQ,
        dtype="bfloat16",
        scan_unroll=LAYERS,
    )  # the peer runs its layers unrolled too; fmt: skip
    # The peer's optimizer: AdamW at a constant 1e-4 with weight decay on every parameter.
    c.optimizer.update(learning_rate=1e-4, warmup_steps=0, end_learning_rate_ratio=1.0,
                       weight_decay_exclude="")  # fmt: skip
    c.train.update(batch_size=BATCH, seq_len=SEQ, steps=1000)
    s = setup.build(c, setup.make_mesh(c, devices=jax.devices()[:1]))
    assert s.model.config.hidden_dim == FFN
    state = s.init_state(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)
    batch = {
        "tokens": tokens,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy(),
    }
    with sharding.use_mesh(s.mesh):
        return _time_steps(s.train_step, state, s.global_batch(batch), steps)


def run_peer(steps: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=SEQ,
    )  # fmt: skip
    model = FlaxLlamaForCausalLM(config, dtype=jnp.bfloat16, seed=0)
    tx = _optimizer()
    params = model.params
    state = (params, tx.init(params))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)

    def loss_fn(params, tokens):
        logits = model(tokens, params=params).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step_fn(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return _time_steps(jax.jit(step_fn, donate_argnums=0), state, tokens, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["llamax", "peer"], help="measure one side (internal)")
    parser.add_argument("--peer-python", default="/tmp/peer/bin/python")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    if args.impl:
        tokens_per_second = (
            run_llamax(args.steps) if args.impl == "llamax" else run_peer(args.steps)
        )
        print(json.dumps({"tokens_per_second": tokens_per_second, "peak": matmul_peak_flops()}))
        return

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    pythons = {"llamax": sys.executable, "peer": args.peer_python}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl, python in pythons.items():
            out = subprocess.run(
                [python, __file__, "--impl", impl, "--steps", str(args.steps)],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["tokens_per_second"] > best.get(impl, {}).get("tokens_per_second", 0):
                best[impl] = result
    peak = max(r["peak"] for r in best.values())
    fpt = flops_per_token()
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "model": {
                    "dim": DIM,
                    "n_layers": LAYERS,
                    "n_heads": HEADS,
                    "ffn": FFN,
                    "vocab": VOCAB,
                },
                "batch": BATCH,
                "seq_len": SEQ,
                "dtype": "bfloat16 compute, float32 params",
                "llamax_tokens_per_second": round(best["llamax"]["tokens_per_second"], 1),
                "peer": "transformers FlaxLlamaForCausalLM",
                "peer_tokens_per_second": round(best["peer"]["tokens_per_second"], 1),
                "speedup": round(
                    best["llamax"]["tokens_per_second"] / best["peer"]["tokens_per_second"], 3
                ),
                "llamax_mfu": round(best["llamax"]["tokens_per_second"] * fpt / peak, 4),
                "peer_mfu": round(best["peer"]["tokens_per_second"] * fpt / peak, 4),
                "bf16_matmul_peak_tflops": round(peak / 1e12, 4),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            }
        )
    )


if __name__ == "__main__":
    main()
