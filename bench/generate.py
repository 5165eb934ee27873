"""Greedy decoding throughput on CPU: the inference engine vs the generation it replaced vs
transformers' (PyTorch) `generate`, on the same weights; and compiles over 10 prompt lengths.

    .venv/bin/python bench/generate.py [--repeats 3]

Two models, float32, random weights (std 0.1) built in transformers and converted with
`llamax.convert.hf.params_from_hf`: the demo's shape (configs/demo.py: dim 256, 4 layers, 8
heads over 4 kv heads, vocab 2,048; 4M parameters) and the tests' tiny one (dim 64, 2 layers,
4 heads over 2 kv heads, vocab 256). Each side generates 128 new tokens greedily after
32-token prompts, at batch 1, 8 and 32, the best of `--repeats` timed calls after a warm-up
call (compilation excluded):

- `engine`: `llamax.inference.Engine.generate`, one slot per prompt (the engine built once:
  its weights unstacked once, outside the timing).
- `before`: the generation llamax had before the engine (kept here, below, to compare in the
  same run): one jit of prefill and a `while_loop` of decode steps over left-padded prompts,
  unstacking the weights inside every call.
- `transformers`: `LlamaForCausalLM.generate(do_sample=False)`.

The three must give the same tokens (`identical_tokens`). Before that, while nothing is
compiled, each llamax path generates for 10 prompt lengths (5, 10, ..., 50 tokens; 8 new
tokens, batch 1) and its XLA compiles are counted, with their seconds (`jax.monitoring`'s
backend-compile events; the engine's prefills apart). One JSON line per measurement, then the
markdown table of docs/performance.md with the command and the machine (its load average
before and after: other work on the machine lowers every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import llamax
from llamax import inference
from llamax.convert.hf import hf_config, params_from_hf
from llamax.inference import Engine, SamplingConfig
from llamax.model import Llama, init_cache, unstack_layers

PROMPT, NEW, BATCHES = 32, 128, (1, 8, 32)
MODELS = {
    "demo (4M)": llamax.LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                                    vocab_size=2048, multiple_of=64, max_seq_len=256),
    "tiny": llamax.LlamaConfig.preset("tiny"),
}  # fmt: skip


# ----- the generation llamax had before the engine (llamax/generation.py until 2026-12-07) -----


@partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _before(params, tokens, segment_ids, positions, *, model, max_new_tokens):
    b, p = tokens.shape
    model = Llama(model.config, model.execution.replace(scan_layers=False))
    params = unstack_layers(params)
    cache = init_cache(model.config, b, p + max_new_tokens, model.execution.dtype, stacked=False)
    logits, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    next_pos = positions[:, -1] + 1

    def body(carry):
        i, token, cache, out = carry
        logits, cache = model.apply({"params": params}, token[:, None],
                                    (next_pos + i - 1)[:, None], jnp.ones((b, 1), jnp.int32),
                                    cache=cache)  # fmt: skip
        new = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return i + 1, new, cache, out.at[:, i].set(new)

    init = (jnp.asarray(1), first, cache, out)
    *_, out = jax.lax.while_loop(lambda c: c[0] < max_new_tokens, body, init)
    return out


def generate_before(model, params, prompts, max_new_tokens):
    """Greedy new tokens as llamax.generate made them before the engine (no EOS)."""
    longest = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), longest), np.int32)
    segment_ids, positions = np.zeros_like(tokens), np.zeros_like(tokens)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[i, longest - n :], segment_ids[i, longest - n :] = prompt, 1
        positions[i, longest - n :] = np.arange(n)
    out = _before(params, tokens, segment_ids, positions, model=model,
                  max_new_tokens=max_new_tokens)  # fmt: skip
    return np.asarray(out).tolist()


# ----- measurements -----


def best_time(fn, repeats: int):
    """(the result of `fn()`, the least seconds of `repeats` calls after a warm-up call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


class Compiles:
    """Counts XLA backend compiles, and their seconds, while active (`jax.monitoring`)."""

    count, seconds, active = 0, 0.0, False

    @classmethod
    def listen(cls, event: str, duration: float, **_kwargs):
        if cls.active and event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1
            cls.seconds += duration


def count_compiles(calls) -> tuple[int, float]:
    """(the XLA compiles of making each of `calls`, their seconds)."""
    Compiles.count, Compiles.seconds, Compiles.active = 0, 0.0, True
    try:
        for call in calls:
            call()
    finally:
        Compiles.active = False
    return Compiles.count, Compiles.seconds


def random_hf(config):
    """A transformers Llama of `config` with random weights large enough that greedy decoding
    meets no near-ties (its default init, std 0.02, gives near-uniform logits whose argmax
    rounding decides), norm scales around 1."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**hf_config(config))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            fill = 1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else None
            p.copy_(fill if fill is not None else 0.1 * torch.randn_like(p))
    return hf


def engine_tokens(engine, prompts, sampling):
    return [c.tokens for c in engine.generate(prompts, sampling, eos_id=-1)]


def hf_tokens(hf, prompts):
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[:, len(prompts[0]) :].tolist()


def bench_model(name: str, config, repeats: int) -> list[dict]:
    """The measurements of one model: its JSON lines, printed as they come."""
    hf = random_hf(config)
    params = jax.tree.map(jnp.asarray, params_from_hf(hf.state_dict(), config))
    model = Llama(config)
    engine = Engine(model, params)
    rows = []
    # First, while nothing is compiled: 10 prompt lengths, batch 1, 8 new tokens.
    lengths = list(range(5, 55, 5))
    prompts = [[list(range(3, 3 + n))] for n in lengths]
    short = SamplingConfig(max_new_tokens=8)
    prefills = inference._prefill._cache_size()
    for path, calls in (
        ("engine", [partial(engine.generate, p, short, eos_id=-1) for p in prompts]),
        ("before", [partial(generate_before, model, params, p, 8) for p in prompts]),
    ):
        compiles, seconds = count_compiles(calls)
        line = {"bench": "generate_compiles", "model": name, "path": path,
                "prompt_lengths": lengths, "new_tokens": 8, "compiles": compiles,
                "compile_seconds": round(seconds, 2)}  # fmt: skip
        if path == "engine":
            line["prefill_compiles"] = inference._prefill._cache_size() - prefills
        print(json.dumps(line), flush=True)
        rows.append(line)
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        prompts = rng.integers(3, config.vocab_size, (batch, PROMPT)).tolist()
        # eos_id -1: never stop early, so every side decodes exactly NEW tokens.
        runs = {
            "engine": partial(engine_tokens, engine, prompts, SamplingConfig(max_new_tokens=NEW)),
            "before": partial(generate_before, model, params, prompts, NEW),
            "transformers": partial(hf_tokens, hf, prompts),
        }
        timed = {path: best_time(run, repeats) for path, run in runs.items()}
        same = timed["engine"][0] == timed["before"][0] == timed["transformers"][0]
        for path, (_, seconds) in timed.items():
            line = {"bench": "generate", "model": name, "path": path, "batch": batch,
                    "prompt_tokens": PROMPT, "new_tokens": NEW, "seconds": round(seconds, 3),
                    "tokens_per_second": round(batch * NEW / seconds, 1),
                    "identical_tokens": same}  # fmt: skip
            print(json.dumps(line), flush=True)
            rows.append(line)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    jax.monitoring.register_event_duration_secs_listener(Compiles.listen)
    load_before = os.getloadavg()
    rows = [row for name, config in MODELS.items()
            for row in bench_model(name, config, args.repeats)]  # fmt: skip
    load_after = os.getloadavg()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, torch "
               f"{torch.__version__}; load average {load_before[0]:.2f} before, "
               f"{load_after[0]:.2f} after")  # fmt: skip
    print(json.dumps({"bench": "generate_machine", "machine": machine}))
    print(table(rows, machine))


def table(rows: list[dict], machine: str) -> str:
    """The markdown of docs/performance.md: tokens/s by model, batch and path, and compiles."""
    out = ["```", ".venv/bin/python bench/generate.py", "```", "", f"Machine: {machine}.", "",
           "| model | batch | engine tokens/s | before tokens/s | transformers tokens/s | "
           "engine / before | engine / transformers | same tokens |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    speed = {(r["model"], r["batch"], r["path"]): r for r in rows if r["bench"] == "generate"}
    for model, batch in dict.fromkeys((m, b) for m, b, _ in speed):
        e, b, t = (speed[model, batch, p] for p in ("engine", "before", "transformers"))
        out.append(
            f"| {model} | {batch} | {e['tokens_per_second']:,.1f} | "
            f"{b['tokens_per_second']:,.1f} | {t['tokens_per_second']:,.1f} | "
            f"{e['tokens_per_second'] / b['tokens_per_second']:.2f} | "
            f"{e['tokens_per_second'] / t['tokens_per_second']:.2f} | "
            f"{'yes' if e['identical_tokens'] else 'NO'} |"
        )
    out += ["", "10 prompt lengths (5, 10, ..., 50 tokens), 8 new tokens each, from nothing "
            "compiled:", "", "| model | path | XLA compiles | of which prefills | compile "
            "seconds |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["bench"] == "generate_compiles":
            prefills = r.get("prefill_compiles", "-")
            out.append(f"| {r['model']} | {r['path']} | {r['compiles']} | {prefills} | "
                       f"{r['compile_seconds']:.1f} |")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
