"""Llama 2 7B LoRA on an int8 base: the QLoRA paper's settings, 8-bit instead of 4-bit.

    llamax-train --config configs/llama2_7b_lora_int8.py --workdir runs/llama2-7b-lora-int8 \
        --config.init_from=$HOME/ckpt/llama2-7b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b/tokenizer.model

Recipe: `llamax.experiment.lora_recipe` as configs/llama2_7b_lora.py (r 64, alpha 16, every
linear layer, dropout 0.05, 2e-4, 64 x 4,096 tokens), with the frozen base's layer matrices
held as int8 with a scale per output channel (`lora.base_dtype=int8`, docs/finetuning.md).

Hardware: one v5e chip (v5e-1, 16 GiB), the 64 sequences as 64 accumulated micro-batches
of 1 x 4,096: 11.22 GiB (llamax-aot, docs/tpu_fit.md), where a bfloat16 base needs 17 GiB.

Expected: within noise of the bfloat16-base run (the QLoRA paper found 4-bit NormalFloat
bases match 16-bit ones; 8-bit rounds less). Not run at this size here.
"""

from llamax.experiment import lora_recipe


def get_config():
    c = lora_recipe("llama2-7b", rank=64, alpha=16.0, targets="wq,wk,wv,wo,w1,w2,w3")
    c.lora.base_dtype = "int8"
    c.train.grad_accum_steps = 64  # 1 sequence per micro-batch on one chip
    return c
