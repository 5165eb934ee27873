"""Decode throughput: `llamax.generate` vs transformers' (PyTorch) `generate`, same weights.

    .venv/bin/python bench/generate.py

A Llama of dim 512, 8 layers, 8 heads (4 kv heads), vocab 8192, float32 on CPU, built with
random weights in transformers and converted with `llamax.convert.hf.params_from_hf`. Each
side generates 128 new tokens greedily after a 32-token prompt, for batch 1 and batch 8,
after a warm-up call (compilation excluded); the outputs are checked to be identical. Prints
one JSON line. Goal: llamax faster.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import llamax
from llamax.convert.hf import hf_config, params_from_hf

PROMPT, NEW = 32, 128


def main() -> None:
    config = llamax.LlamaConfig(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=32
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**hf_config(config))).eval()
    params = jax.tree.map(jax.numpy.asarray, params_from_hf(hf.state_dict(), config))
    model = llamax.Llama(config)
    rng = np.random.default_rng(0)
    result = {"bench": "generate", "prompt_tokens": PROMPT, "new_tokens": NEW}
    for batch in (1, 8):
        prompts = rng.integers(3, config.vocab_size, (batch, PROMPT)).tolist()
        # eos_id -1: never stop early, so both sides decode exactly NEW tokens.
        llamax.generate(model, params, prompts, NEW, eos_id=-1)  # compile
        start = time.perf_counter()
        ours = llamax.generate(model, params, prompts, NEW, eos_id=-1)
        t_ours = time.perf_counter() - start
        inputs = torch.tensor(prompts)
        with torch.no_grad():
            hf.generate(
                inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            start = time.perf_counter()
            out = hf.generate(inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)  # fmt: skip
            t_hf = time.perf_counter() - start
        same = ours == out[:, PROMPT:].tolist()
        result[f"batch{batch}"] = {
            "llamax_tokens_per_second": round(batch * NEW / t_ours, 1),
            "transformers_tokens_per_second": round(batch * NEW / t_hf, 1),
            "speedup": round(t_hf / t_ours, 2),
            "identical_tokens": same,
        }
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
