"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) in the half-split layout.

Meta's reference rotates interleaved pairs (x0, x1), (x2, x3), ... as complex numbers; llamax,
like Hugging Face and MaxText, rotates the pairs (x_i, x_{i + H/2}). The two agree once the rows
of wq and wk are permuted per head, which the Meta converter does.

Position interpolation (Chen et al. 2023, arXiv:2306.15595) is the `linear` scaling: positions
are divided by `factor`, which is the same as dividing every frequency by it.

Shapes: B batch, T length, N heads, H head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from llamax.config import LlamaConfig


def inv_frequencies(config: LlamaConfig) -> np.ndarray:
    """Angular frequency of each of the H/2 rotated pairs, float32 [H/2]."""
    h = config.head_dim
    # float32 arithmetic throughout, as Meta's and Hugging Face's references do it.
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_scaling["factor"])
    return inv_freq.astype(np.float32)


def rotary_angles(positions: jnp.ndarray, config: LlamaConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of position * frequency, float32 [B, T, H/2], for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, N, H] by the angles whose cos and sin are [B, T, H/2], in x's dtype.

    The angles themselves are computed in float32 (`rotary_angles`); only their bounded cos
    and sin are rounded to x's dtype, as in Hugging Face's reference."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
