"""PPO of a Llama 2 70B chat (SFT or rejection-sampled) model, as Llama 2-Chat was trained:
two reward models, the safety rule, the KL penalty (Touvron et al. 2023, section 3.2.3).

    llamax-train --config configs/llama2_70b_ppo.py --workdir gs://BUCKET/runs/llama2-70b-ppo \
        --config.init_from=$HOME/ckpt/llama2-70b-sft \
        --config.ppo.helpful_rm=gs://BUCKET/runs/llama2-70b-rm-helpful \
        --config.ppo.safety_rm=gs://BUCKET/runs/llama2-70b-rm-safety \
        --config.data.files='$HOME/prompts/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-70b-sft/tokenizer.model

Recipe: `llamax.experiment.ppo_recipe`: prompts as jsonl records (`prompt`, optional
`is_safety`; docs/preference.md), 512 an iteration, 200 iterations, minibatches of 64, AdamW
at a constant 1e-6, clip 0.2, KL beta 0.005 (the paper's for 70B); the value model starts
from the helpfulness reward model. With `--config.lora.rank=64` the policy and the value
model are LoRA adapters (the value model's score head trains beside them) and the reference
is the base with the adapters off.

Hardware: besides the policy's training state (as the 70B SFT config), the value model's
(a second 70B model with its optimizer state), the reference and the two reward models
(float32 copies, 280 GB each over the slice), and the engine's decoding copy of
the policy; an iteration runs every forward of docs/preference.md's PPO section.

Expected: at iteration 1 the KL to the reference is 0 and `clip_fraction` small; `reward`
rises and `kl` grows slowly (beta 0.005 keeps it to a few nats a response). Not run at this
size here (docs/preference.md has what was measured).
"""

from llamax.experiment import ppo_recipe


def get_config():
    return ppo_recipe("llama2-70b")
