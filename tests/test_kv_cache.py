"""Incremental decoding with the KV cache gives the logits of the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import llamax
from llamax.model import init_cache, unstack_layers

TOL = 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_token_by_token_equals_full_forward(rng, scan_layers):
    """Both layouts: scanned layers with a stacked cache, and the per-layer loop (separate
    weights and caches) that generation uses."""
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (2, 12), dtype=np.int32)
    full = np.asarray(llamax.Llama(config).apply({"params": params}, tokens))

    model = llamax.Llama(config, llamax.Execution(scan_layers=scan_layers))
    if not scan_layers:
        params = unstack_layers(params)
        assert sorted(params) == ["layers_0", "layers_1", "norm", "output", "tok_embeddings"]
    step = jax.jit(lambda p, tok, cache: model.apply({"params": p}, tok, cache=cache))
    cache = init_cache(config, batch_size=2, max_len=16, stacked=scan_layers)
    for t in range(tokens.shape[1]):
        logits, cache = step(params, tokens[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=TOL, rtol=0)
    assert int(cache["index"]) == tokens.shape[1]


@pytest.mark.slow
def test_prefill_then_decode_with_left_padding(rng):
    """A batch of prompts of different lengths, left-padded (segment 0), prefilled in one call
    and continued token by token, matches each sequence run alone without padding."""
    config = llamax.LlamaConfig.preset("tiny", n_layers=3)
    model, params = llamax.Llama(config), random_params(config, seed=3)
    lengths, prompt_len, new = [9, 4], 9, 5
    seqs = [rng.integers(0, config.vocab_size, n + new, dtype=np.int32) for n in lengths]

    tokens = np.zeros((2, prompt_len), np.int32)
    segment_ids = np.zeros((2, prompt_len), np.int32)
    positions = np.zeros((2, prompt_len), np.int32)
    for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        tokens[i, prompt_len - n :] = seq[:n]
        segment_ids[i, prompt_len - n :] = 1
        positions[i, prompt_len - n :] = np.arange(n)

    # One compile for the prefill, one for every decode step.
    step = jax.jit(lambda p, t, pos, seg, cache: model.apply(
        {"params": p}, t, positions=pos, segment_ids=seg, cache=cache))  # fmt: skip
    cache = init_cache(config, batch_size=2, max_len=prompt_len + new)
    logits, cache = step(params, tokens, positions, segment_ids, cache)
    got = [[logits[i, -1]] for i in range(2)]
    for t in range(new - 1):
        step_tokens = np.array([[seqs[i][lengths[i] + t]] for i in range(2)], np.int32)
        step_pos = np.array([[lengths[i] + t] for i in range(2)], np.int32)
        logits, cache = step(params, step_tokens, step_pos, np.ones((2, 1), np.int32), cache)
        for i in range(2):
            got[i].append(logits[i, 0])

    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for i, n in enumerate(lengths):
        alone = np.asarray(forward(params, seqs[i][None, : n + new - 1]))[0]
        np.testing.assert_allclose(np.stack(got[i]), alone[n - 1 :], atol=TOL, rtol=0)


def test_cache_dtype_and_shapes():
    config = llamax.LlamaConfig.preset("tiny")
    cache = init_cache(config, batch_size=3, max_len=7, dtype="bfloat16")
    assert cache["k"].shape == (2, 3, 7, 2, 16) and cache["k"].dtype == jnp.bfloat16
    assert cache["segment_ids"].shape == (3, 7) and int(cache["index"]) == 0
    assert init_cache(config, batch_size=3, max_len=7)["v"].dtype == jnp.float32
    per_layer = init_cache(config, batch_size=3, max_len=7, stacked=False)
    assert len(per_layer["v"]) == 2 and per_layer["v"][1].shape == (3, 7, 2, 16)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_one_index_per_row_decodes_each_row_at_its_own_length(rng, scan_layers):
    """A cache with one write index per row (the inference engine's decode slots): rows
    filled with prompts of different lengths, each continued a token at a time at its own
    position, give each sequence's full-forward logits. The slots after a row's index hold
    stale keys and values (another prompt's), hidden by their segment id 0 alone."""
    config = llamax.LlamaConfig.preset("tiny")
    params = random_params(config, seed=5)
    full_model = llamax.Llama(config)
    model = llamax.Llama(config, llamax.Execution(scan_layers=scan_layers))
    run_params = params if scan_layers else unstack_layers(params)
    lengths, new, slots = [3, 9, 5], 4, 16
    seqs = [rng.integers(0, config.vocab_size, n + new, dtype=np.int32) for n in lengths]

    def rows(cache, i, part):  # cache with row i's keys and values set to part's row 0
        def put(whole, one):
            return whole.at[:, i].set(one[:, 0]) if scan_layers else whole.at[i].set(one[0])

        if scan_layers:
            return {name: put(cache[name], part[name]) for name in ("k", "v")}
        return {name: tuple(put(w, p) for w, p in zip(cache[name], part[name], strict=True))
                for name in ("k", "v")}  # fmt: skip

    step = jax.jit(lambda p, tok, cache: model.apply({"params": p}, tok, cache=cache))
    cache = init_cache(config, 3, slots, stacked=scan_layers, per_row=True)
    assert cache["index"].shape == (3,)
    stale = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), cache)
    cache = {**cache, "k": stale["k"], "v": stale["v"]}
    for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        one = init_cache(config, 1, slots, stacked=scan_layers)
        _, one = step(run_params, seq[None, :n], one)
        cache = {**cache, **rows(cache, i, one)}
        cache["segment_ids"] = cache["segment_ids"].at[i].set(one["segment_ids"][0])
        cache["index"] = cache["index"].at[i].set(n)

    alone = [full_model.apply({"params": params}, seq[None])[0] for seq in seqs]
    for t in range(new):
        tokens = np.array([[seq[n + t]] for seq, n in zip(seqs, lengths, strict=True)])
        logits, cache = step(run_params, tokens, cache)
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(logits[i, 0], alone[i][n + t], atol=TOL, rtol=0)
    assert cache["index"].tolist() == [n + new for n in lengths]

    with pytest.raises(ValueError, match="one index per row takes one token per row a call"):
        model.apply({"params": run_params}, np.zeros((3, 2), np.int32), cache=cache)
