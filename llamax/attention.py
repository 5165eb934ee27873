"""Attention behind one function, `attend`, so that backends can be swapped by config.

`xla` is the reference: plain einsums and a float32 softmax, any sequence length that fits in
memory, grouped-query heads without repeating k and v. Its scores take B x N x T x S floats:
34 GB per layer for one 16k sequence of Llama 2 7B.

`chunked` is the same computation a block of `chunk` queries at a time, each block
rematerialized in the backward pass: scores take B x N x chunk x S, so long sequences fit on
any platform (it does the full T x S work; Pallas splash attention on TPU skips the masked
blocks).

Masking is by slot, not by position: the query at row t sits at key slot `q_offset + t` and sees
the key slots up to and including its own whose segment id equals its own. Positions restart at
each packed document, slots never do, so causality and packing stay independent.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_offset: jnp.ndarray | int = 0,
    backend: str = "xla",
    chunk: int = 512,
) -> jnp.ndarray:
    """Causal, segment-masked attention: q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H]."""
    if backend == "xla" or (backend == "chunked" and q.shape[1] <= chunk):
        return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    if backend == "chunked":
        return _chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, chunk)
    raise ValueError(f"Unknown attention backend {backend!r}; available: 'xla', 'chunked'")


def attention_mask(q_segment_ids, kv_segment_ids, q_offset=0) -> jnp.ndarray:
    """Boolean [B, T, S]: True where the query may attend to the key."""
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    causal = jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return same_segment & causal[None]


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    # q.k in the compute dtype, as MaxText and Hugging Face do (an f32 product costs a
    # slower matmul on CPUs and GPUs); the scale, mask and softmax are in float32.
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32) * (h**-0.5)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)[:, None, None]
    # A finite minimum, not -inf: a row can never be fully masked (each query sees its own
    # slot), but -inf would still turn 0 * inf into NaN in the gradient.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, chunk):
    b, t, n, h = q.shape
    blocks = -(-t // chunk)
    pad = blocks * chunk - t  # padded queries are segment 0; their outputs are dropped
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
    q_blocks = jnp.moveaxis(q.reshape(b, blocks, chunk, n, h), 1, 0)
    seg_blocks = jnp.moveaxis(q_segment_ids.reshape(b, blocks, chunk), 1, 0)
    offsets = q_offset + chunk * jnp.arange(blocks)

    @jax.checkpoint  # keep only each block's inputs for the backward pass
    def block(args):
        q_block, seg_block, offset = args
        return _xla_attention(q_block, k, v, seg_block, kv_segment_ids, offset)

    out = jax.lax.map(block, (q_blocks, seg_blocks, offsets))  # [blocks, B, chunk, N, H]
    return jnp.moveaxis(out, 0, 1).reshape(b, blocks * chunk, n, h)[:, :t]
