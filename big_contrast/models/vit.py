"""Vision Transformer image tower (big_vision / CLIP layout), Flax NNX.

Input ``[B, H, W, C]`` floats, output pooled features ``[B, width]`` in the
compute dtype. Pooling:

* ``'tok'``: a learned class token is prepended and its final state returned.
  As in CLIP, timm and HF, the class token has its own position embedding, so
  the learned table has ``N + 1`` rows (ViT-B/16 at 224 px: 85,798,656 params).
* ``'gap'``: mean over the patch tokens.
* ``'map'``: multihead attention pooling (big_vision MAP head, SigLIP).

Position embeddings: ``'learn'`` (normal, std 1/sqrt(width)) or the fixed
``'sincos2d'`` (the class token then gets a zero embedding, as in MoCo v3), or ``'none'``
(only with RoPE). ``rope='2d'`` adds 2D axial rotary embeddings to every self-attention
layer (``models/rope.py``; frequencies from ``rope_theta``), on top of the absolute
embedding (Perception Encoder keeps its learned one) or instead of it (``posemb='none'``).

Patch dropout (FLIP, Li et al. 2023; open_clip's ``patch_dropout``): with
``patch_dropout=p`` and per-example PRNG keys passed as ``patch_keys``, each
image keeps a random ``max(1, int(N * (1 - p)))`` of its ``N`` patch tokens,
chosen after the position embeddings and before the class token, so the
encoder runs on fewer tokens (the training speed-up). Without keys (evaluation)
every token is kept. The keys, not module state, decide the mask: a caller
that derives them from (step, example index) gets the same mask in every
pass over the same rows and after a resume. With RoPE the kept tokens keep their
grid positions (the positions are gathered with the tokens).

All options are one frozen ``ViTConfig``, validated when it is built: ``ViT(config, rngs=...)``.
Options for released checkpoints: ``ln_pre`` (CLIP's LayerNorm before the
encoder), ``patch_bias=False`` (CLIP's patch embedding has no bias), ``act``
and ``norm_eps`` (see ``transformer.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models import rope as rope_lib
from big_contrast.models import transformer as tfm
from big_contrast.sharding import constrain

POOLS = ("tok", "gap", "map")
POSEMBS = ("learn", "sincos2d", "none")


def _pair(value, what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{what}={value!r} must be a positive int or a pair of them.")
    return pair


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Every option of the image tower, checked once here. ``models.image_config`` builds it
    from a model config (a new field with a default is picked up there by name)."""

    patch_size: int | tuple[int, int]  # a pair once built
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    image_size: int | tuple[int, int] = 224  # a pair once built
    pool: str = "tok"
    posemb: str = "learn"
    channels: int = 3
    patch_dropout: float = 0.0
    ln_pre: bool = False
    patch_bias: bool = True
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan: bool = False
    rope: str = "none"  # '2d': axial rotary embeddings in every self-attention (models/rope.py)
    rope_theta: float = 10_000.0

    def __post_init__(self):
        tfm.check_choice("image pool", self.pool, POOLS)
        tfm.check_choice("image posemb", self.posemb, POSEMBS)
        tfm.check_choice("image act", self.act, tfm.ACTIVATIONS)
        tfm.check_choice("remat", self.remat, tfm.REMAT_POLICIES)
        tfm.check_heads(self.width, self.num_heads)
        rope_lib.check_rope(self.rope, self.width // self.num_heads, self.rope_theta)
        if self.posemb == "none" and self.rope == "none":
            raise ConfigError("image posemb='none' leaves the tower without any position "
                              "information; set rope='2d' or use posemb='learn' / 'sincos2d'.")
        patch, size = _pair(self.patch_size, "patch_size"), _pair(self.image_size, "image_size")
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ConfigError(f"patch size {self.patch_size} does not divide image size "
                              f"{self.image_size}; pick an image size that is a multiple of the "
                              "patch size.")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"patch_dropout={self.patch_dropout} must be in [0, 1): it is the "
                              "fraction of patch tokens dropped in training.")
        object.__setattr__(self, "patch_size", patch)  # frozen: normalised once, here
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "patch_dropout", float(self.patch_dropout))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]


class ViT(nnx.Module):

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.grid, self.patch_dropout = c.grid, c.patch_dropout
        self.image_size, self.channels, self.width = c.image_size, c.channels, c.width
        self.pool, self.posemb_kind, self.dtype = c.pool, c.posemb, c.dtype
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        blocks = dict(act=c.act, norm_eps=c.norm_eps, **common)

        self.embedding = nnx.Conv(c.channels, c.width, kernel_size=c.patch_size,
                                  strides=c.patch_size, padding="VALID", use_bias=c.patch_bias,
                                  kernel_metadata=tfm.logical("patch", "patch", "channels", "embed"),
                                  bias_metadata=tfm.logical("embed"), **common)
        num_tokens = self.grid[0] * self.grid[1] + (c.pool == "tok")
        self.cls = (nnx.Param(jnp.zeros((1, 1, c.width), c.param_dtype), **tfm.logical(None, None, "embed"))
                    if c.pool == "tok" else nnx.data(None))
        self.posemb = (nnx.Param(nnx.initializers.normal(c.width ** -0.5)(
                           rngs.params(), (1, num_tokens, c.width), c.param_dtype),
                           **tfm.logical(None, None, "embed"))
                       if c.posemb == "learn" else nnx.data(None))
        self.ln_pre = (tfm.layer_norm(c.width, eps=c.norm_eps, **common) if c.ln_pre
                       else nnx.data(None))
        self.encoder = tfm.Encoder(width=c.width, depth=c.depth, mlp_dim=c.mlp_dim,
                                   num_heads=c.num_heads, remat=c.remat, scan=c.scan,
                                   uses_rotary=c.rope != "none", **blocks)
        self.map_head = (tfm.MAPHead(c.width, c.mlp_dim, c.num_heads, **blocks)
                         if c.pool == "map" else nnx.data(None))

    def __call__(self, images_bhwc: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
        """Pooled features; ``patch_keys`` [B] (PRNG keys) turn on patch dropout (training)."""
        return self.pool_features(self.encode(images_bhwc, patch_keys))

    def encode(self, images_bhwc: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
        """The encoder's output [B, L, D] before pooling (the class token first for ``'tok'``)."""
        x_bnd, kept_bk = self._tokens_and_kept(images_bhwc, patch_keys)
        if self.ln_pre is not None:
            x_bnd = self.ln_pre(x_bnd)
        return self.encoder(x_bnd, rotary=self.rotary_table(kept_bk))

    def patch_tokens(self, encoded_bnd: jax.Array) -> jax.Array:
        """The un-pooled patch tokens [B, N, D] of ``encode``'s output (the class token dropped):
        what a captioning decoder cross-attends to and a dense probe reads."""
        return encoded_bnd[:, 1:] if self.pool == "tok" else encoded_bnd

    def pool_features(self, x_bnd: jax.Array) -> jax.Array:
        """``encode``'s output pooled to [B, D]."""
        if self.pool == "tok":
            return x_bnd[:, 0]
        if self.pool == "gap":
            return jnp.mean(x_bnd, axis=1)
        return self.map_head(x_bnd)

    @property
    def num_kept_patches(self) -> int:
        """Patch tokens per image that patch dropout keeps (all of them at rate 0)."""
        num_patches = self.grid[0] * self.grid[1]
        return max(1, int(num_patches * (1.0 - self.patch_dropout)))

    def tokens(self, images_bhwc: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
        """The encoder's input [B, L, D]: embedded patches (a kept subset with patch dropout),
        position embeddings added, the class token first for ``'tok'`` pooling."""
        return self._tokens_and_kept(images_bhwc, patch_keys)[0]

    def _tokens_and_kept(self, images_bhwc, patch_keys):
        """``tokens`` and the indices [B, K] of the patches patch dropout kept (None: all)."""
        self._check_images(images_bhwc)
        x = self.embedding(images_bhwc.astype(self.dtype))
        x_bnd = x.reshape(x.shape[0], -1, self.width)
        posemb = self._position_embedding()
        if posemb is not None:
            posemb = posemb.astype(x_bnd.dtype)
            x_bnd = x_bnd + posemb[:, int(self.pool == "tok"):]
        kept_bk = None
        if patch_keys is not None and self.num_kept_patches < x_bnd.shape[1]:
            kept_bk = _kept_indices(patch_keys, x_bnd.shape[1], self.num_kept_patches)
            x_bnd = jnp.take_along_axis(x_bnd, kept_bk[..., None], axis=1)
        if self.pool == "tok":
            cls = self.cls.get_value().astype(x_bnd.dtype)
            cls = cls if posemb is None else cls + posemb[:, :1]
            x_bnd = jnp.concatenate([jnp.broadcast_to(cls, (x_bnd.shape[0], 1, self.width)), x_bnd], axis=1)
        return constrain(x_bnd, tfm.ACT_BLD), kept_bk

    def token_positions(self, kept_bk: jax.Array | None = None) -> jax.Array:
        """(row, column) [B|1, L, 2] of the encoder's tokens (``rope.grid_positions``): the full
        grid, or the patches patch dropout kept (``kept_bk`` [B, K]) at their grid positions."""
        class_token = self.pool == "tok"
        positions = jnp.asarray(rope_lib.grid_positions(self.grid, class_token))[None]
        if kept_bk is None:
            return positions
        cls_rows, patches = positions[:, :int(class_token)], positions[:, int(class_token):]
        kept = jnp.take_along_axis(patches, kept_bk[..., None], axis=1)
        return jnp.concatenate([jnp.broadcast_to(cls_rows, (kept.shape[0], *cls_rows.shape[1:])),
                                kept], axis=1)

    def rotary_table(self, kept_bk: jax.Array | None = None):
        """The (cos, sin) pair of the tokens' positions for the encoder, or None without RoPE."""
        if self.config.rope == "none":
            return None
        return rope_lib.rotary_table(self.token_positions(kept_bk),
                                     self.width // self.config.num_heads, self.config.rope_theta)

    def _position_embedding(self) -> jax.Array | None:
        """[1, (1 +) N, D], or None for posemb='none' (RoPE alone)."""
        if self.posemb_kind == "learn":
            return self.posemb.get_value()
        if self.posemb_kind == "none":
            return None
        pe = tfm.posemb_sincos_2d(*self.grid, self.width)
        if self.pool == "tok":
            pe = np.concatenate([np.zeros((1, self.width), np.float32), pe])
        return jnp.asarray(pe)[None]

    def _check_images(self, images) -> None:
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ConfigError(f"images of shape {tuple(images.shape)} do not match the model's "
                              f"[B, {expected[0]}, {expected[1]}, {expected[2]}]; resize them or "
                              "set config.image.image_size.")


def _kept_indices(keys_b: jax.Array, num_tokens: int, keep: int) -> jax.Array:
    """[B, keep]: for each row, the ``keep`` token indices with the highest uniform score
    drawn from its own key, in their original order."""
    scores_bn = jax.vmap(lambda key: jax.random.uniform(key, (num_tokens,)))(keys_b)
    return jnp.sort(jax.lax.top_k(scores_bn, keep)[1], axis=1)
