"""Llama 2 7B supervised fine-tuning as Llama 2-Chat's (Touvron et al. 2023, section 3.1).

    llamax-convert --from meta --to llamax --input llama-2-7b --output $HOME/ckpt/llama2-7b
    llamax-train --config configs/llama2_7b_chat_sft.py --workdir gs://BUCKET/runs/llama2-7b-sft \
        --config.init_from=$HOME/ckpt/llama2-7b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b/tokenizer.model

Recipe: `llamax.experiment.chat_sft_recipe`: chat data (jsonl dialogs or prompt/completion
pairs, docs/data.md) with the loss on the answers, packed; cosine from 2e-5, weight decay 0.1,
64 sequences of 4,096 tokens per step, 860 steps (two epochs of the paper's 27,540 dialogs;
set train.steps for yours), full fine-tuning of every parameter.

Hardware: a v5e-16 slice, fsdp over its 16 chips, 4 sequences per chip. Ahead-of-time check
(llamax-aot, docs/tpu_fit.md): this step at 1 x 4,096 per chip on v5e-16 takes 8.25 GiB per
chip of 16, as the 7B pretraining step does, which at 4 per chip takes 13.54 GiB.

Expected: the paper's SFT model, whose helpfulness and safety its section 3.1 reports, from
data of its quality; on public chat data, a model that follows the chat format and answers
in it. Not run at this size here (docs/finetuning.md has what was measured).
"""

from llamax.experiment import chat_sft_recipe


def get_config():
    return chat_sft_recipe("llama2-7b")
