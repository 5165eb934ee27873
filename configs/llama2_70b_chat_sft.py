"""Llama 2 70B supervised fine-tuning as Llama 2-Chat's (Touvron et al. 2023, section 3.1).

    llamax-convert --from meta --to llamax --input llama-2-70b --output $HOME/ckpt/llama2-70b
    llamax-train --config configs/llama2_70b_chat_sft.py --workdir gs://BUCKET/runs/llama2-70b-sft \
        --config.init_from=$HOME/ckpt/llama2-70b --config.data.files='$HOME/chat/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-70b/tokenizer.model

Recipe: `llamax.experiment.chat_sft_recipe`: chat data (jsonl dialogs or prompt/completion
pairs, docs/data.md) with the loss on the answers, packed; cosine from 2e-5, weight decay 0.1,
64 sequences of 4,096 tokens per step, 860 steps (two epochs of the paper's 27,540 dialogs;
set train.steps for yours), full fine-tuning of every parameter.

Hardware: not compiled ahead of time at this batch. The 70B pretraining step takes 17.15 GiB
per chip at 1 x 4,096 on v4-256 (128 chips, docs/tpu_fit.md); 64 sequences do not split over
128 chips with fsdp alone, so use --config.mesh.fsdp=64 --config.mesh.tensor=2 there and
check it with llamax-aot first.

Expected: the paper's SFT model, whose helpfulness and safety its section 3.1 reports, from
data of its quality; on public chat data, a model that follows the chat format and answers
in it. Not run at this size here (docs/finetuning.md has what was measured).
"""

from llamax.experiment import chat_sft_recipe


def get_config():
    return chat_sft_recipe("llama2-70b")
