"""DPO of a Llama 2 7B chat (or SFT) model on preference pairs (Rafailov et al. 2023).

    llamax-train --config configs/llama2_7b_dpo.py --workdir gs://BUCKET/runs/llama2-7b-dpo \
        --config.init_from=$HOME/ckpt/llama2-7b-sft --config.data.files='$HOME/pairs/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b-sft/tokenizer.model

Recipe: `llamax.experiment.dpo_recipe`: the policy starts from `init_from`, which is also the
reference model (a frozen copy, read again on resume); preference pairs as the reward model
reads them (jsonl of prompt, chosen, rejected; docs/preference.md); beta 0.1, AdamW at 5e-7,
10% warm-up, 64 pairs per step (Tulu 2's settings). With `--config.lora.rank=64` the policy
is LoRA adapters and the reference the base with the adapters off (no second copy).

Hardware: as the 7B pretraining config (fsdp over every chip, full remat, bfloat16), plus the
reference: one more copy of the parameters per chip in float32 (28 GB over the slice) and its
forward pass (a step costs about 4/3 of the SFT step's FLOPs).

Expected: at step 0 the loss is log 2 = 0.693 and every reward margin 0; the reward
accuracy of the step's pairs (`reward_accuracy` in metrics.jsonl) rises above 50% within the
first hundred steps on data like the SFT model's. Not run at this size here
(docs/preference.md has what was measured).
"""

from llamax.experiment import dpo_recipe


def get_config():
    return dpo_recipe("llama2-7b")
