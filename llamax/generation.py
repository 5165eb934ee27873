"""Generation: a jitted prefill, then a jitted decode loop over the KV cache; sampling; and
Meta's Llama 2 chat format.

Prompts of different lengths are left-padded into one batch: padding is segment 0 (never
attended to) and each prompt's positions start at 0, so every row computes what it would
alone. Decoding stops when every row has produced EOS or `max_new_tokens`.

Requests are checked before anything is allocated, in one place for every caller (the
library's `generate`, llamax-generate, rejection sampling, reward scoring): `Sampling` holds
the sampling settings, valid when made; `check_window` refuses a prompt and its new tokens
longer than the model's window (`max_seq_len`); `check_memory` refuses a request whose
buffers (`generation_bytes`, `forward_bytes`: the KV cache, the logits, the attention scores
and the activations, estimated from the shapes) exceed what the device can still hold
(`available_memory`). Each refusal is one `ValueError` giving the numbers and what to lower.

Shapes: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llamax.attention import resolve_backend
from llamax.config import LlamaConfig
from llamax.data import chat_format
from llamax.data import records as records_lib
from llamax.model import Llama, init_cache, unstack_layers

MAX_SEED = 2**63  # jax.random.key takes a signed 64-bit seed


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How new tokens are drawn: up to `max_new_tokens` of them, greedily at `temperature` 0,
    else from the tempered distribution cut to its `top_k` most likely tokens (0: all) and
    then to its nucleus of mass `top_p`, with the random stream of `seed`. A bad setting is a
    `ValueError` naming it, raised when the settings are made (`from_flags`: naming the
    command's flag)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        problems = _sampling_problems(dataclasses.asdict(self))
        if problems:
            details = "; ".join(f"{name} {problem}" for name, problem in problems)
            raise ValueError(f"Bad sampling settings: {details}")

    @classmethod
    def from_flags(cls, args) -> Sampling:
        """The settings of a command's parsed flags (`args.max_new_tokens`, ...); a bad one
        is a `ValueError` naming its flag (`--max-new-tokens`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        problems = _sampling_problems(values)
        if problems:
            raise ValueError("; ".join(f"--{name.replace('_', '-')} {problem}"
                                       for name, problem in problems))  # fmt: skip
        return cls(**values)


def _sampling_problems(s: Mapping) -> list[tuple[str, str]]:
    """(setting, what is wrong with it) for each bad one of `s` ({`Sampling` field: value})."""
    new, temperature, top_p, top_k, seed = (s[k] for k in ("max_new_tokens", "temperature",
                                                           "top_p", "top_k", "seed"))  # fmt: skip
    problems = []

    def integer(x):
        return isinstance(x, int | np.integer) and not isinstance(x, bool)

    def number(x):
        return isinstance(x, int | float | np.number) and not isinstance(x, bool)

    if not integer(new) or new < 1:
        problems.append(("max_new_tokens", f"must be a positive integer, got {new!r}"))
    if not (number(temperature) and 0 <= temperature < float("inf")):
        problems.append(("temperature", f"must be a finite number >= 0, got {temperature!r}"))
    if not (number(top_p) and 0 < top_p <= 1):
        problems.append(("top_p", f"must lie in (0, 1], got {top_p!r}"))
    if not integer(top_k) or top_k < 0:
        problems.append(("top_k", f"must be an integer >= 0 (0: no cut), got {top_k!r}"))
    if not integer(seed) or not 0 <= seed < MAX_SEED:
        problems.append(("seed", f"must be an integer in [0, 2**63), got {seed!r}"))
    return problems


def check_text(text: str, what: str) -> None:
    """A `ValueError` when `text` cannot be encoded as UTF-8 (a lone surrogate: what Python
    makes of an undecodable byte in a command line or of a `\\udcxx` escape in JSON), which
    no tokenizer can read; `what` names it ("--prompt")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 text: an undecodable byte or a lone surrogate "
            f"({text[e.start]!r}) at character {e.start}"
        ) from None


# ----- what a request needs, checked before anything is allocated -----


def format_bytes(n: float) -> str:
    """A size for people: "976.6 KiB", "5.4 TiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory(host: bool = False) -> tuple[int, str]:
    """(bytes a request may still allocate, where): on an accelerator its `bytes_limit` less
    what is in use (the loaded parameters among it); on CPU, or for what the `host` holds,
    the host's available memory."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" and not host else None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"the free memory of the {device.device_kind}"
    import psutil

    return int(psutil.virtual_memory().available), "this host's available memory"


def check_memory(what: str, need: Mapping[str, int], lower: str, host: bool = False) -> None:
    """A `ValueError` when the buffers `need` ({name: bytes}) of `what` ("generating 8 rows
    of up to 4,096 tokens") exceed `available_memory(host)`; `lower` says what to reduce."""
    total = sum(need.values())
    have, where = available_memory(host)
    if total > have:
        parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in need.items() if n)
        raise ValueError(
            f"{what} needs about {format_bytes(total)} ({parts}), more than {where} "
            f"({format_bytes(have)}): {lower}"
        )


def _scored_queries(model: Llama, queries: int, keys: int, self_attention: bool) -> int:
    """How many queries' attention scores against `keys` keys one layer holds at once: all
    of them with the `xla` backend, a block with `chunked` (and the fused kernels, which hold
    less)."""
    e, c = model.execution, model.config
    q = jax.ShapeDtypeStruct((1, queries, c.n_heads, c.head_dim), e.compute_dtype)
    k = jax.ShapeDtypeStruct((1, keys, c.kv_heads, c.head_dim), e.compute_dtype)
    backend = resolve_backend(e.attention, q, k, self_attention, e.attention_block_q,
                              e.attention_block_kv)  # fmt: skip
    return queries if backend == "xla" else min(queries, e.attention_block_q)


def generation_bytes(model: Llama, rows: int, prompt: int, new_tokens: int) -> dict[str, int]:
    """The largest buffers of generating `new_tokens` after prompts padded to `prompt` tokens,
    `rows` a call: the KV cache, the prefill's logits, one layer's attention scores and
    activations, and the layers' weights unstacked (`_generate` copies them once)."""
    c, e = model.config, model.execution
    length = prompt + new_tokens
    queries = _scored_queries(model, prompt, length, self_attention=False)
    kv = c.kv_heads * c.head_dim * np.dtype(e.dtype).itemsize
    layers = c.n_layers * c.layer_matmul_params * np.dtype(e.param_dtype).itemsize
    return {
        "KV cache": 2 * c.n_layers * rows * length * kv,
        "logits": rows * prompt * c.vocab_size * 4,
        "attention scores": rows * c.n_heads * queries * length * 4,
        "activations": rows * prompt * (2 * c.dim + 2 * c.hidden_dim) * 4,
        "unstacked weights": layers if e.scan_layers else 0,
    }


def forward_bytes(model: Llama, rows: int, length: int, logits: bool = True) -> dict[str, int]:
    """The largest buffers of one forward pass over `rows` x `length` tokens: one layer's
    attention scores and activations, and the logits (when the caller holds them whole;
    a reward model's scores are one float a token)."""
    c = model.config
    queries = _scored_queries(model, length, length, self_attention=True)
    whole = logits and c.head == "lm"
    return {
        "logits": rows * length * (c.vocab_size if whole else 1) * 4,
        "attention scores": rows * c.n_heads * queries * length * 4,
        "activations": rows * length * (2 * c.dim + 2 * c.hidden_dim) * 4,
    }


def check_window(config: LlamaConfig, prompt: int, new_tokens: int) -> None:
    """A `ValueError` when a prompt of `prompt` tokens and `new_tokens` more exceed the
    model's window (`max_seq_len`): positions past it are outside what the model is for."""
    window = config.max_seq_len
    if prompt + new_tokens > window:
        room = window - prompt
        fix = (f"ask for at most {room:,} new tokens" if room > 0
               else "shorten the prompt")  # fmt: skip
        raise ValueError(
            f"a prompt of {prompt:,} tokens and {new_tokens:,} new tokens make "
            f"{prompt + new_tokens:,}, more than the model's window of {window:,} tokens "
            f"(max_seq_len): {fix}"
        )


def check_request(model: Llama, prompt_lengths: Sequence[int], sampling: Sampling,
                  rows: int | None = None) -> None:  # fmt: skip
    """Refuses (`ValueError`) a generation request the model cannot serve or the device
    cannot hold, before anything is allocated: the longest prompt and its new tokens within
    the window (`check_window`), `top_k` within the vocabulary, and the buffers of `rows`
    rows a call (default: every prompt in one) within the free memory (`check_memory`)."""
    if not len(prompt_lengths) or min(prompt_lengths) < 1:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    longest, new = max(prompt_lengths), sampling.max_new_tokens
    check_window(model.config, longest, new)
    if sampling.top_k > model.config.vocab_size:
        raise ValueError(f"top_k {sampling.top_k:,} is more than the model's vocabulary "
                         f"({model.config.vocab_size:,} tokens)")  # fmt: skip
    rows = len(prompt_lengths) if rows is None else rows
    check_memory(
        f"generating {rows:,} rows of up to {longest + new:,} tokens",
        generation_bytes(model, rows, longest, new),
        "generate for fewer prompts at a time (--batch-size), or fewer new tokens",
    )


def sample_logits(logits, rng, temperature: float, top_p: float, top_k: int):
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k then nucleus
    (top-p) filtering of the tempered distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest set of tokens whose mass reaches top_p (always the first).
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p", "top_k", "eos_id")
)
def _generate(
    params,
    tokens,
    segment_ids,
    positions,
    rng,
    *,
    model,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    eos_id,
):
    b, p = tokens.shape
    # Separate per-layer weights and caches: slicing a layer out of stacked arrays copies it,
    # on every step (measured in docs/performance.md); unstacking copies the weights once.
    model = Llama(model.config, model.execution.replace(scan_layers=False))
    params = unstack_layers(params)
    cache = init_cache(model.config, b, p + max_new_tokens, model.execution.dtype, stacked=False)
    logits, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache=cache)
    rng, key = jax.random.split(rng)
    first = sample_logits(logits[:, -1], key, temperature, top_p, top_k)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    next_pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out, rng = carry
        logits, cache = model.apply(
            {"params": params},
            token[:, None],
            (next_pos + i - 1)[:, None],
            jnp.ones((b, 1), jnp.int32),
            cache=cache,
        )
        rng, key = jax.random.split(rng)
        new = sample_logits(logits[:, -1], key, temperature, top_p, top_k)
        done = done | (token == eos_id)
        new = jnp.where(done, eos_id, new)
        return i + 1, new, cache, done, out.at[:, i].set(new), rng

    init = (jnp.asarray(1), first, cache, jnp.zeros((b,), bool), out, rng)
    *_, out, _ = jax.lax.while_loop(cond, body, init)
    return out


def generate(
    model: Llama,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int = 2,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), up to and without
    the first EOS. The request is checked first (`Sampling`, `check_request`): a bad setting,
    a prompt and its new tokens past the model's window, or buffers the device cannot hold
    are a `ValueError`, before anything is allocated."""
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
    check_request(model, [len(p) for p in prompts], sampling)
    longest = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), longest), np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[i, longest - n :] = prompt
        segment_ids[i, longest - n :] = 1
        positions[i, longest - n :] = np.arange(n)
    out = _generate(
        params, tokens, segment_ids, positions, jax.random.key(seed),
        model=model, max_new_tokens=max_new_tokens, temperature=float(temperature),
        top_p=float(top_p), top_k=int(top_k), eos_id=int(eos_id),
    )  # fmt: skip
    results = []
    for row in np.asarray(out).tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


def answer_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of a chat answer's tokens, without trailing whitespace: Meta's chat format
    closes each answer with a space before EOS (`chat_format.dialog_tokens`), which a chat model
    learns to produce and is no part of the answer."""
    return tokenizer.decode(ids).rstrip()


def chat_tokens(dialog: Sequence[dict], tokenizer) -> list[int]:
    """A dialog (`{"role": "system"|"user"|"assistant", "content": ...}`, ending with a user
    turn) as Meta's `Llama.chat_completion` tokenizes it: the system prompt merged into the
    first user turn inside `<<SYS>>`, each finished exchange `[INST] q [/INST] a` between BOS
    and EOS, the last question after a BOS and awaiting its answer. The same formatting as
    fine-tuning's (`llamax.data.chat_format.dialog_tokens`)."""
    if not dialog or dialog[-1].get("role") != "user":
        raise ValueError("The last turn of a dialog must be the user's")
    for i, turn in enumerate(dialog):
        if isinstance(turn, dict) and isinstance(turn.get("content"), str):
            check_text(turn["content"], f"message {i} ({turn.get('role')})")
    try:
        return chat_format.dialog_tokens(dialog, tokenizer)[0]
    except records_lib.BadRecord as e:
        raise ValueError(str(e)) from None
