"""The inference engine: a loaded model's weights laid out once for running it, and the jitted
functions every command that runs a model uses, generation and scoring alike.

`Engine(model, params, mesh)` unstacks the layers' weights once into per-layer arrays (slicing a
layer out of stacked weights copies it on every decode step: docs/performance.md), on `mesh`
with the shardings training gives them (the logical axis names of `llamax.sharding`), so a
rollout inside training runs on the training mesh without a gathered copy; one device works too.

Generation is JetStream's split, each part jitted on its own:

- `prefill`: one prompt, right-padded to its length bucket, into a KV cache of that bucket:
  its keys and values, its first sampled token and that token's log-probability.
- `insert`: a prefilled prompt into a free slot of a `DecodeState`, a fixed number of slots
  each at its own length (the cache's write index is one per row, `llamax.model.init_cache`).
- `decode`: up to `steps` steps for every slot at once (one, as JetStream's, or more: the call
  stops once a row finishes, when its slot has a prompt waiting, or once all are done): the
  next tokens and their log-probabilities.

`generate` keeps the slots full (continuous batching: a finished row's slot takes the next
prompt) and returns each prompt's tokens and log-probabilities. A request's random stream is its
own (the key of `seed` folded with the request's `stream`, then with the token's index), so a
prompt gets the same tokens whichever slot, batch or call it runs in. Log-probabilities are the
model's own (`log_softmax` of its logits at the token drawn), whatever the temperature or the
top-k/top-p cut that drew it: what PPO's ratio and DPO's sampling need.

Prompt lengths are bucketed (`bucket`: powers of two from 16 up to the model's window), so any
number of prompt lengths compile one prefill per bucket; a decode state's length is the bucket of
its longest prompt and the new tokens (`decode_length`: as many shapes as prompt buckets, and no
more slots than needed, since every step attends over all of them).

Scoring runs on the same weights with the same batching (rows sorted by length and padded to
the bucket of a call's longest, `min(batch_size, sequences)` rows a call, every call one
shape): `token_logprobs` (each token's log-probability given those before it: perplexity, a
policy's log-probabilities of given responses), `greedy_logprobs` (those and whether each
token is the model's argmax: passkey retrieval), `last_scores` (a reward model's score at each
sequence's last token).

Requests are checked before anything is allocated, in one place for every caller:
`SamplingConfig` holds the sampling settings, valid when made; `check_window` refuses a prompt
and its new tokens longer than the model's window (`max_seq_len`); `check_memory` refuses a
request whose buffers (`generation_bytes`, `forward_bytes`, estimated from the shapes) exceed
what the device can still hold (`available_memory`). Each refusal is one `ValueError` giving
the numbers and what to lower.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llamax import sharding
from llamax.attention import resolve_backend
from llamax.config import LlamaConfig
from llamax.model import Llama, abstract_params, init_cache, token_nll

MAX_SEED = 2**63  # jax.random.key takes a signed 64-bit seed
MIN_BUCKET = 16  # the shortest length a prompt or a scored row is padded to
DECODE_STEPS = 32  # the most decode steps a call of `Engine.generate` runs between its looks


# ----- sampling settings -----


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are drawn: up to `max_new_tokens` of them, greedily at `temperature` 0,
    else from the tempered distribution cut to its `top_k` most likely tokens (0: all) and
    then to its nucleus of mass `top_p`, with the random streams of `seed`. A bad setting is a
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
    def from_flags(cls, args) -> SamplingConfig:
        """The settings of a command's parsed flags (`args.max_new_tokens`, ...); a bad one
        is a `ValueError` naming its flag (`--max-new-tokens`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        problems = _sampling_problems(values)
        if problems:
            raise ValueError("; ".join(f"--{name.replace('_', '-')} {problem}"
                                       for name, problem in problems))  # fmt: skip
        return cls(**values)


def _sampling_problems(s: Mapping) -> list[tuple[str, str]]:
    """(setting, what is wrong with it) for each bad one of `s` ({`SamplingConfig` field:
    value})."""
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


def bucket(n: int, window: int | None = None) -> int:
    """The length `n` tokens are padded to: the smallest power of two from 16 on that holds
    them, at most the model's `window` when they fit in it (the window is the last bucket).
    Few shapes, few compiles; at most twice the tokens."""
    size = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return min(size, window) if window and n <= window else size


def decode_length(prompt: int, new_tokens: int, window: int | None = None) -> int:
    """The cache slots of a decode state for prompts of up to `prompt` tokens and
    `new_tokens` more: the prompt's bucket (what its prefill fills) and the new tokens rounded
    up to a multiple of 16, at most the model's `window`. As few shapes as prompt buckets for
    a given number of new tokens, and no slot past what the new tokens need: every decode step
    attends over every slot."""
    size = bucket(prompt, window) + -(-new_tokens // MIN_BUCKET) * MIN_BUCKET
    return min(size, window) if window and prompt + new_tokens <= window else size


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
    """The largest buffers of generating `new_tokens` after prompts of up to `prompt` tokens,
    `rows` slots at once (`Engine.generate`): the slots' KV cache (`decode_length` each, and
    one prompt's bucket), the prefill's logits, attention scores and activations (one prompt
    padded to its bucket), the decode steps' logits, and the layers' weights unstacked when the
    engine copies them (a scanned `model`)."""
    c, e = model.config, model.execution
    length = decode_length(prompt, new_tokens, c.max_seq_len)
    padded = bucket(prompt, c.max_seq_len)
    queries = _scored_queries(model, padded, padded, self_attention=False)
    kv = c.kv_heads * c.head_dim * np.dtype(e.dtype).itemsize
    layers = c.n_layers * c.layer_matmul_params * np.dtype(e.param_dtype).itemsize
    return {
        "KV cache": 2 * c.n_layers * (rows * length + padded) * kv,
        "prefill logits": padded * c.vocab_size * 4,
        "decode logits": 3 * rows * c.vocab_size * 4,  # the logits, sorted, and cut
        "attention scores": c.n_heads * queries * padded * 4,
        "activations": padded * (2 * c.dim + 2 * c.hidden_dim) * 4,
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


def check_request(model: Llama, prompt_lengths: Sequence[int], sampling: SamplingConfig,
                  rows: int | None = None) -> None:  # fmt: skip
    """Refuses (`ValueError`) a generation request the model cannot serve or the device
    cannot hold, before anything is allocated: a language model, the longest prompt and its
    new tokens within the window (`check_window`), `top_k` within the vocabulary, and the
    buffers of `rows` slots (default: one per prompt) within the free memory (`check_memory`)."""
    if model.config.head != "lm":
        raise ValueError("generation needs a language model (LlamaConfig.head 'lm'), not a "
                         "reward model")  # fmt: skip
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


# ----- the jitted parts -----


def _sample(logits, keys, steps, temperature, top_p, top_k):
    """Next tokens [B] int32 from logits [B, V], each row with its own settings ([B] each) and
    random key (key data `keys` [B, ...] folded with `steps` [B], the index of the token drawn):
    greedy where the temperature is 0, else drawn from the tempered logits cut to the `top_k`
    most likely (0: no cut), then to their nucleus of mass `top_p`. And the tokens'
    log-probabilities under the model's own distribution, float32 [B]."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn():
        hot = temperature > 0
        scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]

        def cut():
            ordered = -jnp.sort(-scaled, axis=-1)
            last = jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1)[:, None]
            kth = jnp.take_along_axis(ordered, last, axis=-1)
            kth = jnp.where((top_k > 0)[:, None], kth, -jnp.inf)
            ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
            probs = jax.nn.softmax(ordered, axis=-1)
            # The smallest set of tokens whose mass reaches top_p (always the first).
            keep = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
            least = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
            least = jnp.where((top_p < 1)[:, None], least, -jnp.inf)
            return jnp.where(scaled < jnp.maximum(kth, least), -jnp.inf, scaled)

        filtered = jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1), cut, lambda: scaled)
        row_keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(
            keys, steps
        )
        out = jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)
        return jnp.where(hot, out, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)
    return tokens, logprobs[:, 0]


# The logical axes of a decode state's arrays (`Engine.new_state`), by name: they shard as
# training's activations do (rows over `data` and `fsdp`, kv heads over `tensor`).
_STATE_AXES = {
    "k": ("batch", "kv_length", "kv_heads", "head_dim"),
    "v": ("batch", "kv_length", "kv_heads", "head_dim"),
    "segment_ids": ("batch", "kv_length"),
    "keys": ("batch", None),
}


def _constrained(state):
    """`state` (a decode state or a prefill) with its arrays laid out by `_STATE_AXES` (the
    others by rows), so every call returns the layout it was given."""

    def constrain(path, x):
        name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        axes = _STATE_AXES.get(name, ("batch",))
        return nn.with_logical_constraint(x, axes[: x.ndim]) if x.ndim else x

    return jax.tree_util.tree_map_with_path(constrain, state)


def _empty_state(config: LlamaConfig, slots: int, length: int, dtype: str, key_shape: tuple):
    return _constrained({
        "cache": init_cache(config, slots, length, dtype, stacked=False, per_row=True),
        "tokens": jnp.zeros((slots,), jnp.int32),
        "keys": jnp.zeros((slots, *key_shape), jnp.uint32),
        "steps": jnp.zeros((slots,), jnp.int32),
        "temperature": jnp.zeros((slots,), jnp.float32),
        "top_p": jnp.ones((slots,), jnp.float32),
        "top_k": jnp.zeros((slots,), jnp.int32),
        "eos": jnp.zeros((slots,), jnp.int32),
        "remaining": jnp.zeros((slots,), jnp.int32),
    })  # fmt: skip


_new_state = jax.jit(_empty_state, static_argnums=(0, 1, 2, 3, 4))


def lower_new_state(config: LlamaConfig, slots: int, length: int, dtype: str):
    """An empty decode state of `slots` rows of `length` cache slots, lowered under the
    current mesh and not run: what an ahead-of-time compile measures (`llamax.aot`)."""
    return _new_state.lower(config, slots, length, dtype, _key_shape())


@partial(jax.jit, static_argnames="model")
def _prefill(params, tokens, length, key, temperature, top_p, top_k, eos, new, *, model):
    p = tokens.shape[1]
    segment_ids = (jnp.arange(p) < length)[None].astype(jnp.int32)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    cache = init_cache(model.config, 1, p, model.execution.dtype, stacked=False)
    logits, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache=cache)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)
    settings = (temperature[None], top_p[None], top_k[None])
    token, logprob = _sample(last, key[None], jnp.zeros((1,), jnp.int32), *settings)
    # The tokens the request may still draw: none after an EOS or its last new token.
    remaining = jnp.where(token[0] == eos, 0, new - 1)
    return {"k": cache["k"], "v": cache["v"], "segment_ids": cache["segment_ids"],
            "length": length, "token": token[0], "logprob": logprob[0], "key": key,
            "temperature": temperature, "top_p": top_p, "top_k": top_k, "eos": eos,
            "remaining": remaining}  # fmt: skip


@partial(jax.jit, donate_argnums=0)
def _insert(state, prefill, slot):
    cache = state["cache"]

    def put(whole, part):
        start = (slot,) + (0,) * (whole.ndim - 1)
        return jax.lax.dynamic_update_slice(whole, part.astype(whole.dtype), start)

    # The whole row of segment ids: the slots after the prompt are 0 again (unfilled), which
    # is how a decode step's queries know them.
    row = jnp.zeros((1, cache["segment_ids"].shape[1]), jnp.int32)
    row = row.at[:, : prefill["segment_ids"].shape[1]].set(prefill["segment_ids"])
    cache = {
        "k": tuple(put(w, p) for w, p in zip(cache["k"], prefill["k"], strict=True)),
        "v": tuple(put(w, p) for w, p in zip(cache["v"], prefill["v"], strict=True)),
        "segment_ids": put(cache["segment_ids"], row),
        "index": cache["index"].at[slot].set(prefill["length"]),
    }
    new = {name: state[name].at[slot].set(prefill[name])
           for name in ("temperature", "top_p", "top_k", "eos", "remaining")}  # fmt: skip
    return _constrained({
        **state, **new, "cache": cache, "keys": state["keys"].at[slot].set(prefill["key"]),
        "tokens": state["tokens"].at[slot].set(prefill["token"]),
        "steps": state["steps"].at[slot].set(1),
    })  # fmt: skip


@partial(jax.jit, static_argnames=("model", "steps"), donate_argnums=1)
def _decode(params, state, refill, *, model, steps):
    rows = state["tokens"].shape[0]
    live = state["remaining"] > 0  # the rows decoding when the call starts

    def step(carry):
        i, state, tokens, logprobs = carry
        cache = state["cache"]
        logits, cache = model.apply({"params": params}, state["tokens"][:, None],
                                    cache["index"][:, None], cache=cache)  # fmt: skip
        settings = (state["temperature"], state["top_p"], state["top_k"])
        new, scores = _sample(logits[:, 0], state["keys"], state["steps"], *settings)
        left = state["remaining"]
        left = jnp.where((left > 0) & (new != state["eos"]), left - 1, 0)
        state = {**state, "cache": cache, "tokens": new, "steps": state["steps"] + 1,
                 "remaining": left}  # fmt: skip
        return i + 1, state, tokens.at[:, i].set(new), logprobs.at[:, i].set(scores)

    def going(carry):
        i, state, *_ = carry
        done = state["remaining"] == 0
        # With prompts waiting, until a row finishes (its slot takes the next); else all.
        stop = jnp.where(refill, jnp.any(live & done), jnp.all(done))
        return (i < steps) & ~stop

    init = (jnp.asarray(0, jnp.int32), state, jnp.zeros((rows, steps), jnp.int32),
            jnp.zeros((rows, steps), jnp.float32))  # fmt: skip
    n, state, tokens, logprobs = jax.lax.while_loop(going, step, init)
    return _constrained(state), tokens, logprobs, n


@partial(jax.jit, static_argnames=("model", "kind"))
def _score(params, tokens, lengths, *, model, kind):
    # Rows are right-padded: a causal model's outputs at a row's tokens never see its padding.
    if kind == "last":
        scores = model.apply({"params": params}, tokens)
        return jnp.take_along_axis(scores, (lengths - 1)[:, None], axis=1)[:, 0]
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    if kind == "logprobs":  # the model's chunked cross-entropy: never the logits whole
        nll, _ = model.apply({"params": params}, tokens, targets=targets)
        return -nll
    logits = model.apply({"params": params}, tokens)
    nll, _ = token_nll(logits, targets)
    return -nll, jnp.argmax(logits, axis=-1) == targets


@partial(jax.jit, static_argnames="shardings")
def _split_layers(stacked, shardings):
    return tuple(jax.lax.with_sharding_constraint(stacked[i], s) for i, s in enumerate(shardings))


def _unstacked(params, model: Llama, mesh, donate: bool):
    """The per-layer parameters of `model` (which loops over its layers) from the stacked
    ones of a scanned model, each on `mesh` as training shards it, copied one parameter at
    a time (with `donate`, each stacked array is deleted once copied: the peak is the weights
    and one stacked parameter)."""
    shardings = sharding.tree_shardings(abstract_params(model), mesh)
    params = dict(params)
    stacked = params.pop("layers")
    n = model.config.n_layers
    leaves, tree = jax.tree_util.tree_flatten_with_path(stacked)
    layers = [[] for _ in range(n)]
    for path, leaf in leaves:
        targets = tuple(_at(shardings[f"layers_{i}"], path) for i in range(n))
        for i, part in enumerate(_split_layers(leaf, targets)):
            layers[i].append(part)
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    for i in range(n):
        params[f"layers_{i}"] = jax.tree_util.tree_unflatten(tree, layers[i])
    return jax.device_put(params, shardings)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _mesh_of(params) -> jax.sharding.Mesh:
    """The mesh `params` are sharded on (one device's when they are not)."""
    leaf = jax.tree.leaves(params)[0]
    where = getattr(leaf, "sharding", None)
    if isinstance(where, jax.sharding.NamedSharding):
        return where.mesh
    device = next(iter(where.device_set)) if where is not None else jax.devices()[0]
    return sharding.make_mesh(devices=[device])


@functools.cache
def _key_shape() -> tuple[int, ...]:
    """The shape of a key's data (abstract: nothing runs, whatever mesh is current)."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


@jax.jit
def _stream_keys(seed_key, streams):
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(streams))


# ----- the engine -----


@dataclasses.dataclass
class Completion:
    """What one prompt got: its new `tokens` (up to and with the first EOS when it `stop`ped
    at one, "eos"; else `max_new_tokens` of them, "length") and each one's log-probability
    under the model, float32."""

    tokens: list[int]
    logprobs: np.ndarray
    stop: str


class Engine:
    """A model's weights laid out for inference, and the calls that run them (the module
    docstring): built once per loaded model and reused by every request."""

    def __init__(self, model: Llama, params, mesh: jax.sharding.Mesh | None = None,
                 donate: bool = False):  # fmt: skip
        """`params` of `model`: stacked (`layers`, as training and `load_pretrained` hold
        them: unstacked here, one copy of the weights; with `donate`, the stacked arrays are
        deleted as they are copied) or already per layer (`layers_0`, ...: an engine's, used
        as they are). `mesh`: where they run (default: the mesh they are sharded on, else one
        device)."""
        self.mesh = mesh or _mesh_of(params)
        self.config = model.config
        run = Llama(model.config, model.execution.replace(scan_layers=False), model.lora)
        if "layers" in params:
            params = _unstacked(params, run, self.mesh, donate)
        else:
            boxed = abstract_params(run)
            params = jax.device_put(params, sharding.tree_shardings(boxed, self.mesh))
        self.model, self.params = run, params

    def bucket(self, n: int) -> int:
        """The length a prompt or a scored row of `n` tokens is padded to (`bucket`)."""
        return bucket(n, self.config.max_seq_len)

    # ----- generation -----

    def new_state(self, slots: int, length: int):
        """An empty decode state: `slots` rows of `length` cache slots each."""
        with sharding.use_mesh(self.mesh):
            return _new_state(self.config, slots, length, self.model.execution.dtype,
                              _key_shape())  # fmt: skip

    def prefill(self, tokens: Sequence[int], sampling: SamplingConfig, key, eos_id: int = 2):
        """One prompt (`tokens`, BOS included) into a cache of its bucket; its first new token
        drawn with the request's `key` (key data: `stream_keys`). Returns the prefill, whose
        `token` and `logprob` are that token and its log-probability, and `remaining` the
        tokens it may still draw (none after `eos_id` or `sampling.max_new_tokens`)."""
        n = len(tokens)
        padded = np.zeros((1, self.bucket(n)), np.int32)
        padded[0, :n] = tokens
        settings = (np.float32(sampling.temperature), np.float32(sampling.top_p),
                    np.int32(sampling.top_k), np.int32(eos_id),
                    np.int32(sampling.max_new_tokens))  # fmt: skip
        with sharding.use_mesh(self.mesh):
            return _prefill(self.params, padded, np.int32(n), key, *settings, model=self.model)

    def insert(self, state, prefill, slot: int):
        """`state` with the prefilled prompt in row `slot`, to be decoded from its next
        token on (`state` is consumed)."""
        with sharding.use_mesh(self.mesh):
            return _insert(state, prefill, np.int32(slot))

    def decode(self, state, steps: int = 1, refill: bool = False):
        """Up to `steps` decode steps for every slot: (the new state, tokens [slots, steps]
        and their log-probabilities, the steps taken; `state` is consumed). A row decodes
        while it may (`remaining`: until its EOS or its last new token), and the call stops
        early once every row is done, or with `refill` once one of the rows decoding when it
        started is (its slot can take the next prompt). Every row steps, decoding or not:
        the caller reads, of each row it filled, the tokens up to its end."""
        with sharding.use_mesh(self.mesh):
            state, tokens, logprobs, n = _decode(self.params, state, np.bool_(refill),
                                                 model=self.model, steps=steps)  # fmt: skip
        return state, tokens, logprobs, int(n)

    def stream_keys(self, seed: int, streams: Sequence[int]) -> np.ndarray:
        """The key data of each request's random stream: `seed`'s key folded with `streams`."""
        return np.asarray(_stream_keys(jax.random.key(seed), np.asarray(streams, np.int32)))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        eos_id: int = 2,
        slots: int | None = None,
        streams: Sequence[int] | None = None,
        steps: int = DECODE_STEPS,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Each prompt's `Completion`, `slots` prompts decoding at once (default: all; at
        most as many as there are prompts), a finished one's slot refilled with the next
        prompt; at most `steps` decode steps a call (`decode`: fewer once a row is done).
        Prompt `i` draws from the random stream
        `streams[i]` (default: `i`) of `sampling.seed`. The request is checked first
        (`check_request`). `progress`, when given, is called with the count of prompts done
        each time some finish."""
        lengths = [len(p) for p in prompts]
        slots = min(slots or len(prompts), len(prompts))
        check_request(self.model, lengths, sampling, rows=slots)
        keys = self.stream_keys(sampling.seed, range(len(prompts)) if streams is None else streams)
        length = decode_length(max(lengths), sampling.max_new_tokens, self.config.max_seq_len)
        state = self.new_state(slots, length)
        tokens = [[] for _ in prompts]
        logprobs = [[] for _ in prompts]
        stops: list[str | None] = [None] * len(prompts)

        def take(r, new, scores) -> bool:  # the tokens of request r; True when it is done
            for token, score in zip(new, scores, strict=True):
                tokens[r].append(int(token))
                logprobs[r].append(float(score))
                if token == eos_id or len(tokens[r]) == sampling.max_new_tokens:
                    stops[r] = "eos" if token == eos_id else "length"
                    return True
            return False

        pending, free = collections.deque(range(len(prompts))), list(range(slots))
        active, done = {}, 0  # slot: the request in it; the requests done
        while pending or active:
            filled = []  # each free slot takes a waiting prompt; their first tokens read at once
            while free and pending:
                r, slot = pending.popleft(), free.pop()
                first = self.prefill(prompts[r], sampling, keys[r], eos_id)
                state = self.insert(state, first, slot)
                filled.append((slot, r, (first["token"], first["logprob"])))
            finished = done
            for (slot, r, _), (token, score) in zip(
                filled, jax.device_get([f for *_, f in filled]), strict=True
            ):
                if take(r, [int(token)], [float(score)]):  # done at once: the slot is free
                    free.append(slot)
                    done += 1
                else:
                    active[slot] = r
            if active and not (free and pending):
                state, new, scores, n = self.decode(state, steps, refill=bool(pending))
                new, scores = np.asarray(new), np.asarray(scores)
                for slot, r in list(active.items()):
                    if take(r, new[slot, :n], scores[slot, :n]):
                        del active[slot]
                        free.append(slot)
                        done += 1
            if progress and done > finished:
                progress(done)
        return [Completion(t, np.asarray(lp, np.float32), s)
                for t, lp, s in zip(tokens, logprobs, stops, strict=True)]  # fmt: skip

    # ----- scoring -----

    def token_logprobs(self, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                       **check) -> list[np.ndarray]:  # fmt: skip
        """Each sequence's log-probability of each token given those before it, float32
        [len - 1] (the first token has none), through the model's chunked cross-entropy
        (never the logits whole). `check`: `score`'s."""
        self._needs("lm", "token log-probabilities")
        out = self.score(sequences, "logprobs", batch_size, **check)
        return [row[: len(x) - 1] for row, x in zip(out, sequences, strict=True)]

    def greedy_logprobs(self, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                        **check) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """(`token_logprobs`, and bool [len - 1]: whether each token is the model's argmax
        given those before it, i.e. what greedy decoding would produce) of each sequence,
        from the logits whole."""
        self._needs("lm", "greedy agreement")
        out = self.score(sequences, "greedy", batch_size, **check)
        return [(lp[: len(x) - 1], right[: len(x) - 1])
                for (lp, right), x in zip(out, sequences, strict=True)]  # fmt: skip

    def last_scores(self, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                    **check) -> np.ndarray:  # fmt: skip
        """float32 [N]: a reward model's score of each sequence, at its last token."""
        self._needs("score", "scores")
        return np.asarray(self.score(sequences, "last", batch_size, **check), np.float32)

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        kind: str,
        batch_size: int = 8,
        what: str | None = None,
        lower: str = "score fewer rows at a time (--batch-size)",
        progress: Callable[[int], None] | None = None,
    ) -> list:
        """One forward pass over every sequence, `min(batch_size, sequences)` rows a call,
        sorted by length and right-padded to the bucket of each call's longest: for each
        sequence, its row of `kind` ("logprobs", "greedy": (logprobs, argmax agreement), "last":
        the score at its last token), in their order. The calls' buffers are checked against
        the free memory first (`what` describes them in the refusal, `lower` says what to
        lower); `progress` is called with the rows scored after each call."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if any(len(x) == 0 for x in sequences):
            raise ValueError("An empty sequence has no token to score")
        if not len(sequences):
            return []
        rows = min(batch_size, len(sequences))
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        width = self.bucket(len(sequences[order[-1]]))
        check_memory(
            what or f"scoring {rows:,} rows of up to {width:,} tokens",
            forward_bytes(self.model, rows, width, logits=kind == "greedy"),
            lower,
        )
        out: list = [None] * len(sequences)
        for start in range(0, len(order), rows):
            chunk = order[start : start + rows]
            width = self.bucket(max(len(sequences[i]) for i in chunk))
            tokens = np.zeros((rows, width), np.int32)
            lengths = np.ones((rows,), np.int32)
            for row, i in enumerate(chunk):
                tokens[row, : len(sequences[i])] = sequences[i]
                lengths[row] = len(sequences[i])
            with sharding.use_mesh(self.mesh):
                got = _score(self.params, tokens, lengths, model=self.model, kind=kind)
            got = jax.tree.map(np.asarray, got)
            for row, i in enumerate(chunk):
                out[i] = jax.tree.map(lambda x, row=row: x[row], got)
            if progress:
                progress(start + len(chunk))
        return out

    def _needs(self, head: str, what: str) -> None:
        if self.config.head != head:
            kinds = {"lm": "a language model", "score": "a reward model (a score head)"}
            raise ValueError(f"{what} need {kinds[head]}; this model is {kinds[self.config.head]}")
