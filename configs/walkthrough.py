"""The whole road to a chat model on a laptop, each stage a command: SFT, LoRA, a PEFT export, a
reward model, a rejection-sampling round, DPO (docs/finetuning.md, "The whole road on a
laptop", which tests/test_walkthrough.py runs as written).

    llamax-train --config configs/walkthrough.py:sft --workdir road/sft
    llamax-train --config configs/walkthrough.py:lora --workdir road/lora
    llamax-train --config configs/walkthrough.py:reward --workdir road/rm
    llamax-train --config configs/walkthrough.py:dpo --workdir road/dpo

The task is bench/finetune.py's lookup (made-up places, each with a code such as `amber 2`),
whose files `python bench/preference.py --write-data road` writes: `road/chat.jsonl` (dialogs),
`road/pairs.jsonl` (preference pairs with ratings), `road/prompts.jsonl`. Paths are relative
to the directory the commands run in. The model is tiny (dim 64, 2 layers) and starts from
scratch: SFT here teaches it the chat format and the codes at once, where a real road starts
from a pretrained Llama 2 (`--config.init_from=ckpt/llama2-7b`, and the 7B recipes:
configs/llama2_7b_chat_sft.py, _lora.py, _reward.py, _dpo.py).

Hardware: any CPU. Expected: each stage in well under a minute on 2 cores.
"""

from llamax.experiment import default_config

STAGES = ("sft", "lora", "reward", "dpo")


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES} (CONFIG.py:STAGE)")
    c = default_config()
    c.task = "sft"  # the lora stage too: adapters trained with the same objective
    c.model.preset = "tiny"
    c.model.vocab_size = 320  # the walkthrough's tokenizer's
    c.model.max_seq_len = 256
    c.mesh.fsdp = -1
    c.data.source = "chat"
    c.data.files = "road/chat.jsonl"
    c.data.tokenizer = "road/tokenizer.model"
    c.data.validation_fraction = 0.0
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 5
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.log_every = 25
    c.train.eval_every = 0
    c.checkpoint.every = 0  # the last step only
    if stage == "sft":
        return c
    c.init_from = "road/sft"
    c.train.steps = 20
    if stage == "lora":
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.lora.targets = "wq,wk,wv,wo,w1,w2,w3"
        c.optimizer.learning_rate = 1e-2
        return c
    c.data.source = "preference"
    c.data.files = "road/pairs.jsonl"
    c.data.pairs_per_row = 2
    if stage == "reward":
        c.task = "reward"  # a score head on the SFT model's body
        c.optimizer.learning_rate = 1e-3
        return c
    c.task = "dpo"
    c.optimizer.learning_rate = 1e-4
    c.dpo.beta = 0.1
    return c
