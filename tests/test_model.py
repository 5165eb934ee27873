"""Internal consistency of the model: scan vs loop, remat policies, bfloat16 vs float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import llamax
from llamax import rope
from llamax.model import Block, RMSNorm, unstack_layers


@pytest.mark.slow
def test_scan_equals_python_loop_over_layers(rng):
    config = llamax.LlamaConfig.preset("tiny", n_layers=3)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 10), dtype=np.int32)
    segment_ids = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(10), tokens.shape)

    x = params["tok_embeddings"][tokens]
    cos, sin = rope.rotary_angles(positions, config)
    for i in range(config.n_layers):
        layer = jax.tree.map(lambda w, i=i: w[i], params["layers"])
        (x, _), _ = Block(config).apply(
            {"params": layer}, (x, None), cos, sin, segment_ids, segment_ids, 0, None
        )
    x = RMSNorm(config).apply({"params": params["norm"]}, x)
    looped = np.asarray(x @ params["output"])

    scanned = np.asarray(llamax.Llama(config).apply({"params": params}, tokens))
    np.testing.assert_allclose(scanned, looped, atol=1e-5, rtol=0)
    unstacked = llamax.Llama(config, llamax.Execution(scan_layers=False)).apply(
        {"params": unstack_layers(params)}, tokens
    )
    np.testing.assert_allclose(np.asarray(unstacked), looped, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_scan_unroll_changes_nothing_but_speed(rng):
    config = llamax.LlamaConfig.preset("tiny", n_layers=3)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 10), dtype=np.int32)
    rolled = llamax.Llama(config).apply({"params": params}, tokens)
    for unroll in (2, 3):
        unrolled = llamax.Llama(config, llamax.Execution(scan_unroll=unroll)).apply(
            {"params": params}, tokens
        )
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(rolled), atol=1e-5, rtol=0)


def _grad_and_temp_bytes(policy, params, tokens):
    config = llamax.LlamaConfig.preset("tiny", n_layers=4)
    model = llamax.Llama(config, llamax.Execution(remat_policy=policy))

    def loss(p):
        logits = model.apply({"params": p}, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled(params), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_policies_same_gradients_less_memory(rng):
    params = random_params(llamax.LlamaConfig.preset("tiny", n_layers=4))
    tokens = jnp.asarray(rng.integers(0, 256, (4, 256), dtype=np.int32))
    results = {p: _grad_and_temp_bytes(p, params, tokens) for p in llamax.execution.REMAT_POLICIES}
    (ref_loss, ref_grad), _ = results["none"]
    for policy, ((loss, grad), _) in results.items():
        assert abs(float(loss) - float(ref_loss)) <= 1e-6, policy
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=policy)
    temp = {policy: nbytes for policy, (_, nbytes) in results.items()}
    # Saving less means holding less for the backward pass (XLA's own accounting on CPU).
    assert temp["full"] < temp["save_qkv_proj"] < temp["dots"] < temp["none"]
    assert temp["dots_no_batch"] < temp["dots"]


@pytest.mark.slow
@pytest.mark.parametrize("size", [{}, {"n_layers": 4, "dim": 128, "n_heads": 8}])
def test_bfloat16_compute_stays_close_to_float32(size, rng):
    """bfloat16 keeps 8 significant bits: each rounding errs by up to 2^-9 (0.2%) relative, and
    a few layers of matmuls, norms and softmax compound that to about 1.5% of the logits' spread
    on average and 10-15% at the worst of 16k logits (measured on these models). The bounds
    below leave a 2x margin: mean error <= 3% and max <= 25% of the float32 logits' std, and
    next-token distributions within total variation 0.05."""
    config = llamax.LlamaConfig.preset("tiny", **size)
    params = random_params(config, std=config.dim**-0.5)
    tokens = rng.integers(0, config.vocab_size, (4, 64), dtype=np.int32)
    f32 = np.asarray(llamax.Llama(config).apply({"params": params}, tokens))
    bf16_model = llamax.Llama(config, llamax.Execution(dtype="bfloat16"))
    bf16_out = bf16_model.apply({"params": params}, tokens)
    assert bf16_out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    bf16 = np.asarray(bf16_out)
    err = np.abs(bf16 - f32)
    scale = f32.std()
    assert err.max() > 1e-3 * scale, "bfloat16 compute had no effect"
    assert err.mean() <= 0.03 * scale
    assert err.max() <= 0.25 * scale
    p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
    assert 0.5 * np.abs(p32 - p16).sum(-1).max() <= 0.05


def test_bfloat16_parameters():
    config = llamax.LlamaConfig.preset("tiny")
    model = llamax.Llama(config, llamax.Execution(dtype="bfloat16", param_dtype="bfloat16"))
    params = llamax.model.init_params(model, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    logits = model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_attention_never_crosses_segments(rng):
    """Changing one document's tokens leaves another document's logits untouched."""
    config = llamax.LlamaConfig.preset("tiny")
    model, params = llamax.Llama(config), random_params(config)
    tokens = rng.integers(0, config.vocab_size, (1, 16), dtype=np.int32)
    segment_ids = np.array([[1] * 6 + [2] * 10])
    positions = np.array([list(range(6)) + list(range(10))])
    changed = tokens.copy()
    changed[0, :6] = (changed[0, :6] + 1) % config.vocab_size
    a = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
    b = model.apply({"params": params}, changed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_array_equal(np.asarray(a)[0, 6:], np.asarray(b)[0, 6:])
    assert np.abs(np.asarray(a)[0, :6] - np.asarray(b)[0, :6]).max() > 1e-2


@pytest.mark.parametrize("chunk", [0, 3, 4, 512])
def test_chunked_cross_entropy_equals_that_of_the_whole_logits(chunk, rng):
    """With targets the model returns each position's cross-entropy and log Z from its output
    projection run over chunks of positions, with a backward pass of its own; the values and
    every parameter's gradient equal those of the whole logits differentiated by jax (10
    positions: chunks of 3 and 4 leave a padded last chunk; 0 and 512: one chunk)."""
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (3, 10), dtype=np.int32)
    targets = rng.integers(0, config.vocab_size, (3, 10), dtype=np.int32)
    w_nll, w_log_z = rng.normal(size=(2, 3, 10)).astype(np.float32)
    chunked = llamax.Llama(config, llamax.Execution(loss_chunk_len=chunk))

    def whole_loss(p):
        logits = llamax.Llama(config).apply({"params": p}, tokens)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(w_nll * nll + w_log_z * log_z), (nll, log_z)

    def chunked_loss(p):
        nll, log_z = chunked.apply({"params": p}, tokens, targets=targets)
        return jnp.sum(w_nll * nll + w_log_z * log_z), (nll, log_z)

    (_, want), want_grads = jax.value_and_grad(whole_loss, has_aux=True)(params)
    (_, got), grads = jax.value_and_grad(chunked_loss, has_aux=True)(params)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3, 10)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        w = _at(want_grads, path)
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_chunked_cross_entropy_in_bfloat16_stays_close(rng):
    """In bfloat16 the chunks' logits come out of the matmul in float32 and the output
    projection's gradient sums in float32: the loss and that gradient stay within bfloat16's
    precision of float32's."""
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 16), dtype=np.int32)
    targets = rng.integers(0, config.vocab_size, (2, 16), dtype=np.int32)

    def loss(execution):
        def f(p):
            nll, _ = llamax.Llama(config, execution).apply({"params": p}, tokens, targets=targets)
            return nll.mean()

        return jax.value_and_grad(f)(params)

    want, want_grads = loss(llamax.Execution())
    got, grads = loss(llamax.Execution(dtype="bfloat16", loss_chunk_len=4))
    np.testing.assert_allclose(float(got), float(want), rtol=2e-2)
    w, g = np.asarray(want_grads["output"]), np.asarray(grads["output"])
    assert np.linalg.norm(g - w) < 0.05 * np.linalg.norm(w)


def test_targets_exclude_a_cache_and_a_score_head():
    config = llamax.LlamaConfig.preset("tiny")
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = llamax.Llama(config)
    params = model.init(jax.random.key(0), tokens)
    cache = llamax.model.init_cache(config, 1, 8)
    with pytest.raises(ValueError, match="targets .* or a cache"):
        model.apply(params, tokens, cache=cache, targets=tokens)
    scorer = llamax.Llama(config.replace(head="score"))
    with pytest.raises(ValueError, match="score head"):
        scorer.apply(scorer.init(jax.random.key(0), tokens), tokens, targets=tokens)
