"""Attention behind one function, `attend`, so that backends can be swapped by config.

`xla` is the reference: plain einsums and a float32 softmax, any sequence length that fits in
memory, grouped-query heads without repeating k and v. Its scores take B x N x T x S floats:
34 GB per layer for one 16k sequence of Llama 2 7B.

`chunked` is the same computation a block of `block_q` queries at a time, each block
rematerialized in the backward pass: scores take B x N x block_q x S, so long sequences fit on
any platform (it does the full T x S work).

`splash` is Pallas' TPU splash attention (flash attention that skips the blocks the causal
and segment masks hide), run per device under `shard_map` with the model's batch and head
shardings; its multi-head kernel groups the query heads over the kv heads itself (k and v are
never repeated). Off TPU it runs in Pallas' interpret mode (slow; for tests). Self-attention
of 128 tokens or more only (the KV-cache path and shorter inputs use `xla`).

`cudnn` is cuDNN's fused (flash) attention on GPU, with no dense mask: rows without segment
ids take its plain causal kernel; packed rows its packed layout (each run of equal segment ids
one document: per-row lengths and start offsets, `MaskType.PADDING_CAUSAL`; Hopper or later),
for up to `max_segments` documents per row; a batch with a row of more, or a GPU older than
Hopper, gets the dense `[B, 1, T, S]` mask for that call (right, slower). A row's documents
are contiguous runs, as every llamax packer writes them: a segment id that comes back after
another is a new document here, where `xla` would join the two. Off GPU the same layout goes
through jax's own offset arithmetic into `_packed_reference`, which reads the offsets as cuDNN
does, so the CPU tests check exactly what the GPU is given. jax releases whose offset
arithmetic scales the key offsets by the query head count (up to 0.11.0; it reads the wrong
keys under grouped-query attention) get k and v repeated to the query heads, found by trying
that arithmetic once (`_kv_offsets_follow_kv_heads`).

`auto` picks per call, for the platform the program is traced for: splash on TPU and cudnn on
GPU where their shape and dtype rules allow (splash: self-attention of a multiple of 128
tokens that its blocks divide; cudnn: self-attention in bfloat16 or float16 with a head dim
of at most 128, a multiple of 8), else on an accelerator `chunked` for inputs longer than
`block_q` (a float32 model on a GPU, a length splash's blocks do not divide, a long prefill;
`xla`'s scores would not fit: 88 GiB for a 1.1B model at 8 x 2048), else `xla`; with the
mesh's `context` axis over more than one device, never a fused kernel (neither splits the
sequence: `chunked` or `xla` then, their queries each device's share). It is the
default of `Execution`, so training and a loaded checkpoint run the platform's kernel unless
told otherwise, and one config or checkpoint runs well on every platform.

Segment ids of None mean one document per row (the model passes None when it is given none).
Masking is by slot, not by position: the query at row t sits at key slot `q_offset + t` and sees
the key slots up to and including its own whose segment id equals its own. Positions restart at
each packed document, slots never do, so causality and packing stay independent.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from llamax import sharding

BACKENDS = ("auto", "xla", "chunked", "splash", "cudnn")
# The platform the kernels are traced for: the default backend's, unless a program is being
# compiled ahead of time for another (`compiling_for`).
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace the fused kernels for `platform` ("tpu", "gpu") whatever this machine is: how
    `llamax.aot` compiles splash attention for a TPU slice on a CPU."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def _platform() -> str:
    return _PLATFORM.get() or jax.default_backend()


def check_backend(backend: str, block_q: int = 512, block_kv: int = 512) -> list[str]:
    """What is wrong with these attention settings (empty: nothing)."""
    if backend not in BACKENDS:
        return [f"attention must be one of {BACKENDS}, got {backend!r}"]
    if backend in ("splash", "auto") and block_kv % 128:
        return [f"splash attention needs block_kv a multiple of 128 (TPU lanes), got {block_kv}"]
    return []


def _fits_splash(t: int, s: int, block_q: int, block_kv: int) -> bool:
    return t % 128 == 0 and s % 128 == 0 and t % min(block_q, t) == 0 and s % min(block_kv, s) == 0


def _fits_cudnn(q: jnp.ndarray) -> bool:
    h = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and h <= 128 and h % 8 == 0


def resolve_backend(backend: str, q, k, self_attention: bool, block_q: int, block_kv: int) -> str:
    """The backend `auto` stands for with these inputs (any other backend: itself)."""
    if backend != "auto":
        return backend
    platform = _platform()
    t, s = q.shape[1], k.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    split = not mesh.empty and dict(mesh.shape).get("context", 1) > 1  # the fused kernels
    if platform == "tpu" and self_attention and _fits_splash(t, s, block_q, block_kv) and not split:
        return "splash"
    if platform == "gpu" and self_attention and _fits_cudnn(q) and not split:
        return "cudnn"
    if platform in ("gpu", "tpu") and t > block_q:
        return "chunked"  # never the whole T x S score matrix of a long input on an accelerator
    return "xla"


def attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    q_segment_ids: jnp.ndarray | None,
    kv_segment_ids: jnp.ndarray | None,
    q_offset: jnp.ndarray | int = 0,
    backend: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
    max_segments: int = 32,
) -> jnp.ndarray:
    """Causal, segment-masked attention: q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H]."""
    errors = check_backend(backend, block_q, block_kv)
    if errors:
        raise ValueError(errors[0])
    self_attention = q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0
    backend = resolve_backend(backend, q, k, self_attention, block_q, block_kv)
    if backend == "cudnn" and self_attention:
        return _cudnn_attention(q, k, v, q_segment_ids, max_segments)
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.ones(k.shape[:2], jnp.int32)
    # Below 128 tokens (one TPU lane width; e.g. the 1-token dummy input of initialization)
    # splash has no block to work with: those use the reference.
    if backend == "splash" and self_attention and q.shape[1] >= 128:
        return _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q, block_kv)
    if backend == "chunked" and q.shape[1] > block_q:
        return _chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q)
    return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset)


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


def _block(size: int, length: int, name: str) -> int:
    block = min(size, length)
    if length % block:
        raise ValueError(
            f"splash attention: sequence length {length} is not a multiple of {name} {block}"
        )
    return block


def _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q, block_kv):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    interpret = _platform() != "tpu"
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale

    def local(q, k, v, q_segment_ids, kv_segment_ids):  # this device's share
        t, n = q.shape[1], q.shape[2]
        s = k.shape[1]
        bq, bkv = _block(block_q, t, "block_q"), _block(block_kv, s, "block_kv")
        sizes = sk.BlockSizes(
            block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
        )  # fmt: skip
        mask = sm.MultiHeadMask([sm.CausalMask((t, s)) for _ in range(n)])
        # The multi-head kernel groups query heads over fewer kv heads itself.
        kernel = sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
        q, k, v = (jnp.moveaxis(x, 1, 2) for x in (q, k, v))  # [B, heads, T or S, H]

        def one_row(q, k, v, q_seg, kv_seg):
            return kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_seg, kv=kv_seg))

        out = jax.vmap(one_row)(q, k, v, q_segment_ids, kv_segment_ids)  # [B, N, T, H]
        return jnp.moveaxis(out, 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    spec = lambda names, x: sharding.mesh_axes(names, x.shape, mesh)  # noqa: E731
    q_spec = spec(("batch", "length", "heads", "head_dim"), q)
    kv_spec = spec(("batch", "length", "kv_heads", "head_dim"), k)
    if q_spec[2] != kv_spec[2]:  # heads and kv heads must split alike to stay grouped
        q_spec = jax.sharding.PartitionSpec(q_spec[0], None, kv_spec[2], None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=q_spec, check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)  # fmt: skip


def _cudnn_attention(q, k, v, segment_ids, max_segments):
    on_gpu = _platform() == "gpu"
    implementation = "cudnn" if on_gpu else None  # else the same function's XLA version
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    def dense():
        mask = attention_mask(segment_ids, segment_ids)[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    m = min(max_segments, q.shape[1])
    if m < 2 or not _packed_layout_available():  # jax's packed layout needs 2 or more
        return dense()
    # The layout rows shard as the batch does, and k and v as q (jax's cuDNN partitioner
    # splits all of them along the batch and requires q, k and v split alike).
    lengths, starts, count = (
        nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
        for x in segment_runs(segment_ids, m)
    )

    def packed():
        kk, vv = k, v
        if not _kv_offsets_follow_kv_heads():
            kk, vv = (
                nn.with_logical_constraint(
                    jnp.repeat(x, q.shape[2] // k.shape[2], axis=2),
                    ("batch", "length", "heads", "head_dim"),
                )
                for x in (k, v)
            )
        args = (q, kk, vv, lengths, lengths, starts, starts, q.shape[-1] ** -0.5)
        return _cudnn_packed(*args) if on_gpu else _packed_reference(*args)

    return jax.lax.cond(jnp.max(count) <= m, packed, dense)


def segment_runs(segment_ids: jnp.ndarray, m: int):
    """Each row's documents (runs of equal segment ids) in the packed layout of jax's cuDNN
    attention: lengths [B, m] and start slots [B, m + 1], -1 past the row's last run, and the
    runs per row [B] (a row of more than m runs does not fit the layout)."""
    b, t = segment_ids.shape
    first = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1  # [B, T]: each token's run
    count = run[:, -1] + 1
    rows = jnp.arange(b)[:, None]
    lengths = jnp.zeros((b, m), jnp.int32).at[rows, run].add(1, mode="drop")
    lengths = jnp.where(jnp.arange(m) < count[:, None], lengths, -1)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts = jnp.full((b, m + 1), -1, jnp.int32)
    starts = starts.at[rows, jnp.where(first & (run < m), run, m + 1)].set(slots, mode="drop")
    return lengths, starts, count


def _cudnn_module():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


def _cudnn_packed(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale):
    cudnn = _cudnn_module()
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=q_seqlen, kv_seqlen=kv_seqlen, q_offsets=q_offsets,
        kv_offsets=kv_offsets, scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL,
    )  # fmt: skip


def _packed_layout_available() -> bool:
    """cuDNN's packed layout needs Hopper (compute capability 9.0) or later; off GPU the
    reference stands in for it."""
    if _platform() != "gpu":
        return True
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:  # tracing for a GPU on a machine without one
        return True
    capability = getattr(device, "compute_capability", None)
    return capability is not None and tuple(map(int, capability.split("."))) >= (9, 0)


@functools.cache
def _kv_offsets_follow_kv_heads() -> bool:
    """Whether this jax turns key offsets into element offsets with the kv head count (right)
    or the query head count (jax <= 0.11.0). Found by running its arithmetic once on a query
    of 4 heads and a key of 2: the second key document, at slot 1, starts at element 2."""
    fix = getattr(_cudnn_module(), "_fix_seqlen_offsets", None)
    if fix is None:  # nothing to check against: repeating k and v is right either way
        return False
    with jax.ensure_compile_time_eval():
        lengths = jnp.array([[1, 1]], jnp.int32)
        starts = jnp.array([[0, 1, -1]], jnp.int32)
        q, k = jnp.zeros((1, 2, 4, 1)), jnp.zeros((1, 2, 2, 1))
        kv_offsets = fix(lengths, lengths, starts, starts, q, k)[3]
        return int(kv_offsets[0, 1]) == 2


def _packed_reference(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale):
    """What cuDNN computes from jax's packed layout, in jnp: jax's own offset arithmetic
    (`_fix_seqlen_offsets`, which the GPU path runs before the kernel), then the batch read
    as cuDNN reads it: one packed [B*T, N, H] query tensor, segment g the lengths[g] tokens
    from element offset offsets[g], causal within a segment, rows not in one left zero."""
    q_seqlen, kv_seqlen, q_offsets, kv_offsets = _cudnn_module()._fix_seqlen_offsets(
        q_seqlen, kv_seqlen, q_offsets, kv_offsets, q, k
    )
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]

    def members(seqlen, offsets, tokens, stride):  # each packed token's segment and position
        seqlen = jnp.maximum(seqlen.reshape(-1), 0)
        start = offsets.reshape(-1)[: seqlen.shape[0]] // stride
        slot = jnp.arange(tokens)[:, None]
        inside = (slot >= start) & (slot < start + seqlen)  # [tokens, segments]
        segment = jnp.where(inside.any(-1), jnp.argmax(inside, -1) + 1, 0)
        position = slot[:, 0] - start[jnp.maximum(segment - 1, 0)]
        return segment, position

    q_seg, q_pos = members(q_seqlen, q_offsets, b * t, n * h)
    kv_seg, kv_pos = members(kv_seqlen, kv_offsets, b * s, kv_heads * h)
    mask = (q_seg[:, None] == kv_seg[None]) & (q_seg[:, None] > 0)
    mask &= kv_pos[None] <= q_pos[:, None]  # [B*T, B*S]
    qf = q.reshape(b * t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("PKGH,RKH->KGPR", qf, k.reshape(b * s, kv_heads, h))
    scores = jnp.where(mask, scores.astype(jnp.float32) * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * mask.any(-1)[:, None]
    out = jnp.einsum("KGPR,RKH->PKGH", probs.astype(v.dtype), v.reshape(b * s, kv_heads, h))
    return out.reshape(b, t, n, h)
