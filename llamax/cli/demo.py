"""`llamax-demo`: a tiny Llama 2 born sharded on a device mesh, one forward pass and a few
greedy decode steps with the KV cache. On CPU, `make demo` simulates 8 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 llamax-demo --data 2 --fsdp 2 --tensor 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from llamax import Llama, LlamaConfig, sharding
from llamax.model import init_cache, init_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=-1, help="-1: the devices that remain")
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    config = LlamaConfig.preset(args.preset)
    model = Llama(config)
    mesh = sharding.make_mesh(args.data, args.fsdp, args.tensor)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")
    print(f"model {args.preset}: {config.num_params():,} parameters")

    start = time.perf_counter()
    params = init_params(model, jax.random.key(0), mesh)
    jax.block_until_ready(params)
    print(f"initialized, born sharded, in {time.perf_counter() - start:.1f}s")
    print(f"  {'parameter':38} {'shape':>18} {'per device':>18}  mesh axes")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        local = leaf.addressable_shards[0].data.shape
        print(f"  {name:38} {str(leaf.shape):>18} {str(local):>18}  {leaf.sharding.spec}")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len), dtype=np.int32)
    # Two documents packed in each row: the second restarts its positions.
    half = args.seq_len // 2
    segment_ids = np.repeat([[1] * half + [2] * (args.seq_len - half)], args.batch, axis=0)
    positions = np.concatenate([np.arange(half), np.arange(args.seq_len - half)])
    positions = np.broadcast_to(positions, tokens.shape)
    with sharding.use_mesh(mesh):
        forward = jax.jit(lambda p, t, pos, s: model.apply({"params": p}, t, pos, s))
        start = time.perf_counter()
        logits = jax.block_until_ready(forward(params, tokens, positions, segment_ids))
        elapsed = time.perf_counter() - start
    print(
        f"forward {tokens.shape} -> logits {logits.shape} {logits.dtype}, sharded "
        f"{logits.sharding.spec}, finite: {bool(jnp.isfinite(logits).all())}, "
        f"{elapsed:.1f}s with compile"
    )

    steps = 8
    cache = init_cache(config, batch_size=1, max_len=half + steps)
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    prompt = tokens[:1, :half]
    step_logits, cache = decode(params, prompt, cache)
    generated = []
    for _ in range(steps):
        next_token = jnp.argmax(step_logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        generated.append(int(next_token[0, 0]))
        step_logits, cache = decode(params, next_token, cache)
    print(
        f"greedy decode with the KV cache, {steps} tokens after a {half}-token prompt: {generated}"
    )


if __name__ == "__main__":
    main()
