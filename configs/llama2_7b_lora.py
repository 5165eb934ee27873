"""Llama 2 7B LoRA fine-tuning on chat data: adapters of rank 64 on every linear layer.

    llamax-convert --from meta --to llamax --input llama-2-7b --output $HOME/ckpt/llama2-7b
    llamax-train --config configs/llama2_7b_lora.py --workdir runs/llama2-7b-lora \
        --config.init_from=$HOME/ckpt/llama2-7b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b/tokenizer.model
    llamax-convert --from llamax --to hf --input $HOME/ckpt/llama2-7b --output $HOME/hf/llama2-7b
    llamax-convert --from llamax --to peft --input runs/llama2-7b-lora --output adapters/7b \
        --base-name $HOME/hf/llama2-7b

Recipe: `llamax.experiment.lora_recipe` with the QLoRA paper's Llama settings (Dettmers et
al. 2023: r 64, alpha 16, every linear layer, dropout 0.05, 2e-4) over a frozen bfloat16
base, on the chat SFT recipe's data and batches (64 x 4,096 tokens, 860 steps). For Hu et
al.'s smaller adapters: --config.lora.rank=8 --config.lora.alpha=16 --config.lora.targets=wq,wv.

Hardware: a v5e-4 slice, fsdp over its 4 chips, the 64 sequences as 16 accumulated
micro-batches of 1 x 4,096 per chip: 6.92 GiB per chip (llamax-aot, docs/tpu_fit.md). One
v5e chip does not hold the bfloat16 base and the step (16.81 GiB of temporaries); the int8
base does (configs/llama2_7b_lora_int8.py).

Expected: most of full fine-tuning's gain on the same data (the LoRA and QLoRA papers'
finding) with optimizer state for the adapters only. Not run at this size here.
"""

from llamax.experiment import lora_recipe


def get_config():
    c = lora_recipe("llama2-7b", rank=64, alpha=16.0, targets="wq,wk,wv,wo,w1,w2,w3")
    c.train.grad_accum_steps = 16  # 1 sequence per chip per micro-batch on v5e-4
    return c
