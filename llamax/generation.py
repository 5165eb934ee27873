"""Generation: a jitted prefill, then a jitted decode loop over the KV cache; sampling; and
Meta's Llama 2 chat format.

Prompts of different lengths are left-padded into one batch: padding is segment 0 (never
attended to) and each prompt's positions start at 0, so every row computes what it would
alone. Decoding stops when every row has produced EOS or `max_new_tokens`.

Shapes: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llamax.data import chat
from llamax.model import Llama, init_cache, unstack_layers


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
    the first EOS."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"Bad sampling settings: temperature {temperature}, top_p {top_p}, top_k {top_k}"
        )
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


def chat_tokens(dialog: Sequence[dict], tokenizer) -> list[int]:
    """A dialog (`{"role": "system"|"user"|"assistant", "content": ...}`, ending with a user
    turn) as Meta's `Llama.chat_completion` tokenizes it: the system prompt merged into the
    first user turn inside `<<SYS>>`, each finished exchange `[INST] q [/INST] a` between BOS
    and EOS, the last question after a BOS and awaiting its answer. The same formatting as
    fine-tuning's (`llamax.data.chat.dialog_tokens`)."""
    if not dialog or dialog[-1].get("role") != "user":
        raise ValueError("The last turn of a dialog must be the user's")
    try:
        return chat.dialog_tokens(dialog, tokenizer)[0]
    except chat.BadRecord as e:
        raise ValueError(str(e)) from None
