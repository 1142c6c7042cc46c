"""The NaFlex forward of a ViT (SigLIP 2's variable resolution): padded patches in, one
pooled feature per image out.

Why: NaFlex (NaViT + FlexiViT, SigLIP 2) feeds each image at its own aspect ratio as up to
``N`` patches (``data/naflex.py``); a batch then mixes patch grids, so the position
embeddings are resampled per image to its grid and the padding is masked out of attention
and pooling. The parameters are exactly those of a fixed-resolution ``ViT`` with a learned
position table (``posemb='learn'``): ``naflex_features(vit, ...)`` is another forward over
the same module, so a tower trained at one resolution runs NaFlex and back, and released
``Siglip2VisionModel`` weights map onto it like SigLIP's do (the patch embedding is the
ViT's convolution kernel, read as a [p*p*C, D] matrix over patches flattened (row, column,
channel)).

Per-image position embeddings: the learned [gh, gw] table is resized to the image's
``(h, w)`` patch grid as transformers' ``Siglip2VisionEmbeddings.resize_positional_embeddings``
does, i.e. ``F.interpolate(mode='bilinear', align_corners=False, antialias=True)`` (a
triangle filter widened by the scale when shrinking, half-pixel centres, normalised weights),
the same weights as big_vision's ``naflex_vit`` (``jax.image.scale_and_translate``,
'linear', antialiased; both checked in the tests), written here as one [N, gh*gw]
interpolation matrix per image built from the grid sizes
(data, not shapes: nothing recompiles per aspect ratio). Padding positions take the image's
position (0, 0), as in transformers; they are masked anyway.

Masking: keys that are padding are excluded from every self-attention and from the MAP
head's attention (``'gap'`` averages the real tokens only), so an image embeds the same in
any batch and with any padding length.

In training (issue 22): a batch whose fields include ``patches`` is a NaFlex batch -- that is
the one rule; ``image_input(batch)`` turns it into ``NaflexImages``, which
``TwoTowers.embed_images`` routes here, so the train step, gradient caching, the EMA teacher
and the evaluators embed it with no other switch. Patch dropout (FLIP) drops among the real
patches only: each image keeps ``max(1, int(n * (1 - rate)))`` of its ``n`` real patches,
drawn from its own key, in a sequence of ``max(1, int(N * (1 - rate)))`` slots (the rest
masked), so a full image keeps what the fixed-resolution ViT keeps, with the same mask.
Evaluation padding rows (all-zero patches, mask and shapes) embed to finite values.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from big_contrast.models import transformer as tfm
from big_contrast.models.two_towers import EMBEDDINGS_LOGICAL, l2_normalize
from big_contrast.sharding import call_with_auto_axes, constrain

NAFLEX_FIELDS = ("patches", "patch_mask", "spatial_shapes")


class NaflexImages(NamedTuple):
    """The image tower's input of a NaFlex batch (a pytree: it shards, slices into micro-batches
    and crosses jit like the arrays it holds)."""

    patches: jax.Array  # [B, N, p*p*C] float
    patch_mask: jax.Array  # [B, N] bool, the real patches first
    spatial_shapes: jax.Array  # [B, 2] int32, each image's patch grid (rows, columns)


def is_naflex_batch(batch) -> bool:
    """The rule: a batch with a ``patches`` field is a NaFlex batch."""
    return "patches" in batch


def image_input(batch):
    """What the image tower embeds: ``NaflexImages`` of a NaFlex batch, else ``batch['image']``."""
    if is_naflex_batch(batch):
        return NaflexImages(*(batch[k] for k in NAFLEX_FIELDS))
    return batch["image"]


def resize_weights(spatial_shapes_b2: jax.Array, grid: tuple[int, int], length: int) -> jax.Array:
    """[B, length, gh*gw] weights that resize a [gh, gw] table to each image's (h, w) grid,
    position ``i < h*w`` at row ``i // w``, column ``i % w``; later positions take row 0, column 0."""
    spatial_shapes_b2 = jnp.maximum(spatial_shapes_b2, 1)  # evaluation padding rows: (0, 0)
    sizes_b12 = spatial_shapes_b2.astype(jnp.float32)[:, None, :]
    positions_1l = jnp.arange(length)[None]
    cols_b = spatial_shapes_b2[:, 1:2]
    valid_bl = positions_1l < spatial_shapes_b2[:, :1] * cols_b
    index_bl2 = jnp.stack([positions_1l // cols_b, positions_1l % cols_b], axis=-1)
    index_bl2 = jnp.where(valid_bl[..., None], index_bl2, 0).astype(jnp.float32)
    rows_blg = _antialiased_linear(index_bl2[..., 0], sizes_b12[..., 0], grid[0])
    cols_blg = _antialiased_linear(index_bl2[..., 1], sizes_b12[..., 1], grid[1])
    weights = rows_blg[..., :, None] * cols_blg[..., None, :]
    return weights.reshape(*weights.shape[:2], grid[0] * grid[1])


def _antialiased_linear(index_bl, size_b1, source_size: int) -> jax.Array:
    """[B, L, source] weights of output ``index`` of ``size`` samples from ``source_size`` ones."""
    scale_b1 = source_size / size_b1
    support_b1 = jnp.maximum(scale_b1, 1.0)
    center_bl = (index_bl + 0.5) * scale_b1 - 0.5
    source = jnp.arange(source_size, dtype=jnp.float32)
    distance = jnp.abs(source - center_bl[..., None]) / support_b1[..., None]
    weights = jnp.maximum(1.0 - distance, 0.0)
    return weights / weights.sum(-1, keepdims=True)


def naflex_tokens(vit, patches_bnp, spatial_shapes_b2) -> jax.Array:
    """Embedded patches plus each image's resized position embeddings [B, N, D] (the class
    token first for ``'tok'`` pooling)."""
    return _with_class_token(vit, _patch_tokens(vit, patches_bnp, spatial_shapes_b2))


def _patch_tokens(vit, patches_bnp, spatial_shapes_b2) -> jax.Array:
    """Embedded patches plus each image's resized position embeddings [B, N, D]."""
    _check_inputs(vit, patches_bnp, spatial_shapes_b2)
    kernel = vit.embedding.kernel.get_value()
    x_bnd = patches_bnp.astype(vit.dtype) @ kernel.reshape(-1, vit.width).astype(vit.dtype)
    if vit.embedding.bias is not None:
        x_bnd = x_bnd + vit.embedding.bias.get_value().astype(vit.dtype)
    table = vit.posemb.get_value()[0]
    cls_rows = int(vit.pool == "tok")
    weights_bng = resize_weights(spatial_shapes_b2, vit.grid, patches_bnp.shape[1])
    posemb_bnd = weights_bng @ table[cls_rows:].astype(jnp.float32)
    return x_bnd + posemb_bnd.astype(table.dtype).astype(vit.dtype)


def _with_class_token(vit, x_bnd) -> jax.Array:
    if vit.pool == "tok":
        table = vit.posemb.get_value()[0]
        cls = (vit.cls.get_value()[0] + table[:1]).astype(vit.dtype)
        x_bnd = jnp.concatenate([jnp.broadcast_to(cls, (x_bnd.shape[0], 1, vit.width)), x_bnd], axis=1)
    return constrain(x_bnd, tfm.ACT_BLD)


def keep_real_patches(x_bnd, valid_bn, keys_b, rate: float):
    """FLIP's patch dropout among the real patches: (tokens [B, K, D], valid [B, K]) with
    K = max(1, int(N * (1 - rate))); image i keeps max(1, int(n_i * (1 - rate))) of its n_i real
    patches (the highest uniform scores drawn from its key), in their original order, and the
    slots it does not fill are masked."""
    length = x_bnd.shape[1]
    keep = max(1, int(length * (1.0 - rate)))
    kept_of = jnp.asarray([max(1, int(n * (1.0 - rate))) for n in range(length + 1)], jnp.int32)  # exact ints
    scores_bn = jax.vmap(lambda key: jax.random.uniform(key, (length,)))(keys_b)
    _, ranked_bk = jax.lax.top_k(jnp.where(valid_bn, scores_bn, -1.0), keep)  # real patches first
    kept_bk = jnp.arange(keep)[None] < kept_of[valid_bn.sum(1)][:, None]
    order_bk = jnp.sort(jnp.where(kept_bk, ranked_bk, length + ranked_bk), axis=1)  # kept ones first, in order
    index_bk = order_bk % length
    valid_bk = (order_bk < length) & jnp.take_along_axis(valid_bn, index_bk, axis=1)
    return jnp.take_along_axis(x_bnd, index_bk[..., None], axis=1), valid_bk


def naflex_features(vit, patches_bnp: jax.Array, patch_mask_bn: jax.Array,
                    spatial_shapes_b2: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
    """Pooled features [B, D] of NaFlex inputs (``data/naflex.py``'s patches, patch_mask,
    spatial_shapes) through ``vit``'s parameters; ``patch_keys`` [B] (training) turn on the
    tower's patch dropout among the real patches (``keep_real_patches``)."""
    valid_bn = patch_mask_bn.astype(bool)
    x_bnd = _patch_tokens(vit, patches_bnp, spatial_shapes_b2)
    if patch_keys is not None and vit.patch_dropout > 0:
        x_bnd, valid_bn = keep_real_patches(x_bnd, valid_bn, patch_keys, vit.patch_dropout)
    x_bnd = _with_class_token(vit, x_bnd)
    if vit.pool == "tok":
        valid_bn = jnp.concatenate([jnp.ones((valid_bn.shape[0], 1), bool), valid_bn], axis=1)
    if vit.ln_pre is not None:
        x_bnd = vit.ln_pre(x_bnd)
    batch, length = valid_bn.shape
    mask_b1qk = jnp.broadcast_to(valid_bn[:, None, None, :], (batch, 1, length, length))  # keys only
    x_bnd = vit.encoder(x_bnd, mask_b1qk)
    if vit.pool == "tok":
        return x_bnd[:, 0]
    if vit.pool == "gap":
        weights = valid_bn.astype(x_bnd.dtype)[..., None]
        return (x_bnd * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
    return vit.map_head(x_bnd, valid_bn)


def naflex_embed_images(model, patches_bnp: jax.Array, patch_mask_bn: jax.Array,
                        spatial_shapes_b2: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
    """``TwoTowers.embed_images`` for NaFlex inputs: the image tower's NaFlex features, its
    projection head, L2-normalised [B, embed_dim] float32 (LiT's lock stops the gradient)."""
    def embed(tower_and_head, patches, mask, shapes, *keys):
        vit, head = tower_and_head
        features_bd = naflex_features(vit, patches, mask, shapes, *keys)
        if model.lock_image:
            features_bd = jax.lax.stop_gradient(features_bd)
        z_bd = features_bd if head is None else head(features_bd)
        return constrain(l2_normalize(z_bd), EMBEDDINGS_LOGICAL)

    keys = () if patch_keys is None else (patch_keys,)
    return call_with_auto_axes(embed, (model.image, model.image_head),
                               (patches_bnp, patch_mask_bn, spatial_shapes_b2, *keys), EMBEDDINGS_LOGICAL,
                               (patches_bnp.shape[0], model.embed_dim))


def _check_inputs(vit, patches_bnp, spatial_shapes_b2) -> None:
    if vit.posemb_kind != "learn":
        raise NotImplementedError(f"NaFlex needs a learned position table to resample; this ViT "
                                  f"has posemb={vit.posemb_kind!r}, use posemb='learn'.")
    kernel_shape = vit.embedding.kernel.get_value().shape  # [p, p, C, D]
    patch_dim = kernel_shape[0] * kernel_shape[1] * kernel_shape[2]
    if patches_bnp.ndim != 3 or patches_bnp.shape[2] != patch_dim or spatial_shapes_b2.shape != (
            patches_bnp.shape[0], 2):
        raise ValueError(f"NaFlex patches of shape {tuple(patches_bnp.shape)} with spatial shapes "
                         f"{tuple(spatial_shapes_b2.shape)} do not match the model's [B, N, {patch_dim}] "
                         f"and [B, 2]; preprocess with patch_size={kernel_shape[0]}.")
