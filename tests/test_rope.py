"""Rotary scalings equal transformers' rope functions; angles stay float32 at long positions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import llamax
from llamax import rope
from llamax.convert import meta
from llamax.convert.hf import config_from_hf, hf_config

# Llama 2's head width (128) and context (4096).
BASE = llamax.LlamaConfig(dim=512, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=4096)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "linear_old_key": {"type": "linear", "factor": 2.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "yarn_all_options": {
        "rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2, "mscale": 0.707,
        "mscale_all_dim": 1.0, "truncate": False, "original_max_position_embeddings": 2048,
    },
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.9},
    "llama3": dict(meta.LLAMA3_SCALING),
}  # fmt: skip


def hf_frequencies(config, seq_len=None):
    hf = HFConfig(**hf_config(config))
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":  # also what llamax's ntk becomes in a Hugging Face config
        inv, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        length = None if seq_len is None else torch.tensor(seq_len)
        inv, scale = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=length)
    return inv.numpy(), scale


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [None, 1000, 4096, 3 * 4096 + 5])
def test_frequencies_equal_transformers(name, seq_len):
    config = BASE.replace(rope_scaling=SCALINGS[name])
    ours, scale = rope.inv_frequencies(config, seq_len)
    want, want_scale = hf_frequencies(config, seq_len)
    np.testing.assert_allclose(np.asarray(ours), want, rtol=2e-6, atol=0)
    assert math.isclose(scale, want_scale, rel_tol=1e-9)


def test_scalings_do_what_they_say():
    """Independent of transformers: the formulas' defining properties."""
    base, _ = rope.inv_frequencies(BASE)
    linear, _ = rope.inv_frequencies(BASE.replace(rope_scaling=SCALINGS["linear"]))
    np.testing.assert_allclose(linear, base / 4, rtol=1e-6)
    # NTK-aware: the highest frequency kept, the lowest divided by the factor.
    ntk, _ = rope.inv_frequencies(BASE.replace(rope_scaling=SCALINGS["ntk"]))
    assert ntk[0] == base[0] and math.isclose(ntk[-1], base[-1] / 4, rel_tol=1e-5)
    # Dynamic NTK: no change within the original context, the NTK base at factor 4 at 4x.
    dynamic = BASE.replace(rope_scaling=SCALINGS["dynamic"])
    np.testing.assert_allclose(rope.inv_frequencies(dynamic, 4096)[0], base, rtol=1e-6)
    # At L = 4 L0 the effective factor is 4 * 4 - (4 - 1) = 13.
    ntk13, _ = rope.inv_frequencies(BASE.replace(rope_scaling={"rope_type": "ntk", "factor": 13}))
    np.testing.assert_allclose(rope.inv_frequencies(dynamic, 4 * 4096)[0], ntk13, rtol=1e-5)
    # YaRN: high frequencies kept, low ones interpolated, temperature 0.1 ln(4) + 1 on cos/sin.
    yarn, scale = rope.inv_frequencies(BASE.replace(rope_scaling=SCALINGS["yarn"]))
    assert yarn[0] == base[0] and math.isclose(yarn[-1], base[-1] / 4, rel_tol=1e-6)
    assert math.isclose(scale, 0.1 * math.log(4) + 1)
    # Llama 3.1: wavelengths over 8192 tokens divided by 8, under 2048 kept.
    llama3, _ = rope.inv_frequencies(BASE.replace(rope_scaling=SCALINGS["llama3"]))
    wavelength = 2 * np.pi / base
    np.testing.assert_allclose(llama3[wavelength > 8192], base[wavelength > 8192] / 8, rtol=1e-6)
    np.testing.assert_array_equal(llama3[wavelength < 2048], base[wavelength < 2048])


def test_angles_stay_float32_at_long_positions():
    """Positions up to 64k: cos and sin are float32 (whatever the compute dtype, which
    `rotary_angles` never sees), within float32 rounding of the exact (float64) angles, and no
    further from them than transformers' are."""
    config = BASE.replace(max_seq_len=32768)
    positions = np.arange(0, 65536, 7, dtype=np.int32)[None]
    cos, sin = rope.rotary_angles(jnp.asarray(positions), config)
    assert cos.dtype == jnp.float32
    exact = positions[0, :, None] * (1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128))
    hf = LlamaRotaryEmbedding(HFConfig(**hf_config(config)))
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
    for ours, theirs, f in ((cos, hf_cos, np.cos), (sin, hf_sin, np.sin)):
        err = np.abs(np.asarray(ours[0]) - f(exact)).max()
        hf_err = np.abs(theirs[0, :, :64].numpy() - f(exact)).max()
        print(f"max error at positions < 65536: llamax {err:.1e}, transformers {hf_err:.1e}")
        # A float32 product of a position < 2^16 and a frequency <= 1 is within 2^-8 of exact.
        assert err <= 2**-8 and err <= hf_err


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "yarn"}, r"needs \['factor'\]"),
        ({"rope_type": "yarn", "factor": 4, "beta": 3}, r"Unknown rope_scaling key\(s\)"),
        ({"rope_type": "llama3", "factor": 8}, "needs .*high_freq_factor"),
        ({"rope_type": "dynamic", "factor": -1}, "positive factor"),
        ({"rope_type": "longrope", "factor": 2}, "must be one of"),
    ],
)
def test_bad_scalings_are_refused(scaling, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(rope_scaling=scaling)


def test_meta_params_carry_the_scaling():
    config = BASE.replace(rope_scaling=SCALINGS["yarn"])
    assert meta.config_from_params(meta.params_json(config), vocab_size=64) == config
    llama31 = {**meta.params_json(BASE), "use_scaled_rope": True}
    assert meta.config_from_params(llama31, vocab_size=64).rope_type == "llama3"


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_hugging_face_config_carries_the_scaling(name):
    """llamax -> transformers' own config.json (what the converter writes) -> llamax."""
    config = BASE.replace(rope_scaling=SCALINGS[name])
    back = config_from_hf(HFConfig(**hf_config(config)).to_dict())
    if name == "ntk":  # written as the default rotary embedding with the NTK base
        assert back.rope_type == "default"
        np.testing.assert_allclose(rope.inv_frequencies(back)[0], rope.inv_frequencies(config)[0])
    else:
        assert back.rope_type == config.rope_type
        np.testing.assert_array_equal(
            rope.inv_frequencies(back)[0], rope.inv_frequencies(config)[0]
        )
