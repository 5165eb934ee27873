"""The experiment config: its schema (every key and its default) and the recipes built on it.

An experiment config is an ml-collections `ConfigDict` with the key `task` (what the run
trains: `llamax.tasks`), the sections `model`, `mesh`, `data`, `optimizer`, `train`,
`checkpoint` and the key `init_from`; `configs/*.py` return one from `get_config()`, starting
from `default_config()` or a recipe here. A config without a task (one written before tasks
were explicit) gets the one its data and head imply (`resolve_task`), with a deprecation
warning. The `model` section holds both kinds of model settings, split when a run is set up:
the architecture (`model_config`: a preset and `LlamaConfig` overrides, recorded in
checkpoints; its head the task's unless set) and the execution (`execution_config`: dtypes,
attention backend, remat; not recorded).

Every key is documented in docs/config.md (tests/test_configs.py keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import ml_collections

from llamax import checkpoint, lora, optim, quantization, tasks
from llamax import data as data_lib
from llamax.config import ROPE_KEYS, LlamaConfig
from llamax.execution import DTYPES, Execution
from llamax.lora import LoraConfig

log = logging.getLogger("llamax")

# Execution settings a training run may set; `scan_layers` is not one of them, since every
# training checkpoint has its layers stacked.
TRAIN_EXECUTION_FIELDS = (
    "dtype",
    "param_dtype",
    "remat_policy",
    "scan_unroll",
    "attention",
    "attention_block_q",
    "attention_block_kv",
    "attention_max_segments",
    "loss_chunk_len",
)
# How a LoRA run may hold its frozen base: a float dtype, or its layer matrices quantized (int8,
# or nf4: QLoRA's 4-bit NormalFloat; llamax.lora), the rest in bfloat16.
BASE_DTYPES = (*DTYPES, *quantization.QUANTIZATIONS)
# Types of the LlamaConfig fields whose default is None, for their placeholders.
_OPTIONAL_TYPES = {"n_kv_heads": int, "ffn_dim_multiplier": float, "ffn_dim": int}
# Every key of a rotary scaling (llamax.config.ROPE_KEYS) with its type.
ROPE_FIELDS = {"rope_type": str, "factor": float, "low_freq_factor": float,
               "high_freq_factor": float, "original_max_position_embeddings": int,
               "attention_factor": float, "beta_fast": float, "beta_slow": float,
               "mscale": float, "mscale_all_dim": float, "truncate": bool}  # fmt: skip


def default_config() -> ml_collections.ConfigDict:
    """Every key of an experiment config with its default."""
    c = ml_collections.ConfigDict()
    # What the run trains: "lm", "sft", "reward", "dpo" (llamax.tasks), or a task registered
    # with llamax.tasks.register. Empty: derived from data.source and model.head (deprecated).
    c.task = ""
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    # Any LlamaConfig field overrides the preset; None keeps the preset's value.
    for field in dataclasses.fields(LlamaConfig):
        kind = _OPTIONAL_TYPES.get(field.name, type(getattr(LlamaConfig(), field.name)))
        c.model[field.name] = ml_collections.config_dict.placeholder(kind)
    # The rotary scaling key by key, so that each can be set on the command line
    # (--config.model.rope_scaling.rope_type=linear --config.model.rope_scaling.factor=4).
    c.model.rope_scaling = ml_collections.ConfigDict(
        {key: ml_collections.config_dict.placeholder(kind) for key, kind in ROPE_FIELDS.items()}
    )
    defaults = Execution()
    for name in TRAIN_EXECUTION_FIELDS:
        c.model[name] = getattr(defaults, name)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})
    c.data = data_lib.default_config()
    c.optimizer = optim.default_config()
    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 8  # global, in sequences, summed over gradient-accumulation steps
    c.train.seq_len = 128
    c.train.grad_accum_steps = 1
    c.train.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables it
    c.train.log_every = 10
    c.train.eval_every = 0  # 0: no periodic eval
    c.train.eval_batches = 4
    c.train.seed = 0  # parameter initialization
    c.train.peak_flops_per_device = 0.0  # for MFU; 0: look the device up in metrics.PEAK_FLOPS
    c.train.progress_bar = True
    # Resuming with changed keys that alter the run (the model, the schedule, the optimizer,
    # the batches) is refused unless this is true; see `changes`.
    c.train.accept_changes = False
    c.checkpoint = checkpoint.default_config()
    # LoRA: train low-rank adapters of the `targets` weights (comma-separated among wq wk wv
    # wo w1 w2 w3) on the frozen `init_from` base, held in `base_dtype` (a reward model's
    # score head trains beside them, as PEFT's modules_to_save); rank 0: train every
    # parameter (full fine-tuning, pretraining).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.targets = "wq,wv"
    c.lora.dropout = 0.0
    c.lora.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
    c.lora.base_dtype = "bfloat16"
    # task "reward" (a score head on preference pairs): Llama 2's ranking loss with the
    # margin table ("none", "small", "large": MARGINS) by the pairs' ratings, plus
    # `centering` * the mean squared sum of a pair's scores.
    c.reward = ml_collections.ConfigDict()
    c.reward.margins = "small"
    c.reward.centering = 0.0
    # task "dpo" (a language model on preference pairs, from `init_from`, which is also the
    # reference model: with LoRA, that base with the adapters off): the loss's temperature
    # beta (Rafailov et al. 2023).
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    # task "ppo" (Llama 2-Chat's RLHF; llamax.ppo_train, docs/preference.md): the policy is
    # init_from, trained on rollouts of `data.source = "prompts"`, `rollouts` prompts an
    # iteration (train.steps iterations) in minibatches of train.batch_size rows of
    # train.seq_len tokens (prompt and response), one update each per epoch.
    c.ppo = ml_collections.ConfigDict()
    c.ppo.helpful_rm = ""  # the helpfulness reward model (a run of task "reward"): required
    c.ppo.safety_rm = ""  # the safety reward model; "": the helpfulness one scores everything
    # The safety model scores a safety prompt's answer, and any whose sigmoid safety score
    # is below this (Llama 2: 0.15).
    c.ppo.safety_threshold = 0.15
    c.ppo.value_from = ""  # the value model's start; "": the helpfulness reward model
    c.ppo.kl_beta = 0.01  # the KL penalty's weight (Llama 2: 0.01 for 7B/13B, 0.005 for 70B)
    c.ppo.clip = 0.2  # the policy ratio's clip
    c.ppo.value_clip = 0.2  # the value's clip around its rollout value
    c.ppo.gamma = 1.0  # GAE's discount
    c.ppo.lam = 0.95  # GAE's lambda
    c.ppo.rollouts = 512  # prompts per iteration
    # Decode slots of the rollouts (and the held-out answers): the engine's rows at once, each
    # with a KV cache of a whole row; a finished answer's slot takes the next prompt. 0: one
    # slot per prompt. What bounds the decode state's memory (docs/tpu_fit.md's PPO rows).
    c.ppo.rollout_slots = 64
    c.ppo.epochs = 1  # passes over an iteration's rollouts (minibatches) per iteration
    c.ppo.max_new_tokens = 256  # of a response; a prompt may take the rest of the row
    c.ppo.temperature = 1.0  # of the rollouts' sampling
    c.ppo.top_p = 1.0
    # Every train.eval_every iterations, the mean reward of greedy answers to this many
    # held-out prompts (data.validation_fraction); after `patience` evaluations without a
    # better one the run stops early (0: never).
    c.ppo.eval_prompts = 64
    c.ppo.patience = 0
    c.cluster = ml_collections.ConfigDict()
    # Seconds without a heartbeat after which JAX's coordinator counts a process of a
    # multi-process run as lost (JAX's default: 100).
    c.cluster.heartbeat_timeout_seconds = 100
    # A checkpoint (a run's workdir or a converted one) whose parameters start a new run:
    # continued training and fine-tuning. Ignored when the workdir has a checkpoint to resume.
    c.init_from = ""
    return c


# (section, key, smallest allowed value) for the integer keys of the loop's sections.
_AT_LEAST = (
    ("train", "steps", 1), ("train", "batch_size", 1), ("train", "seq_len", 2),
    ("train", "grad_accum_steps", 1), ("train", "log_every", 0), ("train", "eval_every", 0),
    ("train", "eval_batches", 1), ("checkpoint", "every", 0), ("checkpoint", "keep", 1),
    ("checkpoint", "keep_period", 0),
)  # fmt: skip


def check(c: ml_collections.ConfigDict) -> None:
    """Clear errors for values of the loop's sections no run could use, and the task's own
    checks (its data source, the model's head, its settings: `llamax.tasks.Task.check`); the
    model, optimizer and data sections are checked where they are used."""
    errors = []
    try:
        errors.extend(task(c).check(c))
    except ValueError as e:  # an unknown task
        errors.append(str(e))
    for section, key, least in _AT_LEAST:
        value = c[section][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            errors.append(f"{section}.{key} must be an integer >= {least}, got {value!r}")
    for key in ("z_loss", "peak_flops_per_device"):
        value = c.train[key]
        if not (isinstance(value, int | float) and value >= 0 and value != float("inf")):
            errors.append(f"train.{key} must be a finite number >= 0, got {value!r}")
    if c.lora.rank:
        try:
            lora_config(c)
        except ValueError as e:
            errors.append(f"lora: {e}")
        if not c.init_from:
            errors.append("lora.rank > 0 trains adapters on a frozen base: set init_from")
        if c.lora.base_dtype not in BASE_DTYPES:
            errors.append(
                f"lora.base_dtype must be one of {BASE_DTYPES}, got {c.lora.base_dtype!r}"
            )
    timeout = c.cluster.heartbeat_timeout_seconds
    if not (isinstance(timeout, int | float) and 0 < timeout < float("inf")):
        errors.append(f"cluster.heartbeat_timeout_seconds must be positive, got {timeout!r}")
    if errors:
        raise ValueError("Invalid experiment config: " + "; ".join(errors))


# Keys a resumed run may change freely (logged): how it computes, reports and saves, not
# what it trains. Any other change alters the run and must be accepted.
FREE_TO_CHANGE = (
    "model.dtype", "model.remat_policy", "model.scan_unroll", "model.attention",
    "model.attention_block_q", "model.attention_block_kv", "model.attention_max_segments",
    "model.loss_chunk_len",
    "mesh.", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.progress_bar", "train.seed",
    "train.peak_flops_per_device", "train.grad_accum_steps", "train.accept_changes",
    "checkpoint.", "cluster.", "init_from", "data.tfds_data_dir",
)  # fmt: skip


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and key != "resolved":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changes(recorded: dict, c: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(changes that alter the run, free ones) between a workdir's recorded config.json and
    the config `c` that would resume it, each as "key: old -> new". The model is compared by
    its resolved architecture, not by how a preset and overrides spell it; the task by the
    one each states or implies (a run recorded before tasks were explicit states none)."""
    new = json.loads(c.to_json_best_effort())
    new["model"]["resolved"] = model_config(c).to_dict()
    old, new = dict(_flatten(recorded)), dict(_flatten(new))
    altering, free = [], []
    was, now = recorded_task(recorded), task_name(c)
    if was != now:
        altering.append(f"task: {was!r} -> {now!r}")
    old.pop("task", None)
    new.pop("task", None)
    fixed_keys = task(c).fixed_on_resume(c)
    for key in sorted(set(old) & set(new)):
        if key == "model.resolved":
            before, after = old[key] or {}, new[key]
            for field in sorted(set(before) | set(after)):
                if before.get(field) != after.get(field):
                    altering.append(f"model.{field}: {before.get(field)!r} -> {after.get(field)!r}")
        elif key.startswith("model.") and key.split(".")[1] in LlamaConfig.__dataclass_fields__:
            continue  # spelled differently, compared as resolved above
        elif key != "model.preset" and old[key] != new[key]:
            change = f"{key}: {old[key]!r} -> {new[key]!r}"
            # A LoRA run's base is its model, a DPO run's start its reference.
            is_free = key.startswith(FREE_TO_CHANGE) and key not in fixed_keys
            (free if is_free else altering).append(change)
    return altering, free


def derive_task(source: str, head: str) -> str:
    """The task a config without one trains, as llamax read it from the data and the head
    before tasks were explicit: preference pairs train a reward model (a score head) or DPO
    (a language model), chat data SFT, prompts PPO, text a language model."""
    if source == "preference":
        return "reward" if head == "score" else "dpo"
    if source == "prompts":
        return "ppo"
    return "sft" if source == "chat" else "lm"


def task_name(c: ml_collections.ConfigDict) -> str:
    """The config's task: the one it states, else the one its data and head imply."""
    stated = c.get("task")
    if stated:
        return stated
    return derive_task(c.data.source, c.model.head or LlamaConfig.preset(c.model.preset).head)


def task(c: ml_collections.ConfigDict) -> tasks.Task:
    """The config's task (`task_name`), from `llamax.tasks`' registry."""
    return tasks.get(task_name(c))


def recorded_task(recorded: dict) -> str:
    """The task of a workdir's recorded config.json: the one it states, else the one its data
    and resolved head imply (a run recorded before tasks were explicit)."""
    stated = recorded.get("task")
    if stated:
        return stated
    resolved = (recorded.get("model") or {}).get("resolved") or {}
    return derive_task((recorded.get("data") or {}).get("source", ""), resolved.get("head", "lm"))


def resolve_task(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` when it states its task; else a copy stating the one its data and head imply, with
    a deprecation warning saying which and how to state it."""
    if c.get("task"):
        return c
    name = task_name(c)
    log.warning(
        "the config states no task: task %r derived from data.source %r and model.head %r, as "
        "llamax did before tasks were explicit. This is deprecated: set c.task = %r in the "
        "config file (or --config.task=%s)",
        name, c.data.source, c.model.head, name, name,
    )  # fmt: skip
    resolved = c.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.task = name
    return resolved


def head(c: ml_collections.ConfigDict) -> str:
    """The model's head: `model.head`, else the task's ("lm": next-token logits; "score": a
    reward model)."""
    return c.model.head or task(c).head


def model_config(c: ml_collections.ConfigDict) -> LlamaConfig:
    """The architecture: the preset with the `model` section's non-None overrides."""
    overrides = {
        name: c.model[name]
        for name in dataclasses.asdict(LlamaConfig())
        if name != "rope_scaling" and c.model.get(name) is not None
    }
    overrides["head"] = head(c)
    scaling = c.model.get("rope_scaling")
    if hasattr(scaling, "to_dict"):
        scaling = scaling.to_dict()
    scaling = {k: v for k, v in (scaling or {}).items() if v is not None}
    if scaling:  # (none given keeps the preset's)
        if "rope_type" not in scaling and "type" not in scaling:
            raise ValueError(
                f"model.rope_scaling needs rope_type (one of {sorted(ROPE_KEYS)}), got {scaling}"
            )
        overrides["rope_scaling"] = scaling
    return LlamaConfig.preset(c.model.preset, **overrides)


def lora_config(c: ml_collections.ConfigDict) -> LoraConfig | None:
    """The run's LoRA adapters (None: every parameter trains)."""
    return lora.from_section(c.lora.to_dict())


def execution_config(c: ml_collections.ConfigDict) -> Execution:
    """How the run computes: the `model` section's execution keys, and quantized layer
    matrices for a LoRA run with a quantized `lora.base_dtype` ("int8", "nf4")."""
    quantized = bool(c.lora.rank) and c.lora.base_dtype in quantization.QUANTIZATIONS
    return Execution(
        **{name: c.model[name] for name in TRAIN_EXECUTION_FIELDS},
        weight_quantization=c.lora.base_dtype if quantized else "none",
    )


# ----- recipes -----


def llama2_recipe(preset: str, learning_rate: float) -> ml_collections.ConfigDict:
    """Llama 2's pretraining recipe (Touvron et al. 2023, section 2.2) for a preset: 4,096-token
    context, 4M-token global batches (1,024 sequences as 4 accumulated micro-batches), the
    paper's AdamW and schedule, 2T tokens; bfloat16 compute with full remat, fsdp over every
    chip, C4 English through tfds. `configs/llama2_*.py` set the hardware."""
    c = default_config()
    c.task = "lm"
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "tfds"
    c.data.tfds_name = "c4/en:3.1.0"
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 2000
    c.train.steps = 500_000
    c.train.batch_size = 1024
    c.train.seq_len = 4096
    c.train.grad_accum_steps = 4
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    return c


def context_extension_recipe(preset: str, seq_len: int) -> ml_collections.ConfigDict:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595, section 3) for a Llama 2
        preset trained at 4,096 tokens: continued training from converted weights (`init_from`)
        with `linear` rotary scaling by seq_len / 4096, 1,000 steps of 64 sequences of `seq_len`,
        AdamW at 2e-5 (beta2 0.95) after 20 warmup steps, no decay, no weight decay, on the
        pretraining data. Full remat and a flash attention (`auto`: splash on TPU, cuDNN on GPU,
    chunked where neither applies) keep the long sequences in memory."""
    c = llama2_recipe(preset, learning_rate=2e-5)
    factor = seq_len / c.train.seq_len
    c.model.rope_scaling.rope_type = "linear"
    c.model.rope_scaling.factor = factor
    c.model.max_seq_len = seq_len
    c.model.attention = "auto"
    c.optimizer.warmup_steps = 20
    c.optimizer.end_learning_rate_ratio = 1.0  # constant after the warmup
    c.optimizer.weight_decay = 0.0
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.seq_len = seq_len
    c.train.grad_accum_steps = 1
    c.train.eval_every = 200
    c.checkpoint.every = 200
    return c


def chat_sft_recipe(preset: str) -> ml_collections.ConfigDict:
    """Llama 2-Chat's supervised fine-tuning (Touvron et al. 2023, section 3.1) for a preset:
    from a converted base (`init_from`), chat data (`data.files`) with the loss on the answers,
    packed; AdamW with a cosine schedule from 2e-5 (to 10%, no warm-up: the paper gives neither),
    weight decay 0.1, 64 sequences of 4,096 tokens per step. Two epochs of the paper's 27,540
    dialogs, at about one dialog per row, are 860 steps; set `train.steps` to 2 x your rows per
    epoch / 64."""
    c = llama2_recipe(preset, learning_rate=2e-5)
    c.task = "sft"
    c.data.source = "chat"
    c.data.tfds_name = ""
    c.data.chat_train_on = "answers"
    c.data.validation_fraction = 0.02
    c.optimizer.warmup_steps = 0
    c.train.steps = 860
    c.train.batch_size = 64
    c.train.grad_accum_steps = 1
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.checkpoint.every = 100
    return c


def reward_recipe(preset: str) -> ml_collections.ConfigDict:
    """Llama 2's reward models (Touvron et al. 2023, section 3.2.2): task `reward`, the chat
    model's body with a score head (from an SFT or chat checkpoint in `init_from`), trained
    on preference pairs (`data.source = "preference"`, one pair of two segments per row of
    4,096 tokens) with the ranking loss and the small margin table; one epoch, AdamW with a
    cosine schedule from 1e-5 (5e-6 for 70B) to 10% after a warm-up of 3% of the steps (at
    least 5), 512 pairs per step. 1,000 steps is one epoch of 512,000 pairs: set `train.steps`
    (and `optimizer.warmup_steps`, 3% of it) to one epoch of yours."""
    c = llama2_recipe(preset, learning_rate=5e-6 if preset == "llama2-70b" else 1e-5)
    c.task = "reward"
    c.data.source = "preference"
    c.data.tfds_name = ""
    c.data.pairs_per_row = 1
    c.data.validation_fraction = 0.02
    c.reward.margins = "small"
    c.optimizer.warmup_steps = 30
    c.train.steps = 1000
    c.train.batch_size = 512
    c.train.grad_accum_steps = 4
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.checkpoint.every = 100
    return c


def dpo_recipe(preset: str) -> ml_collections.ConfigDict:
    """DPO (Rafailov et al. 2023) of a chat model on preference pairs, the reference being
    the starting checkpoint (`init_from`, an SFT model): Tulu 2's Llama 2 settings (Ivison et
    al. 2023): beta 0.1, AdamW at 5e-7 without weight decay, a 10% warm-up (their decay is
    linear, here the recipe's cosine to 10%), 3 epochs; the reward recipe's data, 64 pairs per
    step. Three epochs of 60,000 pairs are about 2,800 steps: set `train.steps` (and
    `optimizer.warmup_steps`, 10% of it) for your data."""
    c = reward_recipe(preset)
    c.task = "dpo"
    c.dpo.beta = 0.1
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 280
    c.optimizer.weight_decay = 0.0
    c.train.steps = 2800
    c.train.batch_size = 64
    c.train.grad_accum_steps = 4
    return c


def ppo_recipe(preset: str) -> ml_collections.ConfigDict:
    """Llama 2-Chat's PPO (Touvron et al. 2023, section 3.2.3): the policy from `init_from`
    (an SFT or rejection-sampled chat model), its helpfulness and safety reward models
    (`ppo.helpful_rm`, `ppo.safety_rm`), prompts (`data.source = "prompts"`). The paper's
    settings: AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1, gradient clipping
    1.0, a constant learning rate of 1e-6; 512 prompts an iteration in minibatches of 64, one
    update each; clip 0.2; KL beta 0.01 (0.005 for 70B); 200 iterations (the paper ran
    200-400 with early stopping on held-out prompts: here every 10 iterations on 64 of them,
    patience 3). Where the paper is silent (Stiennon et al. 2020 / TRL): the value model from
    the helpfulness reward model, GAE gamma 1 and lambda 0.95, value clip 0.2, rollouts at
    temperature 1; responses of up to 512 tokens in rows of 4,096 (prompts up to 3,584)."""
    c = llama2_recipe(preset, learning_rate=1e-6)
    c.task = "ppo"
    c.data.source = "prompts"
    c.data.tfds_name = ""
    c.data.validation_fraction = 0.02
    c.optimizer.warmup_steps = 0
    c.optimizer.end_learning_rate_ratio = 1.0  # constant
    c.ppo.kl_beta = 0.005 if preset == "llama2-70b" else 0.01
    c.ppo.rollouts = 512
    c.ppo.max_new_tokens = 512
    c.ppo.eval_prompts = 64
    c.ppo.patience = 3
    c.train.steps = 200
    c.train.batch_size = 64
    c.train.grad_accum_steps = 4
    c.train.log_every = 1
    c.train.eval_every = 10
    c.checkpoint.every = 10
    return c


def lora_recipe(preset: str, rank: int, alpha: float, targets: str) -> ml_collections.ConfigDict:
    """LoRA on the chat SFT recipe's data and batches: adapters of `rank` on `targets` (alpha,
    dropout 0.05) over the frozen bfloat16 base, AdamW at 2e-4 (cosine to 10%, 3% warm-up),
    no weight decay (Hu et al. 2021 and the QLoRA paper's Llama settings, Dettmers et al.
    2023: r 64, alpha 16, every linear layer, 2e-4)."""
    c = chat_sft_recipe(preset)
    c.lora.rank, c.lora.alpha, c.lora.targets, c.lora.dropout = rank, alpha, targets, 0.05
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 26
    c.optimizer.weight_decay = 0.0
    return c
