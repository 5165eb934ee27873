"""Llama 2 (Touvron et al. 2023, arXiv:2307.09288) in Flax Linen.

`Llama(config, execution)`: the architecture (`LlamaConfig`, what a checkpoint records) and
how to compute it (`Execution`: dtypes, attention backend, remat, layer loop; by default
float32 and `auto` attention: the platform's fused kernel where it applies). Parameter names
follow Meta's reference (`tok_embeddings`, `layers.attention.wq`, ...); the layers are stacked
on a leading axis and run with `nn.scan`, optionally under `nn.remat`. Every parameter carries
logical axis names; `llamax.sharding` maps them to the mesh.

Shapes: B batch, T query length, S key length (cache slots), D model dim, N query heads,
K kv heads, H head dim, F feed-forward dim, V vocab, L layers.

Inputs beyond the tokens:
- `positions` [B, T]: rotary positions (default 0..T-1, continuing after the cache's contents).
- `segment_ids` [B, T]: documents packed in one row; a token attends only to earlier tokens of
  the same segment. Padding is a segment of its own (conventionally 0). None: one document
  per row.
- `cache`: from `init_cache`; when given, `apply` returns `(logits, cache)` and the new keys and
  values are written at the cache's `index`. The caller keeps `index + T` within the cache
  length (a write past the end is clamped by `lax.dynamic_update_slice`, silently). A cache
  made with `per_row=True` has one index per row, [B] (each row of a decode batch at its own
  length: `llamax.inference`'s slots); it takes one token per row a call (T = 1), written at
  that row's index (past the end: dropped), and a query sees the keys of its own segment up to
  its own slot, which the cache's segment ids alone mark: the slots after a row's index must
  hold segment 0 (never written, or cleared when the row was filled).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llamax import rope, sharding
from llamax.attention import attend
from llamax.config import LlamaConfig
from llamax.execution import REMAT_POLICIES, Execution
from llamax.lora import LoraConfig
from llamax.lora import init_a as lora_init_a
from llamax.quantization import dequantize, layout

Cache = dict[str, Any]

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=_init):
    dtype = module.execution.weight_dtype
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _matrix(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...]):
    """Layer matrix `name` in the compute dtype: a parameter, or with weight quantization
    (int8, nf4) its codes times their scales `<name>_scale`, dequantized here, inside the layer
    (`llamax.quantization.layout` says how each is stored and what logical axes shard it)."""
    e = module.execution
    if e.weight_quantization == "none":
        return _param(module, name, axes, shape).astype(e.compute_dtype)
    code = layout(name, shape, axes, e.weight_quantization)
    zeros = nn.initializers.constant(code.zero)
    q = module.param(name, nn.with_logical_partitioning(zeros, code.axes), code.shape, code.dtype)
    scale = module.param(f"{name}_scale", nn.with_logical_partitioning(nn.initializers.ones,
                         code.scale_axes), code.scale_shape, jnp.float32)  # fmt: skip
    return dequantize(q, scale, name, e.compute_dtype)


def _constrain(x: jnp.ndarray, axes: tuple[str, ...]) -> jnp.ndarray:
    return nn.with_logical_constraint(x, axes)


def _adapted(module: nn.Module, name: str, x, y, axes: tuple[str, ...], shape, in_ndim: int):
    """`y`, the projection of `x` [B, T, in...] by the weight `name` (axes and shape [in...,
    out...]), plus its LoRA update s (drop(x) A) B where `module.lora` targets the weight."""
    lora = module.lora
    if lora is None or name not in lora.targets:
        return y
    dt, wt = module.execution.compute_dtype, module.execution.weight_dtype
    in_axes, out_axes = axes[:in_ndim], axes[in_ndim:]
    a_init = nn.with_logical_partitioning(lora_init_a, (*in_axes, "lora_rank"))
    b_init = nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *out_axes))
    a = module.param(f"{name}_lora_a", a_init, (*shape[:in_ndim], lora.rank), wt)
    b = module.param(f"{name}_lora_b", b_init, (lora.rank, *shape[in_ndim:]), wt)
    if lora.dropout and module.has_rng("dropout"):  # training passes a dropout key
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    h = jnp.tensordot(x, a.astype(dt), axes=in_ndim)
    update = jnp.tensordot(h, b.astype(dt), axes=1) * jnp.asarray(lora.scale, dt)
    return y + update.astype(y.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang and Sennrich 2019); statistics in float32."""

    config: LlamaConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = _param(self, "scale", ("embed",), (x.shape[-1],), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps
        )
        # Cast back before the scale, as Meta's `_norm(x.float()).type_as(x) * weight`.
        dtype = self.execution.compute_dtype
        return normed.astype(dtype) * scale.astype(dtype)


class Attention(nn.Module):
    """Grouped-query attention: K kv heads, each shared by N // K query heads."""

    config: LlamaConfig
    execution: Execution = Execution()
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, q_segment_ids, kv_segment_ids, cache_index, layer, kv):
        c, e = self.config, self.execution
        d, n, k, h = c.dim, c.n_heads, c.kv_heads, c.head_dim
        dt = e.compute_dtype
        wq = _matrix(self, "wq", ("embed", "heads", "head_dim"), (d, n, h))
        wk = _matrix(self, "wk", ("embed", "kv_heads", "head_dim"), (d, k, h))
        wv = _matrix(self, "wv", ("embed", "kv_heads", "head_dim"), (d, k, h))
        wo = _matrix(self, "wo", ("heads", "head_dim", "embed"), (n, h, d))

        q_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = _adapted(self, "wq", x, jnp.einsum("BTD,DNH->BTNH", x, wq), q_axes, (d, n, h), 1)
        key = _adapted(self, "wk", x, jnp.einsum("BTD,DKH->BTKH", x, wk), kv_axes, (d, k, h), 1)
        value = _adapted(self, "wv", x, jnp.einsum("BTD,DKH->BTKH", x, wv), kv_axes, (d, k, h), 1)
        q = checkpoint_name(q, "query_proj")
        key = checkpoint_name(key, "key_proj")
        value = checkpoint_name(value, "value_proj")
        q = _constrain(rope.apply_rotary(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        # Keys and values of the whole sequence (`kv_length` is never split): with the mesh's
        # `context` axis, each device's queries meet every key (an all-gather over it).
        key = _constrain(
            rope.apply_rotary(key, cos, sin), ("batch", "kv_length", "kv_heads", "head_dim")
        )
        value = _constrain(value, ("batch", "kv_length", "kv_heads", "head_dim"))

        if kv is not None:
            # The scanned model carries the whole cache [L, B, S, K, H] and `layer` indexes it;
            # the looped model passes this layer's own [B, S, K, H] (layer None). Either way
            # only the new keys and values are written, in place.
            prefix = () if layer is None else (layer,)

            def write(cache, new):
                new = new.astype(cache.dtype)
                if jnp.ndim(cache_index):  # one index per row: each row's token at its own
                    rows = jnp.arange(new.shape[0])
                    return cache.at[(*prefix, rows, cache_index)].set(new[:, 0], mode="drop")
                new = new.reshape((1,) * len(prefix) + new.shape)
                return jax.lax.dynamic_update_slice(cache, new, (*prefix, 0, cache_index, 0, 0))

            def read(cache):
                return (cache if layer is None else cache[layer]).astype(dt)

            kv = {"k": write(kv["k"], key), "v": write(kv["v"], value)}
            key, value = read(kv["k"]), read(kv["v"])

        # Without a cache this is self-attention from slot 0 (a static 0, so that the fused
        # kernels, which handle only that case, are chosen). With one index per row the segment
        # ids alone mask the keys (the slots after a row's index are segment 0): the offset
        # then puts every slot before the query.
        offset = 0 if kv is None else cache_index
        if kv is not None and jnp.ndim(cache_index):
            offset = key.shape[1]
        out = attend(
            q, key, value, q_segment_ids, kv_segment_ids, offset, e.attention,
            e.attention_block_q, e.attention_block_kv, e.attention_max_segments,
        )  # fmt: skip
        # As one [N*H, D] matmul: XLA's CPU layout pass otherwise transposes wo on every call.
        y = jnp.einsum("BTE,ED->BTD", out.reshape(*out.shape[:2], n * h), wo.reshape(n * h, d))
        out = checkpoint_name(
            _adapted(self, "wo", out, y, ("heads", "head_dim", "embed"), (n, h, d), 2), "out_proj"
        )
        return out, kv


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    config: LlamaConfig
    execution: Execution = Execution()
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        d, f = c.dim, c.hidden_dim
        w1 = _matrix(self, "w1", ("embed", "mlp"), (d, f))
        w3 = _matrix(self, "w3", ("embed", "mlp"), (d, f))
        w2 = _matrix(self, "w2", ("mlp", "embed"), (f, d))
        gate = _adapted(
            self, "w1", x, jnp.einsum("BTD,DF->BTF", x, w1), ("embed", "mlp"), (d, f), 1
        )
        up = _adapted(self, "w3", x, jnp.einsum("BTD,DF->BTF", x, w3), ("embed", "mlp"), (d, f), 1)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
        hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        out = jnp.einsum("BTF,FD->BTD", hidden, w2)
        return _adapted(self, "w2", hidden, out, ("mlp", "embed"), (f, d), 1)


class Block(nn.Module):
    """One pre-norm transformer layer; the signature is what `nn.scan` threads through: the
    carry is (activations, KV cache or None), `layer` is this layer's index."""

    config: LlamaConfig
    execution: Execution = Execution()
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, carry, cos, sin, q_segment_ids, kv_segment_ids, cache_index, layer):
        x, kv = carry
        c, e = self.config, self.execution
        h, kv = Attention(c, e, self.lora, name="attention")(
            RMSNorm(c, e, name="attention_norm")(x),
            cos,
            sin,
            q_segment_ids,
            kv_segment_ids,
            cache_index,
            layer,
            kv,
        )
        x = x + h
        x = x + FeedForward(c, e, self.lora, name="feed_forward")(RMSNorm(c, e, name="ffn_norm")(x))
        return (_constrain(x, ("batch", "length", "embed")), kv), None


class Llama(nn.Module):
    """tokens int32 [B, T] -> float32 logits [B, T, V] (and the updated cache, if one is given);
    with `config.head == "score"` (a reward model), float32 scores [B, T] instead.

    With `targets` int32 [B, T] (a training loss), the cross-entropy of each target and the
    log-partition log Z, both float32 [B, T], instead of the logits: for sequences longer
    than `execution.loss_chunk_len` the output projection and the softmax run over chunks of
    positions (`output_nll`), so that the logits, the largest activation, are never whole in
    memory; shorter ones take the whole logits, differentiated as they are.

    `execution.scan_layers=False` runs the layers as a Python loop over separate parameters
    `layers_0`, `layers_1`, ... (see `unstack_layers`) and a per-layer cache
    (`init_cache(..., stacked=False)`): generation uses it, because slicing a layer out of
    stacked weights and caches copies it, on every decode step.

    `lora` adds low-rank adapters to the weights it targets (`llamax.lora`); training passes a
    `dropout` rng for the adapters' dropout.
    """

    config: LlamaConfig
    execution: Execution = Execution()
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        cache: Cache | None = None,
        targets: jnp.ndarray | None = None,
    ):
        c, e = self.config, self.execution
        b, t = tokens.shape
        index = jnp.asarray(0, jnp.int32) if cache is None else cache["index"]
        if positions is None:
            start = index[:, None] if jnp.ndim(index) else index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is not None:
            segment_ids = segment_ids.astype(jnp.int32)
        elif cache is not None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        # else None down to `attend`: one document per row, which fused kernels run unmasked

        embedding = _param(self, "tok_embeddings", ("vocab", "embed"), (c.vocab_size, c.dim))
        # Gather the table whole along `embed` first (as FSDP does for every weight): GSPMD
        # cannot otherwise turn the gather's embed-sharded output into a batch-sharded one
        # without replicating it.
        embedding = _constrain(embedding, ("vocab", None))
        x = jnp.take(embedding, tokens, axis=0).astype(e.compute_dtype)
        x = _constrain(x, ("batch", "length", "embed"))
        cos, sin = rope.rotary_angles(positions, c)

        if cache is None:
            kv_segment_ids, kv = segment_ids, None
        elif jnp.ndim(index):  # one index per row: one token per row, at its own index
            if t != 1:
                raise ValueError(
                    f"A cache with one index per row takes one token per row a call, got {t}: "
                    "fill a row from a cache with one index (prefill), then copy it in"
                )
            rows = jnp.arange(b)
            kv_segment_ids = cache["segment_ids"].at[rows, index].set(segment_ids[:, 0],
                                                                      mode="drop")  # fmt: skip
            kv = {"k": cache["k"], "v": cache["v"]}
        else:
            kv_segment_ids = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids, (0, index)
            )
            kv = {"k": cache["k"], "v": cache["v"]}

        block = Block
        if e.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[e.remat_policy], prevent_cse=False)
        if e.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 5 + (0,),
                length=c.n_layers,
                unroll=e.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, e, self.lora, name="layers")
            layer_ids = jnp.arange(c.n_layers, dtype=jnp.int32)
            (x, kv), _ = layers((x, kv), cos, sin, segment_ids, kv_segment_ids, index, layer_ids)
        else:
            per_layer = []
            for i in range(c.n_layers):
                layer_kv = None if kv is None else {"k": kv["k"][i], "v": kv["v"][i]}
                (x, layer_kv), _ = block(c, e, self.lora, name=f"layers_{i}")(
                    (x, layer_kv), cos, sin, segment_ids, kv_segment_ids, index, None
                )
                per_layer.append(layer_kv)
            if kv is not None:
                kv = {name: tuple(layer_kv[name] for layer_kv in per_layer) for name in ("k", "v")}

        x = RMSNorm(c, e, name="norm")(x)
        if c.head == "score":  # a reward model: one scalar per position
            if cache is not None or targets is not None:
                raise ValueError(
                    "A model with a score head (a reward model) neither generates nor predicts "
                    "tokens (cache, targets)"
                )
            score = _param(self, "score", ("embed", "labels"), (c.dim, 1))
            out = jnp.einsum("BTD,DL->BTL", x, score.astype(e.compute_dtype))
            return _constrain(out[..., 0].astype(jnp.float32), ("batch", "length"))
        output = _param(self, "output", ("embed", "vocab"), (c.dim, c.vocab_size))
        if targets is not None:
            if cache is not None:
                raise ValueError("Give targets (a training loss) or a cache (generation), not both")
            chunks = _loss_chunks(t, e)
            if chunks > 1:
                return output_nll(x, output, targets.astype(jnp.int32), chunks)
        # In the compute dtype, then float32 for the softmax (MaxText's default): float32
        # output from the matmul would double the largest activation, [B, T, V].
        logits = jnp.einsum("BTD,DV->BTV", x, output.astype(e.compute_dtype)).astype(jnp.float32)
        logits = _constrain(logits, ("batch", "length", "vocab"))
        if targets is not None:  # one chunk: the logits whole, differentiated as they are
            return token_nll(logits, targets.astype(jnp.int32))
        if cache is None:
            return logits
        return logits, {**kv, "segment_ids": kv_segment_ids, "index": index + t}


def _loss_chunks(length: int, execution: Execution) -> int:
    chunk = execution.loss_chunk_len
    return 1 if chunk == 0 or length <= chunk else -(-length // chunk)


def _strided(a: jnp.ndarray, n: int) -> jnp.ndarray:
    """[B, T, ...] -> [B, T / n, n, ...]: chunk i (`[:, :, i]`) is positions i, i + n, ...
    Strided rather than contiguous, so that a chunk keeps the length sharding (context
    parallelism splits positions in contiguous blocks)."""
    return a.reshape(a.shape[0], a.shape[1] // n, n, *a.shape[2:])


def _unstrided(chunks: jnp.ndarray) -> jnp.ndarray:
    """The inverse of `_strided` for what a scan over the chunks stacks, [n, B, T / n, ...]."""
    a = jnp.moveaxis(chunks, 0, 2)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _padded(a: jnp.ndarray, n: int) -> jnp.ndarray:
    """`a` [B, T, ...] with zeros after position T - 1 up to a multiple of n positions."""
    extra = -a.shape[1] % n
    return a if not extra else jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))


def token_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cross-entropy of each target under logits [..., V], in float32, and log Z (the
    log-partition, for z-loss): both [...]. The one cross-entropy of llamax."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], log_z


def _chunk_logits(x, output):
    """float32 logits [B, t, V] of one chunk of the final activations [B, t, D]."""
    logits = jnp.einsum("BTD,DV->BTV", x, output, preferred_element_type=jnp.float32)
    return _constrain(logits, ("batch", "length", "vocab"))


def _gathered_output(output, dtype):
    # In the compute dtype, whole along `embed` on every device, once for all the chunks.
    return _constrain(output.astype(dtype), (None, "vocab"))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def output_nll(x, output, targets, chunks: int):
    """The cross-entropy of `targets` [B, T] under the logits `x @ output` (final activations
    x [B, T, D], the output projection [D, V]) and the log-partition log Z, float32 [B, T]
    each, computed over `chunks` chunks of positions in a loop; the backward pass computes
    each chunk's logits again. Only one chunk's logits, [B, T / chunks, V], is in memory at a
    time, against [B, T, V] and its gradient for the logits whole. The matmuls run in x's
    dtype with float32 results; the output projection's gradient sums in float32."""
    return _output_nll_forward(x, output, targets, chunks)[0]


def _output_nll_forward(x, output, targets, chunks):
    t = targets.shape[1]
    w = _gathered_output(output, x.dtype)
    xs, ys = _strided(_padded(x, chunks), chunks), _strided(_padded(targets, chunks), chunks)

    def chunk(_, i):
        logits = _chunk_logits(jax.lax.dynamic_index_in_dim(xs, i, 2, keepdims=False), w)
        return None, token_nll(logits, jax.lax.dynamic_index_in_dim(ys, i, 2, keepdims=False))

    _, (nll, log_z) = jax.lax.scan(chunk, None, jnp.arange(chunks))
    nll, log_z = _unstrided(nll)[:, :t], _unstrided(log_z)[:, :t]
    return (nll, log_z), (x, output, targets, log_z)


def _output_nll_backward(chunks, residuals, cotangents):
    x, output, targets, log_z = residuals
    g_nll, g_log_z = cotangents
    w = _gathered_output(output, x.dtype)
    xs, ys, lz, gn, gz = (_strided(_padded(a, chunks), chunks)
                          for a in (x, targets, log_z, g_nll, g_log_z))  # fmt: skip

    def chunk(grad_output, i):
        x_i, y_i, lz_i, gn_i, gz_i = (jax.lax.dynamic_index_in_dim(a, i, 2, keepdims=False)
                                      for a in (xs, ys, lz, gn, gz))  # fmt: skip
        # d nll / d logits = softmax - onehot(target); d log Z / d logits = softmax.
        probs = jnp.exp(_chunk_logits(x_i, w) - lz_i[..., None])
        onehot = y_i[..., None] == jnp.arange(probs.shape[-1], dtype=y_i.dtype)
        d_logits = (gn_i + gz_i)[..., None] * probs - jnp.where(onehot, gn_i[..., None], 0.0)
        d_logits = _constrain(d_logits.astype(x.dtype), ("batch", "length", "vocab"))
        d_x = jnp.einsum("BTV,DV->BTD", d_logits, w)
        grad_output += jnp.einsum("BTD,BTV->DV", x_i, d_logits, preferred_element_type=jnp.float32)
        return _constrain(grad_output, ("embed", "vocab")), d_x

    zeros = _constrain(jnp.zeros(output.shape, jnp.float32), ("embed", "vocab"))
    grad_output, d_x = jax.lax.scan(chunk, zeros, jnp.arange(chunks))
    d_x = _unstrided(d_x)[:, : x.shape[1]]
    return d_x, grad_output.astype(output.dtype), None


output_nll.defvjp(_output_nll_forward, _output_nll_backward)


def unstack_layers(params):
    """Parameters of a scanned `Llama` -> those of one with `execution.scan_layers=False`."""
    params = dict(params)
    stacked = params.pop("layers")
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


def init_cache(
    config: LlamaConfig,
    batch_size: int,
    max_len: int,
    dtype: Any = "float32",
    stacked=True,
    per_row=False,
) -> Cache:
    """An empty KV cache of `max_len` slots, keys and values in `dtype` (the model's compute
    dtype, `model.execution.dtype`, saves a cast on every step).

    `stacked`: keys and values as one [L, B, S, K, H] array each, for a scanned `Llama`; else
    as a tuple of L arrays [B, S, K, H], for one with `execution.scan_layers=False`.
    `per_row`: one write index per row, [B] (decoding rows of different lengths, one token
    each a call), instead of one for the batch.
    """
    shape = (batch_size, max_len, config.kv_heads, config.head_dim)

    def zeros():  # a new buffer each call: k and v must not alias (donation needs it)
        if stacked:
            return jnp.zeros((config.n_layers, *shape), dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))

    return {
        "k": zeros(),
        "v": zeros(),
        # 0 marks empty slots; they are also later than every query, so causality hides them.
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "index": jnp.zeros((batch_size,) if per_row else (), jnp.int32),
    }


def trained_with_adapters(config: LlamaConfig) -> tuple[str, ...]:
    """The parameters that train whole beside LoRA's adapters, from the model's head (PEFT's
    `modules_to_save`): a reward model's score head, which its base (a language model's body)
    does not hold or holds untrained; a language model's, none (its output stays the base's).
    `llamax.lora.split(params, trained_with_adapters(config))` is (the frozen base, what
    trains); a LoRA run's checkpoints, exports and merges carry both kinds."""
    return ("score",) if config.head == "score" else ()


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
