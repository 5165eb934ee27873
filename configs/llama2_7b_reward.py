"""A Llama 2 7B reward model as Llama 2-Chat's (Touvron et al. 2023, section 3.2.2).

    llamax-train --config configs/llama2_7b_reward.py --workdir gs://BUCKET/runs/llama2-7b-rm \
        --config.init_from=$HOME/ckpt/llama2-7b-chat --config.data.files='$HOME/pairs/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b-chat/tokenizer.model

Recipe: `llamax.experiment.reward_recipe`: the chat (or SFT) model's body with a new score
head, preference pairs (jsonl of prompt, chosen, rejected, rating; docs/preference.md), Llama
2's ranking loss with the small margin table; one epoch at a peak of 1e-5, cosine to 10%, 3%
warm-up, 512 pairs per step (set train.steps to one epoch of your pairs / 512).

Hardware: as the 7B pretraining config (fsdp over every chip, full remat, bfloat16): a
pair is one row of 4,096 tokens, so the step's memory is pretraining's at the same rows per
chip, less the output matrix.

Expected: a reward model that ranks held-out pairs of your preference data about as the
paper's ranked Meta's (its Table 7: roughly 60-70% overall; far more on the pairs rated
significantly better, Table 8). Not run at this size here (docs/preference.md has what was
measured).
"""

from llamax.experiment import reward_recipe


def get_config():
    return reward_recipe("llama2-7b")
