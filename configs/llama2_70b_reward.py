"""A Llama 2 70B reward model as Llama 2-Chat's (Touvron et al. 2023, section 3.2.2).

    llamax-train --config configs/llama2_70b_reward.py --workdir gs://BUCKET/runs/llama2-70b-rm \
        --config.init_from=$HOME/ckpt/llama2-70b-chat --config.data.files='$HOME/pairs/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-70b-chat/tokenizer.model

Recipe: `llamax.experiment.reward_recipe`, as configs/llama2_7b_reward.py says, with the
paper's lower peak for 70B, 5e-6.

Hardware: the 70B pretraining config's (fsdp over every chip, full remat, bfloat16), one pair
per row of 4,096 tokens.

Expected: as the 7B reward config says, a few points better (the paper's larger reward
models rank more pairs right, its Figure 6). Not run at this size here.
"""

from llamax.experiment import reward_recipe


def get_config():
    return reward_recipe("llama2-70b")
