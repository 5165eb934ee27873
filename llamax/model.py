"""Llama 2 (Touvron et al. 2023, arXiv:2307.09288) in Flax Linen.

Parameter names follow Meta's reference (`tok_embeddings`, `layers.attention.wq`, ...); the
layers are stacked on a leading axis and run with `nn.scan`, optionally under `nn.remat`.
Every parameter carries logical axis names; `llamax.sharding` maps them to the mesh.

Shapes: B batch, T query length, S key length (cache slots), D model dim, N query heads,
K kv heads, H head dim, F feed-forward dim, V vocab, L layers.

Inputs beyond the tokens:
- `positions` [B, T]: rotary positions (default 0..T-1, continuing after the cache's contents).
- `segment_ids` [B, T]: documents packed in one row; a token attends only to earlier tokens of
  the same segment. Padding is a segment of its own (conventionally 0).
- `cache`: from `init_cache`; when given, `apply` returns `(logits, cache)` and the new keys and
  values are written at the cache's `index`. The caller keeps `index + T` within the cache
  length (a write past the end is clamped by `lax.dynamic_update_slice`, silently).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llamax import rope, sharding
from llamax.attention import attend
from llamax.config import LlamaConfig

Cache = dict[str, jnp.ndarray]

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=_init):
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)


def _constrain(x: jnp.ndarray, axes: tuple[str, ...]) -> jnp.ndarray:
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang and Sennrich 2019); statistics in float32."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = _param(self, "scale", ("embed",), (x.shape[-1],), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps
        )
        # Cast back before the scale, as Meta's `_norm(x.float()).type_as(x) * weight`.
        dtype = self.config.compute_dtype
        return normed.astype(dtype) * scale.astype(dtype)


class Attention(nn.Module):
    """Grouped-query attention: K kv heads, each shared by N // K query heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, q_segment_ids, kv_segment_ids, cache_index, layer_cache):
        c = self.config
        d, n, k, h = c.dim, c.n_heads, c.kv_heads, c.head_dim
        dt = c.compute_dtype
        wq = _param(self, "wq", ("embed", "heads", "head_dim"), (d, n, h)).astype(dt)
        wk = _param(self, "wk", ("embed", "kv_heads", "head_dim"), (d, k, h)).astype(dt)
        wv = _param(self, "wv", ("embed", "kv_heads", "head_dim"), (d, k, h)).astype(dt)
        wo = _param(self, "wo", ("heads", "head_dim", "embed"), (n, h, d)).astype(dt)

        q = checkpoint_name(jnp.einsum("BTD,DNH->BTNH", x, wq), "query_proj")
        key = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wk), "key_proj")
        value = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wv), "value_proj")
        q = _constrain(rope.apply_rotary(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        key = _constrain(
            rope.apply_rotary(key, cos, sin), ("batch", "length", "kv_heads", "head_dim")
        )
        value = _constrain(value, ("batch", "length", "kv_heads", "head_dim"))

        new_cache = None
        if layer_cache is not None:
            at = (0, cache_index, 0, 0)
            key = jax.lax.dynamic_update_slice(
                layer_cache["k"], key.astype(layer_cache["k"].dtype), at
            )
            value = jax.lax.dynamic_update_slice(
                layer_cache["v"], value.astype(layer_cache["v"].dtype), at
            )
            new_cache = {"k": key, "v": value}
            key, value = key.astype(dt), value.astype(dt)

        out = attend(q, key, value, q_segment_ids, kv_segment_ids, cache_index, c.attention)
        out = checkpoint_name(jnp.einsum("BTNH,NHD->BTD", out, wo), "out_proj")
        return out, new_cache


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        d, f, dt = c.dim, c.hidden_dim, c.compute_dtype
        w1 = _param(self, "w1", ("embed", "mlp"), (d, f)).astype(dt)
        w3 = _param(self, "w3", ("embed", "mlp"), (d, f)).astype(dt)
        w2 = _param(self, "w2", ("mlp", "embed"), (f, d)).astype(dt)
        gate = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w1), "mlp_gate")
        up = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w3), "mlp_up")
        hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, w2)


class Block(nn.Module):
    """One pre-norm transformer layer; the signature is what `nn.scan` threads through."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, q_segment_ids, kv_segment_ids, cache_index, layer_cache):
        h, new_cache = Attention(self.config, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x),
            cos,
            sin,
            q_segment_ids,
            kv_segment_ids,
            cache_index,
            layer_cache,
        )
        x = x + h
        x = x + FeedForward(self.config, name="feed_forward")(
            RMSNorm(self.config, name="ffn_norm")(x)
        )
        return _constrain(x, ("batch", "length", "embed")), new_cache


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
}


class Llama(nn.Module):
    """tokens int32 [B, T] -> float32 logits [B, T, V] (and the updated cache, if one is given)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        cache: Cache | None = None,
    ):
        c = self.config
        b, t = tokens.shape
        index = jnp.asarray(0, jnp.int32) if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        embedding = _param(self, "tok_embeddings", ("vocab", "embed"), (c.vocab_size, c.dim))
        # Gather the table whole along `embed` first (as FSDP does for every weight): GSPMD
        # cannot otherwise turn the gather's embed-sharded output into a batch-sharded one
        # without replicating it.
        embedding = _constrain(embedding, ("vocab", None))
        x = jnp.take(embedding, tokens, axis=0).astype(c.compute_dtype)
        x = _constrain(x, ("batch", "length", "embed"))
        cos, sin = rope.rotary_angles(positions, c)

        if cache is None:
            kv_segment_ids, layer_cache = segment_ids, None
        else:
            kv_segment_ids = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids, (0, index)
            )
            layer_cache = {"k": cache["k"], "v": cache["v"]}

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (0,),
            length=c.n_layers,
            unroll=c.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        x, new_layer_cache = layers(x, cos, sin, segment_ids, kv_segment_ids, index, layer_cache)

        x = RMSNorm(c, name="norm")(x)
        output = _param(self, "output", ("embed", "vocab"), (c.dim, c.vocab_size))
        # In the compute dtype, then float32 for the softmax (MaxText's default): float32
        # output from the matmul would double the largest activation, [B, T, V].
        logits = jnp.einsum("BTD,DV->BTV", x, output.astype(c.compute_dtype)).astype(jnp.float32)
        logits = _constrain(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, {**new_layer_cache, "segment_ids": kv_segment_ids, "index": index + t}


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache of `max_len` slots; keys and values in the compute dtype by default."""
    shape = (config.n_layers, batch_size, max_len, config.kv_heads, config.head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        # 0 marks empty slots; they are also later than every query, so causality hides them.
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "index": jnp.asarray(0, jnp.int32),
    }


def abstract_params(model: Llama):
    """`jax.eval_shape` of the parameters, boxed with their logical axis names; no memory used."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda r, x: model.init(r, x)["params"], jax.random.key(0), tokens)


def init_params(model: Llama, rng: jax.Array, mesh: jax.sharding.Mesh | None = None):
    """Random parameters as a plain pytree; with a mesh, each born sharded on its devices
    (never materialized whole on one host)."""
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init(r):
        return nn.unbox(model.init(r, tokens)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = sharding.tree_shardings(abstract_params(model), mesh)
    with sharding.use_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(rng)
