"""The chunked (memory-lean) attention equals the reference, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import llamax
from llamax import attention
from llamax.attention import attend


@pytest.mark.parametrize("t, chunk", [(24, 8), (30, 8), (16, 16)])
def test_chunked_equals_xla(t, chunk, rng):
    """Grouped-query heads, three packed documents with padding, T not a multiple of chunk."""
    b, n, k, h = 2, 4, 2, 8
    q, key, value = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    segments = np.ones((b, t), np.int32)
    segments[0, t // 3 :] = 2
    segments[0, 2 * t // 3 :] = 3
    segments[1, t - 5 :] = 0  # right padding
    segments = jnp.asarray(segments)

    def loss(backend, q, key, value):
        out = attend(q, key, value, segments, segments, 0, backend, chunk)
        return jnp.sum(jnp.sin(out)), out

    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        "xla", q, key, value
    )
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        "chunked", q, key, value
    )
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.slow
def test_model_with_chunked_attention_and_cache(rng):
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 40), dtype=np.int32)
    ref = jax.jit(lambda p, t: llamax.Llama(config).apply({"params": p}, t))(params, tokens)
    chunked = llamax.Llama(config, llamax.Execution(attention="chunked", attention_block_q=16))
    forward = jax.jit(lambda p, t, cache=None: chunked.apply({"params": p}, t, cache=cache))
    got = forward(params, tokens)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # Prefill through a cache (queries offset into the cache's slots).
    cache = llamax.model.init_cache(config, 2, 48)
    _, cache = forward(params, tokens[:, :8], cache)
    rest, _ = forward(params, tokens[:, 8:], cache)
    np.testing.assert_allclose(rest, ref[:, 8:], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_fused_backends_equal_xla(backend, packed, rng):
    """splash (Pallas, interpret mode off TPU) and cudnn (jax.nn.dot_product_attention),
    grouped-query heads, forward and gradient, with and without packed documents."""
    b, t, n, k, h = 2, 256, 4, 2, 64
    q, key, value = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    segments = np.ones((b, t), np.int32)
    if packed:
        segments[0, 100:] = 2
        segments[1, 37:] = 2
        segments[1, 200:] = 0  # padding
    segments = jnp.asarray(segments)

    def loss(backend, q, key, value):
        out = attend(q, key, value, segments, segments, 0, backend, 128, 128)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, ref), ref_grads = grad("xla", q, key, value)
    (_, got), got_grads = grad(backend, q, key, value)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-4)


@pytest.mark.slow
def test_splash_sharded_model_equals_xla(rng):
    """Under a data x fsdp x tensor mesh the splash kernel runs per device (shard_map)."""
    config = llamax.LlamaConfig.preset("tiny", n_layers=1)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (4, 256), dtype=np.int32)
    ref = jax.jit(lambda p, t: llamax.Llama(config).apply({"params": p}, t))(params, tokens)
    run = llamax.Execution(attention="splash", attention_block_q=128, attention_block_kv=128)
    splash = llamax.Llama(config, run)
    mesh = llamax.sharding.make_mesh(data=2, fsdp=2, tensor=2)
    forward = jax.jit(lambda p, t: splash.apply({"params": p}, t))
    with llamax.sharding.use_mesh(mesh):
        got = forward(params, tokens)
        program = str(jax.make_jaxpr(forward)(params, tokens))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert "pallas_call" in program and "shard_map" in program  # the kernel ran, per device


def test_splash_needs_whole_blocks():
    q = jnp.zeros((1, 192, 2, 8))
    segments = jnp.ones((1, 192), jnp.int32)
    with pytest.raises(ValueError, match="192 is not a multiple of block_q 128"):
        attend(q, q, q, segments, segments, 0, "splash", 128, 128)
    with pytest.raises(ValueError, match="block_kv a multiple of 128"):
        attend(q, q, q, segments, segments, 0, "splash", 64, 64)
    with pytest.raises(ValueError, match="block_kv a multiple of 128"):
        llamax.Execution(attention="splash", attention_block_kv=64)


@pytest.mark.parametrize(
    "platform, t, dtype, expected",
    [("tpu", 256, jnp.float32, "splash"), ("tpu", 200, jnp.float32, "xla"),
     ("gpu", 256, jnp.bfloat16, "cudnn"), ("gpu", 256, jnp.float32, "xla"),
     ("cpu", 256, jnp.bfloat16, "xla"),
     # Long inputs no fused kernel takes: chunked on an accelerator, never the full scores.
     ("gpu", 2048, jnp.float32, "chunked"), ("tpu", 1000, jnp.float32, "chunked"),
     ("cpu", 2048, jnp.float32, "xla")],
)  # fmt: skip
def test_auto_picks_the_platforms_kernel_where_it_applies(platform, t, dtype, expected):
    q = jnp.zeros((1, t, 4, 64), dtype)
    one = jnp.zeros((1, 1, 4, 64), dtype)
    with attention.compiling_for(platform):
        assert attention.resolve_backend("auto", q, q, True, 512, 512) == expected
        # A cached decode step (one query offset into the cache) takes the reference.
        assert attention.resolve_backend("auto", one, q, False, 512, 512) == "xla"
    assert attention.resolve_backend("chunked", q, q, True, 512, 512) == "chunked"


def test_auto_runs_the_reference_on_cpu(rng):
    config = llamax.LlamaConfig.preset("tiny", n_layers=1)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 16), dtype=np.int32)
    ref = llamax.Llama(config).apply({"params": params}, tokens)
    auto = llamax.Llama(config, llamax.Execution(attention="auto"))
    np.testing.assert_array_equal(auto.apply({"params": params}, tokens), ref)


def _packed_rows(b, t):
    """Rows of several documents each, with right padding (segment 0) on some."""
    segments = np.ones((b, t), np.int32)
    segments[0, 5:] = 2
    segments[0, 9:] = 3
    segments[0, 20:] = 0
    segments[1, 1:] = 2  # a one-token document
    segments[1, 2:] = 7
    if b > 2:
        segments[2, :] = 4  # one document filling the row
    return jnp.asarray(segments)


def test_segment_runs_are_jax_packed_layout():
    """Lengths [B, M] and start slots [B, M + 1], -1 past each row's last document, as
    `fused_attention_stablehlo.dot_product_attention` documents its packed layout."""
    lengths, starts, count = attention.segment_runs(_packed_rows(3, 24), 5)
    np.testing.assert_array_equal(
        lengths, [[5, 4, 11, 4, -1], [1, 1, 22, -1, -1], [24, -1, -1, -1, -1]]
    )
    np.testing.assert_array_equal(
        starts, [[0, 5, 9, 20, -1, -1], [0, 1, 2, -1, -1, -1], [0, -1, -1, -1, -1, -1]]
    )
    np.testing.assert_array_equal(count, [4, 3, 1])
    _, starts, count = attention.segment_runs(_packed_rows(3, 24), 3)  # row 0 does not fit
    assert count[0] == 4 and starts[0, 3] == -1


@pytest.mark.parametrize("max_segments", [32, 3])  # 3: row 0 has 4 documents, a dense mask
@pytest.mark.parametrize("with_segments", [True, False])
def test_cudnn_packed_layout_equals_xla(max_segments, with_segments, rng):
    """The cudnn backend without a dense mask, through jax's own offset arithmetic and a
    reader of the offsets as cuDNN reads them: grouped-query heads (8 over 2) and several
    documents per row, the case where jax <= 0.11.0 reads the wrong keys."""
    b, t, n, k, h = 3, 24, 8, 2, 16
    q, key, value = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    segments = _packed_rows(b, t) if with_segments else None

    def loss(backend, q, key, value):
        out = attend(q, key, value, segments, segments, 0, backend, max_segments=max_segments)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (_, ref), ref_grads = grad("xla", q, key, value)
    (_, got), got_grads = grad("cudnn", q, key, value)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-4)


def test_repeated_kv_heads_exactly_when_jax_scales_key_offsets_wrongly(rng):
    """`_kv_offsets_follow_kv_heads` says whether k and v may keep their 2 heads under 8 query
    heads: fed unrepeated to the offset reader, they give the reference's output exactly when
    it says so, and wrong keys otherwise."""
    b, t, n, k, h = 2, 24, 8, 2, 16
    q, key, value = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    segments = _packed_rows(b, t)
    lengths, starts, _ = attention.segment_runs(segments, 8)
    args = (lengths, lengths, starts, starts, h**-0.5)
    ref = attend(q, key, value, segments, segments, 0, "xla")
    unrepeated = attention._packed_reference(q, key, value, *args)
    close = np.allclose(unrepeated, ref, atol=2e-5)
    assert close == attention._kv_offsets_follow_kv_heads()
    repeated = [jnp.repeat(x, n // k, axis=2) for x in (key, value)]
    np.testing.assert_allclose(attention._packed_reference(q, *repeated, *args), ref, atol=2e-5)


def test_model_with_cudnn_packed_equals_xla(rng):
    config = llamax.LlamaConfig.preset("tiny", n_layers=2)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (3, 24), dtype=np.int32)
    segments = _packed_rows(3, 24)
    xla = llamax.Llama(config, llamax.Execution(attention="xla"))
    cudnn = llamax.Llama(config, llamax.Execution(attention="cudnn"))
    for seg in (segments, None):
        ref = xla.apply({"params": params}, tokens, segment_ids=seg)
        got = cudnn.apply({"params": params}, tokens, segment_ids=seg)
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow
def test_cudnn_packed_sharded_model_equals_xla(rng):
    """Under a data x fsdp x tensor mesh: the layout rows split with the batch, the repeated
    k and v with the heads."""
    config = llamax.LlamaConfig.preset("tiny", n_layers=1)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (4, 24), dtype=np.int32)
    segments = jnp.concatenate([_packed_rows(3, 24), _packed_rows(3, 24)[:1]])
    ref = llamax.Llama(config).apply({"params": params}, tokens, segment_ids=segments)
    cudnn = llamax.Llama(config, llamax.Execution(attention="cudnn"))
    forward = jax.jit(lambda p, t, s: cudnn.apply({"params": p}, t, segment_ids=s))
    with llamax.sharding.use_mesh(llamax.sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        got = forward(params, tokens, segments)
    np.testing.assert_allclose(got, ref, atol=1e-4)
