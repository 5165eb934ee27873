"""Llama 2 13B supervised fine-tuning as Llama 2-Chat's (Touvron et al. 2023, section 3.1).

    llamax-convert --from meta --to llamax --input llama-2-13b --output $HOME/ckpt/llama2-13b
    llamax-train --config configs/llama2_13b_chat_sft.py --workdir gs://BUCKET/runs/llama2-13b-sft \
        --config.init_from=$HOME/ckpt/llama2-13b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-13b/tokenizer.model

Recipe: `llamax.experiment.chat_sft_recipe`: chat data (jsonl dialogs or prompt/completion
pairs, docs/data.md) with the loss on the answers, packed; cosine from 2e-5, weight decay 0.1,
64 sequences of 4,096 tokens per step, 860 steps (two epochs of the paper's 27,540 dialogs;
set train.steps for yours), full fine-tuning of every parameter.

Hardware: a v4-128 slice (64 chips, 32 GiB each), fsdp over every chip, one sequence per
chip: the 13B pretraining step, which this is with other data, takes 9.04 GiB per chip at 1
x 4,096 on v4-64 (llamax-aot, docs/tpu_fit.md).

Expected: the paper's SFT model, whose helpfulness and safety its section 3.1 reports, from
data of its quality; on public chat data, a model that follows the chat format and answers
in it. Not run at this size here (docs/finetuning.md has what was measured).
"""

from llamax.experiment import chat_sft_recipe


def get_config():
    return chat_sft_recipe("llama2-13b")
