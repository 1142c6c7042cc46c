"""Text transformer tower, Flax NNX.

Input int token ids ``[B, L]`` with ``L <= max_len``, right-padded with
``pad_id`` (default 0); output pooled features ``[B, width]``.

* ``causal=True`` (CLIP): causal self-attention, pooled at the end-of-text
  token. ``pool='eos'`` takes the position of the *first* token equal to
  ``eos_id`` (default 1, the T5/big_vision sentencepiece convention); a text
  without EOS (truncated) is pooled at its last non-padding token. With
  ``eos_id=None`` the OpenAI-CLIP convention is used instead: the position of
  the largest token id (their EOT id is the largest in the vocabulary).
* ``causal=False`` (SigLIP): bidirectional attention with padding masked out
  of the keys; ``pool`` is ``'last'`` (last non-padding token), ``'first'``,
  ``'mean'`` (over non-padding tokens) or ``'map'`` (attention pooling).

``mask_padding=False`` (SigLIP as released, HF ``SiglipTextModel``): no
padding mask at all, texts are always padded to ``max_len`` and ``'last'``
pools the final position; the padding tokens are then part of the input.

With ``mask_padding=True`` (the default) padding never changes the embedding:
padded positions are masked from every attention and from pooling, and position
embeddings are absolute, so a text padded to 64 tokens embeds exactly as the
same text with no padding.

All options are one frozen ``TextConfig``, validated when it is built:
``TextTransformer(config, rngs=...)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models import transformer as tfm
from big_contrast.sharding import constrain

POOLS = ("eos", "last", "first", "mean", "map")
TOKEN_EMBED_STD, POSEMB_STD = 0.02, 0.01  # CLIP / open_clip


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Every option of the text tower, checked once here. ``models.text_config`` builds it from
    a model config (a new field with a default is picked up there by name). ``pool=None``
    resolves to 'eos' for a causal tower, else 'last'."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    vocab_size: int = 32_000
    max_len: int = 64
    causal: bool = False
    pool: str | None = None
    pad_id: int = 0
    eos_id: int | None = 1
    mask_padding: bool = True
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan: bool = False

    def __post_init__(self):
        if self.pool is None:  # frozen: resolved once, here
            object.__setattr__(self, "pool", "eos" if self.causal else "last")
        tfm.check_choice("text pool", self.pool, POOLS)
        tfm.check_choice("text act", self.act, tfm.ACTIVATIONS)
        tfm.check_choice("remat", self.remat, tfm.REMAT_POLICIES)
        tfm.check_heads(self.width, self.num_heads)
        if self.vocab_size < 1 or self.max_len < 1:
            raise ConfigError(f"text vocab_size={self.vocab_size} and max_len={self.max_len} "
                              "must be positive.")


class TextTransformer(nnx.Module):

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.causal, self.pool, self.pad_id, self.eos_id = c.causal, c.pool, c.pad_id, c.eos_id
        self.mask_padding = c.mask_padding
        self.max_len, self.width, self.dtype = c.max_len, c.width, c.dtype
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        blocks = dict(act=c.act, norm_eps=c.norm_eps, **common)

        self.embedding = nnx.Embed(c.vocab_size, c.width,
                                   embedding_init=nnx.initializers.normal(TOKEN_EMBED_STD),
                                   embedding_metadata=tfm.logical("vocab", "embed"), **common)
        # CLIP's pair of inits (tokens 0.02, positions 0.01): with big_vision's 1/sqrt(width)
        # for positions next to CLIP's 0.02 for tokens, a width-32 tower starts with positions
        # 9x louder than words, and its embeddings encode caption length more than content.
        self.posemb = nnx.Param(nnx.initializers.normal(POSEMB_STD)(
                                    rngs.params(), (1, c.max_len, c.width), c.param_dtype),
                                **tfm.logical(None, None, "embed"))
        self.encoder = tfm.Encoder(width=c.width, depth=c.depth, mlp_dim=c.mlp_dim,
                                   num_heads=c.num_heads, remat=c.remat, scan=c.scan, **blocks)
        self.map_head = (tfm.MAPHead(c.width, c.mlp_dim, c.num_heads, **blocks)
                         if c.pool == "map" else nnx.data(None))

    def __call__(self, tokens_bl: jax.Array) -> jax.Array:
        self._check_tokens(tokens_bl)
        length = tokens_bl.shape[1]
        valid_bl = (tokens_bl != self.pad_id if self.mask_padding
                    else jnp.ones(tokens_bl.shape, bool))
        # FSDP/TP gather the table before the lookup: a gather from a sharded
        # table cannot be partitioned efficiently (XLA replicates it anyway).
        table_vd = constrain(self.embedding.embedding.get_value(), ("act_vocab", "act_embed"))
        x_bld = jnp.take(table_vd, tokens_bl, axis=0).astype(self.dtype)
        x_bld = x_bld + self.posemb.get_value()[:, :length].astype(self.dtype)
        x_bld = constrain(x_bld, tfm.ACT_BLD)
        x_bld = self.encoder(x_bld, self._attention_mask(valid_bl))
        return self._pool(x_bld, tokens_bl, valid_bl)

    def _attention_mask(self, valid_bl) -> jax.Array:
        mask_bqk = jnp.broadcast_to(valid_bl[:, None, :], (*valid_bl.shape, valid_bl.shape[1]))
        if self.causal:
            mask_bqk = mask_bqk & jnp.tril(jnp.ones(mask_bqk.shape[1:], bool))
        return mask_bqk[:, None]  # [B, 1 (heads), Q, K]

    def _pool(self, x_bld, tokens_bl, valid_bl) -> jax.Array:
        if self.pool == "first":
            return x_bld[:, 0]
        if self.pool == "mean":
            weights = valid_bl.astype(x_bld.dtype)[..., None]
            return (x_bld * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        if self.pool == "map":
            return self.map_head(x_bld, valid_bl)
        index_b = self._eos_index(tokens_bl, valid_bl) if self.pool == "eos" else _last_valid(valid_bl)
        return jnp.take_along_axis(x_bld, index_b[:, None, None], axis=1)[:, 0]

    def _eos_index(self, tokens_bl, valid_bl) -> jax.Array:
        if self.eos_id is None:
            return jnp.argmax(tokens_bl, axis=1)
        is_eos_bl = tokens_bl == self.eos_id
        return jnp.where(is_eos_bl.any(axis=1), jnp.argmax(is_eos_bl, axis=1), _last_valid(valid_bl))

    def _check_tokens(self, tokens_bl) -> None:
        if (tokens_bl.ndim != 2 or tokens_bl.shape[1] > self.max_len
                or not jnp.issubdtype(tokens_bl.dtype, jnp.integer)):
            raise ConfigError(f"text tokens of shape {tuple(tokens_bl.shape)} and dtype "
                              f"{tokens_bl.dtype} must be integer ids [B, L] with L <= max_len "
                              f"{self.max_len}; truncate them or raise config.text.max_len.")


def _last_valid(valid_bl) -> jax.Array:
    """Index of the last non-padding token (0 for an all-padding text)."""
    positions_bl = jnp.arange(valid_bl.shape[1])[None]
    return jnp.max(jnp.where(valid_bl, positions_bl, 0), axis=1)
