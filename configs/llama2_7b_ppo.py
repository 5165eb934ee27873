"""PPO of a Llama 2 7B chat (SFT or rejection-sampled) model, as Llama 2-Chat was trained:
two reward models, the safety rule, the KL penalty (Touvron et al. 2023, section 3.2.3).

    llamax-train --config configs/llama2_7b_ppo.py --workdir gs://BUCKET/runs/llama2-7b-ppo \
        --config.init_from=$HOME/ckpt/llama2-7b-sft \
        --config.ppo.helpful_rm=gs://BUCKET/runs/llama2-7b-rm-helpful \
        --config.ppo.safety_rm=gs://BUCKET/runs/llama2-7b-rm-safety \
        --config.data.files='$HOME/prompts/*.jsonl' \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b-sft/tokenizer.model

Recipe: `llamax.experiment.ppo_recipe`: prompts as jsonl records (`prompt`, optional
`is_safety`; docs/preference.md), 512 an iteration, 200 iterations, minibatches of 64, AdamW
at a constant 1e-6, clip 0.2, KL beta 0.01; the value model starts from the helpfulness
reward model. With `--config.lora.rank=64` the policy and the value model are LoRA adapters
(the value model's score head trains beside them) and the reference is the base with the
adapters off.

Hardware: besides the policy's training state (as the 7B SFT config), the value model's
(a second 7B model with its optimizer state), the reference and the two reward models
(float32 copies, 28 GB each over the slice), and the engine's decoding copy of
the policy; an iteration runs every forward of docs/preference.md's PPO section.

Expected: at iteration 1 the KL to the reference is 0 and `clip_fraction` small; `reward`
rises and `kl` grows slowly (beta 0.01 keeps it to a few nats a response). Not run at this
size here (docs/preference.md has what was measured).
"""

from llamax.experiment import ppo_recipe


def get_config():
    return ppo_recipe("llama2-7b")
