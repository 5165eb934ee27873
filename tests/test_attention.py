"""The chunked (memory-lean) attention equals the reference, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import llamax
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


def test_model_with_chunked_attention_and_cache(rng):
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 40), dtype=np.int32)
    ref = llamax.Llama(config).apply({"params": params}, tokens)
    chunked = config.replace(attention="chunked", attention_chunk=16)
    got = llamax.Llama(chunked).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # Prefill through a cache (queries offset into the cache's slots).
    cache = llamax.model.init_cache(chunked, 2, 48)
    _, cache = llamax.Llama(chunked).apply({"params": params}, tokens[:, :8], cache=cache)
    rest, _ = llamax.Llama(chunked).apply({"params": params}, tokens[:, 8:], cache=cache)
    np.testing.assert_allclose(rest, ref[:, 8:], atol=1e-5)
