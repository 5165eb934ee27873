"""A round of rejection sampling followed by its fine-tune, as one program (`llamax-reward
sample --finetune CONFIG --workdir DIR`): the round itself is `llamax.rejection`'s (the
inference layer: sample, score, select, write); the fine-tune is a training run
(`llamax.train.run`) on the round's data, from the policy, whose config is made and checked
here before anything is sampled, so that a config that cannot train is refused before the
round's minutes of sampling.
"""

from __future__ import annotations

import ml_collections

from llamax import experiment, fs, loop, pretrained, rejection, train


def finetune_config(
    policy: str, data: str, tokenizer: str, spec: ml_collections.ConfigDict, overrides: list[str],
    workdir: str, policy_adapters: str | None = None,
) -> ml_collections.ConfigDict:  # fmt: skip
    """The round's fine-tuning config, checked: `spec` (the experiment config CONFIG names,
    already loaded with `overrides` applied, none of them a key the round sets itself) as a
    chat SFT run of the `policy` (`init_from`) on the round's `data`, tokenized with the
    policy's `tokenizer`; it must be the policy's model, and `workdir` must be able to take
    it."""
    if policy_adapters or pretrained.lora_run(policy) is not None:
        raise ValueError(
            "--finetune starts from the policy's own parameters (init_from), which LoRA "
            "adapters are not part of: merge them into a checkpoint first (llamax-convert "
            "--from llamax --input RUN --to llamax, or --from peft --base CKPT) and sample "
            "from that"
        )
    for arg in overrides:
        key = arg.removeprefix("--config.").partition("=")[0]
        if arg.startswith("--config.") and key in rejection.ROUND_KEYS:
            raise ValueError(f"--config.{key}: the round sets it "
                             f"({', '.join(rejection.ROUND_KEYS)}: its data and the policy); "
                             "train with llamax-train to change it")  # fmt: skip
    c = rejection.finetune_config(spec, fs.absolute(data), policy, tokenizer)
    experiment.check(c)
    want, have = experiment.model_config(c), pretrained.read_model_config(policy)
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "head")
    differ = [f"{f} {getattr(want, f)} (policy: {getattr(have, f)})"
              for f in fields if getattr(want, f) != getattr(have, f)]  # fmt: skip
    if differ:
        raise ValueError("the fine-tune's config is not the policy's model: " + "; ".join(differ))
    loop.check_workdir(workdir)
    return c


def finetune(c: ml_collections.ConfigDict, workdir: str) -> None:
    """The round's fine-tune: a training run of `c` into `workdir`."""
    train.run(c, workdir)
