"""Llama 2 13B LoRA fine-tuning on chat data: adapters of rank 64 on every linear layer.

    llamax-convert --from meta --to llamax --input llama-2-13b --output $HOME/ckpt/llama2-13b
    llamax-train --config configs/llama2_13b_lora.py --workdir runs/llama2-13b-lora \
        --config.init_from=$HOME/ckpt/llama2-13b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-13b/tokenizer.model
    llamax-convert --from llamax --to hf --input $HOME/ckpt/llama2-13b --output $HOME/hf/llama2-13b
    llamax-convert --from llamax --to peft --input runs/llama2-13b-lora --output adapters/13b \
        --base-name $HOME/hf/llama2-13b

Recipe: `llamax.experiment.lora_recipe` with the QLoRA paper's Llama settings (Dettmers et
al. 2023: r 64, alpha 16, every linear layer, dropout 0.05, 2e-4) over a frozen bfloat16
base, on the chat SFT recipe's data and batches (64 x 4,096 tokens, 860 steps). For Hu et
al.'s smaller adapters: --config.lora.rank=8 --config.lora.alpha=16 --config.lora.targets=wq,wv.

Hardware: not compiled ahead of time at this size; check a slice with llamax-aot before a run
(docs/tpu_fit.md has the 7B rows: 6.92 GiB per chip on v5e-4 at 1 x 4,096 per chip with a
bfloat16 base, 11.22 GiB on one v5e chip with an int8 one).

Expected: most of full fine-tuning's gain on the same data (the LoRA and QLoRA papers'
finding) with optimizer state for the adapters only. Not run at this size here.
"""

from llamax.experiment import lora_recipe


def get_config():
    return lora_recipe("llama2-13b", rank=64, alpha=16.0, targets="wq,wk,wv,wo,w1,w2,w3")
