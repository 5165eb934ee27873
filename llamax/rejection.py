"""Rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, section 3.2.3), one round:
K responses per prompt from the policy, each scored by a reward model, the best per prompt
kept and written as chat SFT data, on which the policy is then fine-tuned.

    llamax-reward sample --policy runs/sft --checkpoint runs/rm --prompts prompts.jsonl \
        --k 4 --output round1.jsonl --report round1.json [--finetune CONFIG --workdir DIR]

- `read_prompts`: jsonl records with a `prompt` (a question, or a dialog ending with the
  user's turn); a bad line is an error naming it.
- `check_round`: the round's request, refused before anything is sampled: K and the batch
  positive, each prompt and `max_new_tokens` within the policy's window, the samples (prompts
  x K of up to `max_new_tokens` tokens, their texts and their scoring's tokens) within the
  host's available memory.
- `sample`: K responses per prompt from the inference engine (`inference.Engine.generate`,
  continuous batching over `batch_size` slots, fewer when the round has fewer samples);
  sample j of prompt i draws from the random stream i K + j of `seed`, so K samples of a
  prompt differ at temperature > 0 (and are K equal greedy answers at 0), and a round's
  samples do not depend on the batch size. Each response is the policy's tokens up to its
  first EOS, decoded to text without trailing whitespace (`generation.answer_text`: the space
  the chat format puts before EOS is no part of the answer).
- `score`: each (prompt, response) re-tokenized with the reward model's tokenizer in Meta's
  chat format (`preference.response_tokens`) and scored at its last token
  (`reward.score_sequences`: the engine's scoring path). A response that cannot be an answer
  (empty, or holding the chat format's special tags), one longer than the reward model's
  window, or one cut off by `max_new_tokens` (unless kept) gets no score (NaN) and is counted
  by reason: every sample is scored or counted once, so the counts add up to the samples.
- `select`: the best-scoring response per prompt as a chat SFT record,
  `{"messages": [*prompt, {"role": "assistant", "content": best}], "score": ...}` (what
  `data.source=chat` reads); a prompt none of whose samples has a score is skipped and
  counted. The report: prompts, samples, kept and skipped prompts, the mean reward of every
  scored sample, the mean of each prompt's best, the max and min.
- `write_dataset`: the records as jsonl, atomically (`fs.write_lines`: whole or not at all).

The round from checkpoints (what `llamax-reward sample` runs): `plan_round` checks everything
that can be checked without loading a model (the models' heads and tokenizers, the prompts,
the window and the host's memory: `check_round`), then `run_plan` loads the policy
(`loading.load_engine`), samples, releases it, loads the reward model, scores, selects, and
writes the data and the report.

The round's fine-tune. Decision: `llamax-reward sample --finetune CONFIG --workdir DIR` runs
it in the same process, after the data is written: the config file's `get_config()` with
`task="sft"`, `data.source="chat"`, `data.files=<output>`, `data.tokenizer=<the policy's
tokenizer>` and `init_from=<policy>` (`finetune_config`; no override may set those,
`ROUND_KEYS`), given to `train.run`, as `llamax-train --config CONFIG --workdir DIR
--config.data.files=... --config.init_from=...` would. The policy and the reward model are
released before training starts. `train` and `experiment` (the config's checks) are above
this module's layer, so the command (an entry point) checks the config and makes that call;
this module prepares it. The two commands remain equivalent for runs that need llamax-train's
own flags (several processes, overrides): sample with `llamax-reward sample`, then train with
`llamax-train`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from llamax import fs, generation, inference, loading, pretrained, reward
from llamax.data import preference
from llamax.data import records as records_lib
from llamax.data.records import BadRecord, JsonlRecords
from llamax.inference import SamplingConfig

log = logging.getLogger("llamax")

GLOB_CHARACTERS = "*?[,"  # what data.files reads as patterns (or separators), not a name
# Host memory per sample kept through a round (its text, its slot, its tokens for scoring),
# and per token of it: what `check_round` estimates a round's samples need.
SAMPLE_BYTES, TOKEN_BYTES = 512, 16


@dataclasses.dataclass
class Samples:
    """K responses per prompt: `texts` [N][K] (decoded, up to the first EOS) and `truncated`
    bool [N, K] (stopped by `max_new_tokens`, before any EOS)."""

    texts: list[list[str]]
    truncated: np.ndarray


@dataclasses.dataclass
class Round:
    """One round: the prompts (as dialogs awaiting the answer), every sample, its score (NaN:
    none), the kept SFT records and the report."""

    prompts: list[list[dict]]
    samples: Samples
    scores: np.ndarray
    records: list[dict]
    report: dict


def read_prompts(path: str, max_bytes: int | None = None) -> list[dict]:
    """The records of a jsonl(.gz) file of prompts, in order, blank lines left out; each a
    JSON object with a `prompt` (a question or a dialog ending with the user's turn), read a
    line at a time (a line longer than `max_bytes` is refused unread). A bad line is a
    `ValueError` naming the file, the line and what is wrong."""
    lines = JsonlRecords(path, max_bytes)
    if not len(lines):
        raise ValueError(f"{path}: no prompts in the file")
    records = []
    for i in range(len(lines)):
        try:
            record = records_lib.parse(lines[i])
            if "prompt" not in record:
                raise BadRecord("malformed", 'a record needs a "prompt"')
            preference.prompt_messages(record["prompt"])
        except BadRecord as e:
            where = lines.where(i).rpartition(":")
            raise ValueError(f"{where[0]}: line {where[2]}: {e}") from None
        records.append(record)
    return records


def prompt_tokens(prompts: Sequence[Any], tokenizer) -> list[list[int]]:
    """Each prompt (a question, or a dialog ending with the user's turn) as Meta's chat
    format tokenizes it awaiting the answer (`generation.chat_tokens`)."""
    out = []
    for i, prompt in enumerate(prompts):
        try:
            out.append(generation.chat_tokens(preference.prompt_messages(prompt), tokenizer))
        except ValueError as e:  # a BadRecord, or chat_tokens' own
            raise ValueError(f"prompt {i}: {e}") from None
    return out


def check_round(config, tokenizer, prompts: Sequence[Any], k: int, sampling: SamplingConfig,
                batch_size: int) -> list[list[int]]:  # fmt: skip
    """The prompts' tokens (`prompt_tokens`) once the round is known to be possible with the
    policy of `config` (its `LlamaConfig`): `k` and `batch_size` positive, every prompt and
    `sampling.max_new_tokens` within the window, `top_k` within the vocabulary, and the
    prompts x `k` samples within the host's memory. A `ValueError` otherwise, before any
    sampling (and, from llamax-reward sample, before the policy is loaded)."""
    for name, value in (("k", k), ("batch_size", batch_size)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tokens = prompt_tokens(prompts, tokenizer)
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    try:
        inference.check_window(config, len(tokens[longest]), sampling.max_new_tokens)
    except ValueError as e:
        raise ValueError(f"prompt {longest}: {e}") from None
    if sampling.top_k > config.vocab_size:
        raise ValueError(f"top_k {sampling.top_k:,} is more than the policy's vocabulary "
                         f"({config.vocab_size:,} tokens)")  # fmt: skip
    samples = len(tokens) * k
    mean_prompt = sum(len(t) for t in tokens) / len(tokens)
    per_sample = SAMPLE_BYTES + TOKEN_BYTES * (sampling.max_new_tokens + mean_prompt)
    inference.check_memory(
        f"a round of {len(tokens):,} prompts x {k:,} samples of up to "
        f"{sampling.max_new_tokens:,} new tokens",
        {"the samples and their scoring": int(samples * per_sample)},
        "lower --k, sample fewer prompts a round, or lower --max-new-tokens",
        host=True,
    )
    return tokens


def sample(
    model,
    params,
    tokenizer,
    prompts: Sequence[Any],
    k: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 8,
) -> Samples:
    """`k` responses to each prompt from the policy (`model`, `params`: a language model, its
    parameters stacked or an `Engine`'s), generated by the inference engine with
    `min(batch_size, prompts x k)` slots (`Engine.generate`: continuous batching), decoded
    with `tokenizer` as answers (`generation.answer_text`). Sample j of prompt i draws from
    the random stream i k + j of `seed`: K different samples of a prompt, the same ones
    whatever the batch size. The round is checked first (`check_round`, and the slots'
    buffers: `inference.check_request`). Log lines as the samples are drawn."""
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)
    if model.config.head != "lm":
        raise ValueError("sampling needs a language model (LlamaConfig.head 'lm') as policy")
    tokens = check_round(model.config, tokenizer, prompts, k, sampling, batch_size)
    total = len(tokens) * k
    rows = min(batch_size, total)
    inference.check_request(model, [len(t) for t in tokens], sampling, rows=rows)
    if temperature == 0 and k > 1:
        log.warning("temperature 0: the %d samples of each prompt are the same greedy answer", k)
    logged = [0]

    def progress(done):
        if done - logged[0] >= rows or done == total:
            logged[0] = done
            log.info("rejection sampling: %d/%d samples drawn", done, total)

    engine = inference.Engine(model, params)
    done = engine.generate([tokens[r // k] for r in range(total)], sampling,
                           eos_id=tokenizer.eos_id, slots=rows, progress=progress)  # fmt: skip
    texts = [[""] * k for _ in tokens]
    truncated = np.zeros((len(tokens), k), bool)
    for r, completion in enumerate(done):
        new = completion.tokens[:-1] if completion.stop == "eos" else completion.tokens
        texts[r // k][r % k] = generation.answer_text(tokenizer, new)
        truncated[r // k, r % k] = completion.stop == "length"
    return Samples(texts, truncated)


def score(
    model, params, tokenizer, prompts: Sequence[Any], texts: Sequence[Sequence[str]],
    batch_size: int = 8, truncated: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """(float32 [N, K]: each response's reward, NaN where it has none; the responses without
    one, counted by reason). Each is re-tokenized with the reward model's `tokenizer` as the
    assistant's answer to its prompt and scored at its last token; one the model's window
    cannot hold is counted "too long", and those `truncated` marks (bool [N, K]) are left
    unscored and counted "truncated"."""
    n, k = len(texts), max((len(t) for t in texts), default=0)
    if len(prompts) != n or any(len(t) != k for t in texts):
        raise ValueError("score needs one list of K responses per prompt, K the same for all")
    sequences, where, unscored = [], [], collections.Counter()
    window = model.config.max_seq_len
    for i, (prompt, responses) in enumerate(zip(prompts, texts, strict=True)):
        for j, text in enumerate(responses):
            if truncated is not None and truncated[i, j]:
                unscored["truncated"] += 1
                continue
            try:
                tokens = preference.response_tokens(prompt, text, tokenizer)[0]
            except BadRecord as e:
                unscored[e.reason] += 1
                continue
            if len(tokens) > window:
                unscored[reward.TOO_LONG] += 1
                continue
            sequences.append(tokens)
            where.append((i, j))
    scores = np.full((n, k), np.nan, np.float32)
    if sequences:
        values = reward.score_sequences(model, params, sequences, batch_size)
        for (i, j), value in zip(where, values, strict=True):
            scores[i, j] = value
        bad = int(np.sum(~np.isfinite(values)))
        if bad:
            unscored["non-finite score"] += bad
            scores[~np.isfinite(scores)] = np.nan
    return scores, dict(unscored)


def select(
    prompts: Sequence[Any], texts: Sequence[Sequence[str]], scores: np.ndarray
) -> tuple[list[dict], dict]:
    """(the chat SFT record of each prompt's best-scoring response, the report). A record is
    `{"messages": [*prompt, {"role": "assistant", "content": best}], "score": its reward,
    "prompt_index": i}`; a prompt none of whose responses has a score is skipped. The first
    of equal best scores is kept."""
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 2 or scores.shape[0] != len(prompts):
        raise ValueError(f"scores must be [prompts, K]; got {scores.shape} for {len(prompts)}")
    records, best = [], []
    for i, prompt in enumerate(prompts):
        row = scores[i]
        if np.isnan(row).all():
            continue
        j = int(np.nanargmax(row))
        answer = {"role": "assistant", "content": texts[i][j]}
        messages = [*preference.prompt_messages(prompt), answer]
        records.append({"messages": messages, "score": float(row[j]), "prompt_index": i})
        best.append(float(row[j]))
    scored = scores[~np.isnan(scores)]

    def stat(values, f):
        return float(f(values)) if len(values) else None

    report = {
        "prompts": len(prompts), "samples_per_prompt": int(scores.shape[1]),
        "samples": int(scores.size), "scored": int(scored.size),
        "kept": len(records), "skipped": len(prompts) - len(records),
        "mean_reward": stat(scored, np.mean), "mean_best_reward": stat(best, np.mean),
        "max_reward": stat(scored, np.max), "min_reward": stat(scored, np.min),
    }  # fmt: skip
    return records, report


def run_round(
    policy: tuple, reward_model: tuple, prompts: Sequence[Any], k: int, batch_size: int = 8,
    keep_truncated: bool = False, **sampling,
) -> Round:  # fmt: skip
    """One round with both models loaded: `policy` and `reward_model` are each `(model,
    params, tokenizer)`; `sampling` is `sample`'s settings (temperature, top_p, top_k,
    max_new_tokens, seed)."""
    samples = sample(*policy, prompts, k, batch_size=batch_size, **sampling)
    return finish_round(reward_model, prompts, samples, batch_size, keep_truncated)


def finish_round(reward_model: tuple, prompts: Sequence[Any], samples: Samples,
                 batch_size: int = 8, keep_truncated: bool = False) -> Round:  # fmt: skip
    """The scoring and selection of a round whose samples are drawn (the policy may be
    released first): `reward_model` is `(model, params, tokenizer)`. A sample cut off by
    `max_new_tokens` is not scored nor kept unless `keep_truncated` (written as a whole
    answer, closed by EOS, it would teach the policy to stop mid-answer): counted as
    "truncated". One log line gives the counts the report holds."""
    cut = None if keep_truncated else samples.truncated
    scores, unscored = score(*reward_model, prompts, samples.texts, batch_size, truncated=cut)
    records, report = select(prompts, samples.texts, scores)
    report.update(unscored=unscored, truncated=int(samples.truncated.sum()))
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(unscored.items()))
    reasons = f" ({reasons})" if reasons else ""
    log.info("rejection sampling: %d of %d responses scored, %d without a score%s",
             report["scored"], report["samples"], report["samples"] - report["scored"],
             reasons)  # fmt: skip
    messages = [preference.prompt_messages(p) for p in prompts]
    return Round(messages, samples, scores, records, report)


def write_dataset(path: str, records: Sequence[dict]) -> None:
    """The SFT records as jsonl at `path`, whole or not at all; refused when there are none
    (a round in which no prompt had a scored response has nothing to fine-tune on)."""
    if not records:
        raise ValueError(
            f"No prompt has a response with a score (every sample empty or unusable): nothing "
            f"to fine-tune on; {path} was not written"
        )
    fs.write_lines(path, [json.dumps(r, ensure_ascii=False) + "\n" for r in records])


def summary(report: dict) -> str:
    """One line of a round's report: its rewards and counts."""

    def show(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    return (
        f"{report['prompts']} prompts x {report['samples_per_prompt']} samples: mean reward "
        f"{show(report['mean_reward'])}, mean best {show(report['mean_best_reward'])}, max "
        f"{show(report['max_reward'])}; {report['kept']} kept, {report['skipped']} skipped"
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A round of `llamax-reward sample`, checked before any model is loaded (`plan_round`):
    its checkpoints and options, the prompts read (`prompts`, and each record's other fields,
    `extra`, carried to its kept record), and the policy's tokenizer file (the fine-tune's)."""

    policy: str
    reward_model: str
    prompts_file: str
    output: str
    report: str | None
    k: int
    sampling: SamplingConfig
    batch_size: int
    keep_truncated: bool
    policy_tokenizer: str | None
    policy_adapters: str | None
    reward_tokenizer: str | None
    load: dict
    prompts: list
    extra: list[dict]
    tokenizer_path: str


def plan_round(policy: str, reward_model: str, prompts_file: str, output: str, k: int,
               sampling: SamplingConfig, batch_size: int = 8, *, report: str | None = None,
               keep_truncated: bool = False, policy_tokenizer: str | None = None,
               policy_adapters: str | None = None, reward_tokenizer: str | None = None,
               **load) -> Plan:  # fmt: skip
    """A round, checked as far as it can be without loading a model: the policy is a language
    model and the reward model a reward model (their configs), their tokenizers are theirs,
    the prompts read (a prompt line too long for the policy's window is refused unread), and
    the round fits the policy's window and the host's memory (`check_round`). A `ValueError`
    (or `OSError`) naming the problem otherwise. `load`: `loading.load_engine`'s options for
    both models (dtype, attention)."""
    policy_config = pretrained.read_model_config(policy)
    if policy_config.head != "lm":
        raise ValueError(f"the policy {policy} is a reward model (a score head); sampling "
                         "needs a language model")  # fmt: skip
    tokenizer = loading.checkpoint_tokenizer(policy, policy_tokenizer, policy_config.vocab_size)
    limit = records_lib.max_record_bytes(policy_config.max_seq_len, tokenizer)
    records = read_prompts(prompts_file, limit)
    reward_config = pretrained.read_model_config(reward_model)
    if reward_config.head != "score":
        raise ValueError(f"the reward model {reward_model} is a language model; scoring needs "
                         "a reward model (a score head)")  # fmt: skip
    loading.checkpoint_tokenizer(reward_model, reward_tokenizer, reward_config.vocab_size)
    prompts = [r["prompt"] for r in records]
    check_round(policy_config, tokenizer, prompts, k, sampling, batch_size)
    return Plan(
        policy, reward_model, prompts_file, output, report, k, sampling, batch_size,
        keep_truncated, policy_tokenizer, policy_adapters, reward_tokenizer, load, prompts,
        [{key: v for key, v in r.items() if key != "prompt"} for r in records],
        policy_tokenizer or fs.join(policy, "tokenizer.model"),
    )  # fmt: skip


def run_plan(plan: Plan) -> dict:
    """A planned round, one model at a time: the policy loaded (`loading.load_engine`) and
    sampled, released; the reward model loaded, the samples scored and the best per prompt
    selected; the kept records (each with its prompt record's other fields) written to
    `plan.output`, the report to `plan.report` when given. Returns the report."""
    import gc

    s = plan.sampling
    engine, tokenizer = loading.load_engine(
        plan.policy, plan.policy_tokenizer, adapters=plan.policy_adapters, **plan.load
    )
    samples = sample(engine.model, engine.params, tokenizer, plan.prompts, plan.k,
                     temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                     max_new_tokens=s.max_new_tokens, seed=s.seed,
                     batch_size=plan.batch_size)  # fmt: skip
    del engine
    gc.collect()  # the policy's arrays go before the reward model's come
    engine, tokenizer = loading.load_engine(plan.reward_model, plan.reward_tokenizer,
                                            head="score", **plan.load)  # fmt: skip
    result = finish_round((engine.model, engine.params, tokenizer), plan.prompts, samples,
                          plan.batch_size, keep_truncated=plan.keep_truncated)  # fmt: skip
    del engine
    gc.collect()
    write_dataset(plan.output, [{**plan.extra[r["prompt_index"]], **r} for r in result.records])
    report = {
        **result.report, "policy": plan.policy, "policy_adapters": plan.policy_adapters,
        "reward_model": plan.reward_model, "prompts_file": plan.prompts_file,
        "output": plan.output, "temperature": s.temperature, "top_p": s.top_p,
        "top_k": s.top_k, "max_new_tokens": s.max_new_tokens, "seed": s.seed,
    }  # fmt: skip
    if plan.report:
        fs.write_json(plan.report, report, indent=1)
    return report


# What a round sets in its fine-tune's config (`finetune_config`): no override may change it.
ROUND_KEYS = ("task", "data.source", "data.files", "data.tfds_name", "data.tokenizer",
              "init_from")  # fmt: skip


def finetune_config(c, data_path: str, policy: str, tokenizer_path: str):
    """The round's fine-tuning config: a copy of the experiment config `c` (a chat SFT
    recipe, say) training the policy (`init_from`) on the round's data (task `sft`,
    `data.source` chat, `data.files`), tokenized with the policy's tokenizer."""
    if any(ch in data_path for ch in GLOB_CHARACTERS):
        raise ValueError(
            f"--output {data_path}: data.files reads {GLOB_CHARACTERS!r} as patterns; write the "
            "round's data to a path without them to fine-tune on it"
        )
    if (c.model.get("head") or "lm") != "lm":
        raise ValueError(f"the fine-tune config has model.head {c.model.head!r}; it trains the "
                         "policy, a language model: model.head 'lm'")  # fmt: skip
    c = c.copy_and_resolve_references()
    if "task" in c:  # chat SFT, where the experiment config names its task
        c.task = "sft"
    c.data.source = "chat"
    c.data.files = data_path
    c.data.tfds_name = ""
    c.data.tokenizer = tokenizer_path
    c.init_from = policy
    return c
