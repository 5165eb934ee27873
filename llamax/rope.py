"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) in the half-split layout, with
the context-extension scalings.

Meta's reference rotates interleaved pairs (x0, x1), (x2, x3), ... as complex numbers; llamax,
like Hugging Face and MaxText, rotates the pairs (x_i, x_{i + H/2}). The two agree once the rows
of wq and wk are permuted per head, which the Meta converter does.

`LlamaConfig.rope_scaling` selects a scaling in Hugging Face's dict form (`config.json`), and
each computes what `transformers`' rope function of the same name does (tests/test_rope.py):

- `linear`: position interpolation (Chen et al. 2023, arXiv:2306.15595): every frequency is
  divided by `factor`, which is the same as dividing the positions by it.
- `ntk`: static NTK-aware scaling (bloc97, 2023): the base becomes
  `theta * factor ** (H / (H - 2))`, so the highest frequency is kept and the lowest divided by
  `factor`. transformers has no type of this name; it is the default rotary embedding with that
  base, which is how the converter writes it for Hugging Face.
- `dynamic`: dynamic NTK (emozilla, 2023): the `ntk` base with a factor that grows with the
  sequence, `factor * L / L0 - (factor - 1)` for a sequence of L > L0 = `max_seq_len` tokens
  (L is the largest position in the call, plus one); shorter sequences are not scaled.
- `yarn`: YaRN (Peng et al. 2023, arXiv:2309.00071): interpolation for the low frequencies,
  none for the high ones, a linear ramp between (`beta_fast`, `beta_slow`), and an attention
  temperature that multiplies cos and sin (`attention_factor`, by default 0.1 ln(factor) + 1).
- `llama3`: Llama 3.1's scaling: wavelengths beyond `original_max_position_embeddings /
  low_freq_factor` divided by `factor`, those under `.. / high_freq_factor` kept, smoothed in
  between.

Frequencies are computed in float64 and rounded once to float32; angles are position x
frequency in float32 whatever the compute dtype (integer positions are exact in float32 up to
2^24), as in `transformers`; only the bounded cos and sin are rounded to the compute dtype.

Shapes: B batch, T length, N heads, H head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llamax.config import LlamaConfig


def _base_frequencies(theta, h: int):
    """theta ** -(2i / H) for i < H/2: computed in float64, rounded once to float32 (float32
    arithmetic, as in transformers, can be 1 ulp off, which is 0.002 rad at position 64k)."""
    return (1.0 / float(theta) ** (np.arange(0, h, 2, dtype=np.float64) / h)).astype(np.float32)


def _yarn(c: LlamaConfig, s) -> tuple[np.ndarray, float]:
    h, theta, factor = c.head_dim, c.rope_theta, float(s["factor"])
    original = s.get("original_max_position_embeddings") or c.max_seq_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension that turns `rotations` times in `original`
        return h * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, h - 1)
    if low == high:
        high += 0.001  # no division by zero
    extrapolated = _base_frequencies(theta, h).astype(np.float64)
    ramp = np.clip((np.arange(h // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the high frequencies, not interpolated
    inv_freq = extrapolated / factor * (1 - keep) + extrapolated * keep
    return inv_freq.astype(np.float32), float(attention)


def _llama3(c: LlamaConfig, s) -> np.ndarray:
    inv_freq = _base_frequencies(c.rope_theta, c.head_dim).astype(np.float64)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s.get("original_max_position_embeddings") or c.max_seq_len
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def ntk_theta(theta: float, factor, h: int):
    """The rotary base of NTK-aware scaling by `factor` (a number or a traced scalar)."""
    return theta * factor ** (h / (h - 2))


def inv_frequencies(config: LlamaConfig, seq_len=None):
    """(frequencies float32 [H/2], attention scaling of cos and sin).

    `seq_len` matters only to `dynamic`: the length the frequencies are for (at least
    `max_seq_len`); it may be a traced scalar, and the frequencies then are too."""
    c, s, kind = config, config.rope_scaling, config.rope_type
    if kind == "default":
        return _base_frequencies(c.rope_theta, c.head_dim), 1.0
    if kind == "linear":
        return _base_frequencies(c.rope_theta, c.head_dim) / np.float32(s["factor"]), 1.0
    if kind == "ntk":
        return _base_frequencies(ntk_theta(c.rope_theta, s["factor"], c.head_dim), c.head_dim), 1.0
    if kind == "yarn":
        return _yarn(c, s)
    if kind == "llama3":
        return _llama3(c, s), 1.0
    if kind == "dynamic":
        if seq_len is None:
            seq_len = c.max_seq_len
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), c.max_seq_len)
        factor = s["factor"] * length / c.max_seq_len - (s["factor"] - 1)
        theta = ntk_theta(c.rope_theta, factor, c.head_dim)
        exponent = jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim
        return (1.0 / theta**exponent).astype(jnp.float32), 1.0
    raise ValueError(f"Unknown rope_scaling type {kind!r}")


def rotary_angles(positions: jnp.ndarray, config: LlamaConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of position x frequency (times the attention scaling), float32 [B, T, H/2],
    for integer positions [B, T]."""
    seq_len = jnp.max(positions) + 1 if config.rope_type == "dynamic" else None
    inv_freq, scale = inv_frequencies(config, seq_len)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, N, H] by the angles whose cos and sin are [B, T, H/2], in x's dtype.

    The angles themselves are computed in float32 (`rotary_angles`); only their bounded cos
    and sin are rounded to x's dtype, as in Hugging Face's reference."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
