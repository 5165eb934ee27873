"""Llama 2 7B QLoRA: LoRA on a 4-bit NormalFloat (nf4) base with the QLoRA paper's settings.

    llamax-train --config configs/llama2_7b_qlora_nf4.py --workdir runs/llama2-7b-qlora \
        --config.init_from=$HOME/ckpt/llama2-7b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b/tokenizer.model

Recipe: `llamax.experiment.lora_recipe` as configs/llama2_7b_lora.py (r 64, alpha 16, every
linear layer, 2e-4, no weight decay, 64 x 4,096 tokens of chat data), with the frozen base's
layer matrices held as NF4 (`lora.base_dtype=nf4`, docs/finetuning.md: 4-bit codes with a
float32 absmax per 64 weights, as bitsandbytes' NF4, without double quantization) and the
rest of QLoRA's hyperparameters (Dettmers et al. 2023, appendix B.2, for 7B): LoRA dropout
0.1, Adam beta2 0.999, gradient clipping at norm 0.3, a constant learning rate after the
warm-up (3%); bfloat16 compute, as QLoRA's. Not QLoRA's: its batches (16 examples of up to
512 tokens) and its paged optimizer (nothing is offloaded here).

Hardware: one v5e chip (v5e-1, 16 GiB), the 64 sequences as 64 accumulated micro-batches
of 1 x 4,096: 8.39 GiB (llamax-aot, docs/tpu_fit.md), where the int8 base of
configs/llama2_7b_lora_int8.py needs 11.22 GiB (4.5 bits per matrix weight instead of 8).

Expected: the QLoRA paper found NF4 bases match 16-bit ones after fine-tuning. Not run at
this size here.
"""

from llamax.experiment import lora_recipe


def get_config():
    c = lora_recipe("llama2-7b", rank=64, alpha=16.0, targets="wq,wk,wv,wo,w1,w2,w3")
    c.lora.base_dtype = "nf4"
    c.lora.dropout = 0.1  # QLoRA's for 7B and 13B
    c.optimizer.b2 = 0.999
    c.optimizer.grad_clip_norm = 0.3
    c.optimizer.end_learning_rate_ratio = 1.0  # constant after the warm-up
    c.train.grad_accum_steps = 64  # 1 sequence per micro-batch on one chip
    return c
