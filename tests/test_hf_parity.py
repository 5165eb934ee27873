"""Logits equal Hugging Face `transformers.LlamaForCausalLM` (PyTorch, CPU, float32) on the same
random weights: max absolute difference <= 1e-4 (the project's whole-model f32 tolerance)."""

import numpy as np
import pytest
from conftest import hf_logits, hf_model, llamax_params_from

import llamax

TOL = 1e-4

CONFIGS = {
    "mha": llamax.LlamaConfig.preset("tiny-mha"),
    "gqa": llamax.LlamaConfig.preset("tiny"),
    "mqa_ffn_multiplier": llamax.LlamaConfig(
        dim=128,
        n_layers=3,
        n_heads=8,
        n_kv_heads=1,
        vocab_size=320,
        multiple_of=48,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-6,
        max_seq_len=64,
    ),
    "rope_theta": llamax.LlamaConfig(
        dim=96,
        n_layers=2,
        n_heads=3,
        n_kv_heads=3,
        vocab_size=200,
        multiple_of=16,
        rope_theta=500000.0,
        max_seq_len=64,
    ),
}
# Each rotary scaling, run to 3x the context it was "trained" at (32 positions).
SCALINGS = {
    "linear": (32, {"rope_type": "linear", "factor": 4.0}),
    "ntk": (32, {"rope_type": "ntk", "factor": 4.0}),
    "dynamic": (32, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": (128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "llama3": (
        256,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
    ),
}  # fmt: skip
for _name, (_length, _scaling) in SCALINGS.items():
    CONFIGS[f"{_name}_scaling"] = llamax.LlamaConfig.preset(
        "tiny", max_seq_len=_length, rope_scaling=_scaling
    )


def _check(config, tokens, **kwargs):
    hf = hf_model(config)
    params = llamax_params_from(hf, config)
    ours = np.asarray(llamax.Llama(config).apply({"params": params}, tokens, **kwargs))
    return ours, hf


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, rng):
    config = CONFIGS[name]
    # Positions run to 3x the original context for the scaled-rope configs.
    length = 96 if name.endswith("_scaling") else 24
    tokens = rng.integers(0, config.vocab_size, (2, length), dtype=np.int32)
    ours, hf = _check(config, tokens)
    ref = hf_logits(hf, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert ref.std() > 0.3, "weights too small for the comparison to mean anything"
    err = np.abs(ours - ref).max()
    print(f"{name}: max |logits - transformers| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(side, rng):
    """Padding is a segment of its own (id 0); real tokens match HF's attention_mask run."""
    config = CONFIGS["gqa"]
    b, t = 3, 20
    lengths = np.array([20, 13, 6])
    tokens = rng.integers(0, config.vocab_size, (b, t), dtype=np.int32)
    mask = np.zeros((b, t), np.int64)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1 if side == "left" else 0
        mask[i, :n] = 1 if side == "right" else mask[i, :n]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours, hf = _check(config, tokens, positions=positions, segment_ids=mask)
    ref = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    err = np.abs(ours[real] - ref[real]).max()
    print(f"{side} padding: max |logits - transformers| = {err:.2e}")
    assert err <= TOL


def test_packed_documents_equal_separate_runs(rng):
    """Three documents packed in one row give each document's logits as if run alone."""
    config = CONFIGS["mqa_ffn_multiplier"]
    lengths = [7, 12, 5]
    docs = [rng.integers(0, config.vocab_size, (1, n), dtype=np.int32) for n in lengths]
    tokens = np.concatenate(docs, axis=1)
    segment_ids = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)
    ours, hf = _check(config, tokens, positions=positions, segment_ids=segment_ids)
    ref = np.concatenate([hf_logits(hf, d) for d in docs], axis=1)
    err = np.abs(ours - ref).max()
    print(f"packed: max |logits - transformers| = {err:.2e}")
    assert err <= TOL


def test_hf_round_trip_and_bad_state_dict():
    from llamax.convert.hf import params_from_hf, params_to_hf

    config = CONFIGS["gqa"]
    hf = hf_model(config)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf(params_from_hf(state, config), config)
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])

    bad = dict(state)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        params_from_hf(bad, config)
    bad = dict(state, **{"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"model.norm.weight: expected shape \(64,\), got \(3,\)"):
        params_from_hf(bad, config)


def test_hf_config_round_trip():
    from transformers import LlamaConfig as HFConfig

    from llamax.convert.hf import config_from_hf, hf_config

    for config in CONFIGS.values():
        if config.rope_type == "ntk":  # becomes the default type with its base (test_rope.py)
            continue
        hf_dict = HFConfig(**hf_config(config)).to_dict()  # transformers' own serialization
        back = config_from_hf(hf_dict)
        # Hugging Face keeps only the resulting width, not Meta's recipe for it.
        assert back.hidden_dim == config.hidden_dim
        ffn = dict(multiple_of=1, ffn_dim_multiplier=None, ffn_dim=None)
        assert back.replace(**ffn) == config.replace(**ffn)
