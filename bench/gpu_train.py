"""GPU training throughput and memory: llamax against transformers in PyTorch, side by side.

    python bench/gpu_train.py                # every variant, about 10 minutes on one H200
    python bench/gpu_train.py --only 1.1b    # one workload (1.1b, 7b-4l, 7b) or `attention`
    python bench/gpu_train.py --smoke        # tiny shapes, any machine (a CPU): checks the script

Workloads (bf16 compute, float32 master weights, AdamW, one GPU):
- `1.1b`: dim 2048, 22 layers, 32 heads over 4 kv heads, ffn 5632, vocab 32000; 8 x 2048.
- `7b-4l`: Llama 2 7B's widths with 4 layers; 4 x 4096.
- `7b`: the whole Llama 2 7B; 2 x 4096, full remat (transformers: gradient checkpointing).

Variants, each in its own process (a fresh GPU memory pool; a failure or an out-of-memory is
reported and the rest go on): llamax as shipped (`attention=auto`, the default; batches packed
4 documents per row, so its attention takes the packed-segment path, while transformers'
rows are single documents), llamax with the layer scan unrolled (the scan/unroll choice for
GPU), transformers' `LlamaForCausalLM` with eager SDPA attention, and the same under
`torch.compile` (1.1b only: its compile alone takes minutes for the larger ones); `unrolled` for
1.1b and 7b. And
`attention`: llamax's cuDNN attention on packed rows (4 documents, grouped-query heads) against
cuDNN's plain causal kernel on the same shapes and the dense-mask path, forward + backward,
after checking packed cuDNN against the `xla` reference in forward and gradients.

MFU is against `llamax.metrics.PEAK_FLOPS` for the GPU's name, with llamax's FLOP count
(MaxText's accounting) for every variant. One JSON line per variant, then one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runs from a checkout without an install (the GPU machine)

WORKLOADS = {
    "1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=32000,
                 batch=8, seq=2048, remat="none"),
    "7b-4l": dict(dim=4096, n_layers=4, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab=32000,
                  batch=4, seq=4096, remat="none"),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab=32000,
               batch=2, seq=4096, remat="full"),
}  # fmt: skip
SMOKE = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=512, batch=2,
             seq=256, remat="none")  # fmt: skip
VARIANTS = (  # (workload, variant), most telling first: a run cut short keeps the main rows
    ("attention", "kernels"),
    ("1.1b", "llamax"), ("1.1b", "hf-eager"), ("7b", "llamax"), ("7b", "hf-eager"),
    ("1.1b", "unrolled"), ("7b-4l", "llamax"), ("7b-4l", "hf-eager"), ("7b", "unrolled"),
    ("1.1b", "hf-compile"),
)  # fmt: skip
DOCUMENTS_PER_ROW = 4


def llama_config(w: dict):
    from llamax.config import LlamaConfig

    return LlamaConfig(dim=w["dim"], n_layers=w["n_layers"], n_heads=w["n_heads"],
                       n_kv_heads=w["n_kv_heads"], ffn_dim=w["ffn_dim"], vocab_size=w["vocab"],
                       max_seq_len=w["seq"])  # fmt: skip


def packed_segments(batch: int, seq: int, seed: int = 0):
    """Segment ids and positions of rows of DOCUMENTS_PER_ROW documents of random lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), DOCUMENTS_PER_ROW - 1, replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq], strict=True)):
            segments[row, a:b], positions[row, a:b] = i + 1, np.arange(b - a)
    return segments, positions


def _timed(run_step, steps: int) -> tuple[float, float]:
    """(seconds per step, compile + first step seconds): `run_step()` blocks until done."""
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    run_step()  # a second warm-up: allocator and autotuning settle
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    return (time.perf_counter() - start) / steps, first


def run_llamax(w: dict, variant: str, steps: int) -> dict:
    import jax
    import numpy as np

    from llamax import experiment, setup, sharding

    c = experiment.default_config()
    c.task = "lm"
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        c.model[key] = w[key]
    c.model.update(vocab_size=w["vocab"], max_seq_len=w["seq"], dtype="bfloat16",
                   remat_policy=w["remat"])  # fmt: skip
    if variant == "unrolled":
        c.model.scan_unroll = w["n_layers"]
    c.optimizer.update(warmup_steps=0)
    c.train.update(batch_size=w["batch"], seq_len=w["seq"], steps=1000)
    s = setup.build(c, setup.make_mesh(c, devices=jax.devices()[:1]))
    tokens = np.random.default_rng(0).integers(0, w["vocab"], (w["batch"], w["seq"]), np.int32)
    segments, positions = packed_segments(w["batch"], w["seq"])
    with sharding.use_mesh(s.mesh):
        start = time.perf_counter()
        state = s.init_state(jax.random.key(0))
        jax.block_until_ready(state)
        init_seconds = time.perf_counter() - start
        batch = s.global_batch({"tokens": tokens, "segment_ids": segments, "positions": positions})
        holder = [state]

        def run_step():
            holder[0], metrics = s.train_step(holder[0], batch)
            jax.block_until_ready(metrics)

        seconds, first = _timed(run_step, steps)
        stats = jax.devices()[0].memory_stats() or {}
    return {"seconds_per_step": seconds, "first_step_seconds": first, "init_seconds": init_seconds,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "device": jax.devices()[0].device_kind, "attention": c.model.attention,
            "scan_unroll": c.model.scan_unroll, "remat": w["remat"],
            "rows": f"packed, {DOCUMENTS_PER_ROW} documents"}  # fmt: skip


def run_hf(w: dict, variant: str, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    config = LlamaConfig(hidden_size=w["dim"], intermediate_size=w["ffn_dim"],
                         num_hidden_layers=w["n_layers"], num_attention_heads=w["n_heads"],
                         num_key_value_heads=w["n_kv_heads"], vocab_size=w["vocab"],
                         max_position_embeddings=w["seq"], attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # initialized on the GPU: float32 master weights
        model = LlamaForCausalLM(config)
    if w["remat"] != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=on_gpu)
    init_seconds = time.perf_counter() - start
    forward = torch.compile(model) if variant == "hf-compile" else model
    tokens = torch.randint(0, w["vocab"], (w["batch"], w["seq"]), device=device)

    def run_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds, first = _timed(run_step, steps)
    return {"seconds_per_step": seconds, "first_step_seconds": first, "init_seconds": init_seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "torch": torch.__version__, "rows": "one document each"}  # fmt: skip


def run_attention(smoke: bool, steps: int) -> dict:
    """cuDNN packed against the xla reference (GQA, several documents per row, padding), then
    forward + backward time of packed, plain causal and dense-mask attention."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llamax import attention

    def inputs(b, t, n, k, h, seed=0):
        rng = np.random.default_rng(seed)
        return [jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.bfloat16) for m in (n, k, k)]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2)))

    # Correctness: 8 query heads over 2 kv heads, documents and right padding; errors relative
    # to the largest value of a float32 `xla` reference, beside bfloat16 `xla`'s own.
    b, t, n, k, h = (2, 256, 8, 2, 64) if smoke else (2, 1024, 8, 2, 128)
    q, key, value = inputs(b, t, n, k, h)
    segments, _ = packed_segments(b, t, seed=1)
    segments[1, -t // 8 :] = 0
    segments = jnp.asarray(segments)

    def outputs(backend, dtype):
        f = loss(lambda q, k, v: attention.attend(q, k, v, segments, segments, backend=backend))
        args = [x.astype(dtype) for x in (q, key, value)]
        out = attention.attend(*args, segments, segments, backend=backend)
        return [np.asarray(x, np.float32) for x in (out, *f(*args)[1])]

    reference = outputs("xla", jnp.float32)
    errors = {}
    for name, backend in (("cudnn", "cudnn"), ("xla_bf16", "xla")):
        got = outputs(backend, jnp.bfloat16)
        errors[name] = {
            x: float(np.max(np.abs(g - r)) / np.max(np.abs(r)))
            for x, g, r in zip(("output", "grad_q", "grad_k", "grad_v"), got, reference,
                               strict=True)
        }  # fmt: skip
    correct = max(errors["cudnn"].values()) < 2e-2

    # Speed at the 1.1B's shapes: [8, 2048] rows, 32 heads over 4.
    b, t, n, k, h = (2, 256, 4, 2, 64) if smoke else (8, 2048, 32, 4, 128)
    q, key, value = inputs(b, t, n, k, h)
    segments = jnp.asarray(packed_segments(b, t)[0])
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    mask = attention.attention_mask(segments, segments)[:, None]
    kernels = {
        "packed": lambda q, k, v: attention.attend(q, k, v, segments, segments, backend="cudnn"),
        "causal": lambda q, k, v: attention.attend(q, k, v, None, None, backend="cudnn"),
        "dense_mask": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation),
    }  # fmt: skip
    times = {}
    for name, fn in kernels.items():
        f = loss(fn)

        def run_step(f=f):
            jax.block_until_ready(f(q, key, value))

        times[name + "_ms"] = 1e3 * _timed(run_step, steps)[0]
    return {"correct": correct, "relative_error_vs_float32_xla": errors,
            "shape": [b, t, n, k, h], **times,
            "packed_over_causal": times["packed_ms"] / times["causal_ms"],
            "device": jax.devices()[0].device_kind}  # fmt: skip


def child(workload: str, variant: str, smoke: bool, steps: int) -> dict:
    if workload == "attention":
        return run_attention(smoke, steps)
    w = SMOKE if smoke else WORKLOADS[workload]
    result = (run_hf if variant.startswith("hf") else run_llamax)(w, variant, steps)
    from llamax import metrics

    tokens_per_second = w["batch"] * w["seq"] / result["seconds_per_step"]
    peak = metrics.peak_flops(result["device"])
    flops = metrics.flops_per_token(llama_config(w), w["seq"])
    return {
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops / peak if peak else None,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one workload: 1.1b, 7b-4l, 7b or attention")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per variant")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.smoke, args.steps)), flush=True)
        return

    variants = [v for v in VARIANTS if args.only in (None, v[0])]
    if not variants:
        sys.exit(f"--only must be one of {sorted({w for w, _ in VARIANTS})}")
    results = []
    start = time.perf_counter()
    for workload, variant in variants:
        record = {"bench": "gpu_train", "workload": workload, "variant": variant}
        if args.smoke:
            record["smoke"] = True
        command = [sys.executable, __file__, "--child", workload, variant, "--steps",
                   str(args.steps), *(["--smoke"] if args.smoke else [])]  # fmt: skip
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if out.returncode:
                lines = (out.stderr or out.stdout).strip().splitlines()
                record["error"] = next((x for x in reversed(lines) if "Error" in x), lines[-1:])
            else:
                record.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            record["error"] = f"timed out after {args.timeout} s"
        except FileNotFoundError as e:
            record["error"] = str(e)
        results.append(record)
        print(json.dumps(record, default=str), flush=True)
    summary = {"bench": "gpu_train", "summary": True, "seconds": time.perf_counter() - start}
    for r in results:
        if r.get("mfu") is not None:
            summary[f"{r['workload']} {r['variant']} mfu"] = round(r["mfu"], 4)
        if "correct" in r:
            summary["attention correct"] = r["correct"]
            summary["attention packed/causal"] = round(r["packed_over_causal"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
