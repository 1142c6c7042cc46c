"""2D axial rotary position embeddings (RoPE) for the image tower.

Why: a learned or sin-cos position embedding is added once, at the input, and is absolute;
rotary embeddings rotate each attention layer's queries and keys by angles proportional to the
token's position, so a query-key logit depends only on the *difference* of their positions
(Su et al. 2021). For images, the axial 2D form (RoPE-ViT, Heo et al. 2024; Perception
Encoder, Bolya et al. 2025) rotates half of each head's dimensions with the patch column and
half with the patch row. It has no parameters, so a tower runs at another patch grid with
its positions recomputed: nothing to resample.

Layout, as Perception Encoder's ``Rope2D`` (``perception_models``, built on
``rotary_embedding_torch``):

* a head of ``K`` dims is ``K / 2`` adjacent pairs ``(x[2j], x[2j+1])``, each rotated by one
  angle; pairs ``0 .. K/4 - 1`` turn with the column, pairs ``K/4 .. K/2 - 1`` with the row;
* frequencies ``f_i = theta ** (-4 i / K)`` for ``i < K/4`` (``theta`` = 10,000 in PE; the
  same on both axes), angle = position * ``f_i``; so ``K`` must be divisible by 4;
* positions are integer patch indices (row, column) of the full grid; with a class token
  (``pool='tok'``) the class token sits at (0, 0), i.e. it is not rotated, and the patches at
  (row + 1, column + 1), as PE does; without one the patches are at (row, column).

``rotary_table`` turns per-token positions [B|1, L, 2] into the (cos, sin) pair [B|1, L, K/2]
that ``apply_rotary`` (called by ``transformer.Attention`` on q and k) uses: the positions, not
a full grid, are what patch dropout keeps (each kept token keeps its grid position).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.errors import ConfigError

ROPES = ("none", "2d")


def check_rope(rope: str, head_dim: int, theta: float) -> None:
    """Fails in one sentence when ``rope`` is unknown or cannot apply to ``head_dim``."""
    if rope not in ROPES:
        raise ConfigError(f"image rope={rope!r} is unknown; use one of {ROPES}.")
    if rope == "none":
        return
    if head_dim % 4:
        raise ConfigError(f"rope='2d' needs a head dimension (width / num_heads) divisible by 4 "
                          f"(a quarter of it per axis, in pairs), got {head_dim}; change width or "
                          "num_heads.")
    if not theta > 1.0:
        raise ConfigError(f"rope_theta={theta} must be greater than 1 (Perception Encoder uses "
                          "10000).")


def axial_frequencies(head_dim: int, theta: float = 10_000.0) -> np.ndarray:
    """The ``head_dim / 4`` frequencies ``theta ** (-4 i / head_dim)`` of one axis (float64)."""
    return 1.0 / theta ** (np.arange(0, head_dim // 4) * 4.0 / head_dim)


def grid_positions(grid: tuple[int, int], class_token: bool) -> np.ndarray:
    """[(1 +) h*w, 2] int32 (row, column) of every token of a ``grid`` in the ViT's order
    (row-major patches; the class token first at (0, 0) and the patches shifted by one)."""
    rows, cols = np.mgrid[:grid[0], :grid[1]]
    positions = np.stack([rows.ravel(), cols.ravel()], axis=-1) + int(class_token)
    if class_token:
        positions = np.concatenate([np.zeros((1, 2), positions.dtype), positions])
    return positions.astype(np.int32)


def rotary_table(positions_bl2, head_dim: int, theta: float = 10_000.0
                 ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [B|1, L, head_dim / 2] float32, of tokens at ``positions`` [B|1, L, 2]
    (row, column): column angles in the first half of the pairs, row angles in the second."""
    freqs = jnp.asarray(axial_frequencies(head_dim, theta), jnp.float32)
    positions = jnp.asarray(positions_bl2).astype(jnp.float32)
    angles_blp = jnp.concatenate([positions[..., 1:2] * freqs, positions[..., 0:1] * freqs],
                                 axis=-1)
    return jnp.cos(angles_blp), jnp.sin(angles_blp)


def apply_rotary(x_blhk: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``x`` [B, L, H, K] with each adjacent pair of every head rotated by its angle
    (``rotary`` = (cos, sin) [B|1, L, K/2], shared by the heads), computed in float32 and
    returned in ``x``'s dtype."""
    cos_bl1p, sin_bl1p = (t[:, :, None, :] for t in rotary)
    pairs = x_blhk.astype(jnp.float32).reshape(*x_blhk.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos_bl1p - odd * sin_bl1p, even * sin_bl1p + odd * cos_bl1p],
                        axis=-1)
    return rotated.reshape(x_blhk.shape).astype(x_blhk.dtype)
