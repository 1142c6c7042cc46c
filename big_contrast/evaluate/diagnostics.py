"""Embedding-space diagnostics: alignment, uniformity, modality gap, mean positive/negative logits.

- alignment (Wang & Isola 2020, alpha=2): mean over positive pairs of ||zimg - ztxt||^2;
- uniformity (Wang & Isola 2020, t=2): log of the mean over distinct pairs i<j of one modality of
  exp(-2 ||z_i - z_j||^2) (`torch.pdist(z).pow(2).mul(-2).exp().mean().log()`), in tiles;
- modality gap (Liang et al. 2022): ||mean(zimg) - mean(ztxt)||;
- mean positive / negative cosine, and logit `scale * cosine + bias` when a scale is given.
Positive pairs are (image img_of_txt[t], caption t); every other (image, caption) pair is a
negative. The functions take embeddings as given; the evaluator L2-normalises them first.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator
from big_contrast.evaluate.embed import embed_pairs_for


def _pairs(zimg, ztxt, img_of_txt):
    zimg = np.asarray(zimg, np.float64)
    ztxt = np.asarray(ztxt, np.float64)
    img_of_txt = np.arange(len(ztxt)) if img_of_txt is None else np.asarray(img_of_txt).reshape(-1)
    if len(img_of_txt) != len(ztxt) or (len(img_of_txt) and img_of_txt.max() >= len(zimg)):
        raise ValueError(f"img_of_txt must map each of the {len(ztxt)} captions to one of the {len(zimg)} images.")
    return zimg, ztxt, img_of_txt


def alignment(zimg, ztxt, img_of_txt=None, alpha: float = 2.0) -> float:
    """Mean ||zimg[img_of_txt[t]] - ztxt[t]||^alpha over captions t (img_of_txt=None: row i pairs row i)."""
    zimg, ztxt, img_of_txt = _pairs(zimg, ztxt, img_of_txt)
    return float(np.mean(np.linalg.norm(zimg[img_of_txt] - ztxt, axis=1) ** alpha))


@jax.jit
def _uniformity_tile(za_ad, zb_bd, index_a, index_b, t):
    """Log-sum-exp of -t*||za_i - zb_j||^2 over the pairs of the tile with index_i < index_j."""
    sq_dist_ab = (jnp.sum(za_ad**2, axis=1)[:, None] + jnp.sum(zb_bd**2, axis=1)[None, :]
                  - 2 * jnp.dot(za_ad, zb_bd.T, precision=jax.lax.Precision.HIGHEST))
    exponent_ab = -t * jnp.maximum(sq_dist_ab, 0.0)
    distinct = index_a[:, None] < index_b[None, :]
    top = jnp.max(jnp.where(distinct, exponent_ab, -jnp.inf))
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(jnp.where(distinct, jnp.exp(exponent_ab - safe_top), 0.0))
    return safe_top + jnp.log(total)  # -inf for a tile without distinct pairs


def uniformity(z, t: float = 2.0, *, chunk: int = 2048) -> float:
    """log mean_{i<j} exp(-t ||z_i - z_j||^2), tiled over blocks of rows (memory O(chunk^2))."""
    z = np.asarray(z, np.float32)
    n = len(z)
    if n < 2:
        raise ConfigError(f"Uniformity needs at least two embeddings; got {n}.")
    size = min(chunk, n)
    n_blocks = math.ceil(n / size)
    padded = np.zeros((n_blocks * size, z.shape[1]), np.float32)
    padded[:n] = z
    # Padding rows must never form a pair "i < j": on the left they get the largest index, on the
    # right the index -1.
    real = np.arange(n_blocks * size) < n
    index_left = np.where(real, np.arange(n_blocks * size), np.iinfo(np.int32).max).astype(np.int32)
    index_right = np.where(real, np.arange(n_blocks * size), -1).astype(np.int32)
    tile_lse = []
    for a in range(n_blocks):
        for b in range(a, n_blocks):  # pairs i < j only occur in blocks b >= a
            sa, sb = slice(a * size, (a + 1) * size), slice(b * size, (b + 1) * size)
            tile_lse.append(_uniformity_tile(padded[sa], padded[sb], index_left[sa], index_right[sb], t))
    lse = np.asarray(jax.device_get(tile_lse), np.float64)
    top = lse.max()
    log_sum = top + np.log(np.sum(np.exp(lse - top)))
    return float(log_sum - np.log(n * (n - 1) / 2))


def modality_gap(zimg, ztxt) -> float:
    """||mean(zimg) - mean(ztxt)||, the distance between the two modalities' centroids."""
    return float(np.linalg.norm(np.asarray(zimg, np.float64).mean(0) - np.asarray(ztxt, np.float64).mean(0)))


def mean_pair_scores(zimg, ztxt, img_of_txt=None, *, scale: float = 1.0, bias: float = 0.0) -> tuple[float, float]:
    """(mean positive, mean negative) of scale * <zimg_i, ztxt_t> + bias, without the full matrix.

    The sum over all pairs is <sum_i zimg_i, sum_t ztxt_t>; the negatives are that minus the positives.
    """
    zimg, ztxt, img_of_txt = _pairs(zimg, ztxt, img_of_txt)
    n_img, n_txt = len(zimg), len(ztxt)
    if n_img < 2:
        raise ConfigError(f"Mean negative scores need at least two images; got {n_img}.")
    positive_dots = np.sum(zimg[img_of_txt] * ztxt, axis=1)
    all_dots_sum = zimg.sum(0) @ ztxt.sum(0)
    n_negative = n_img * n_txt - n_txt
    mean_positive = scale * positive_dots.mean() + bias
    mean_negative = scale * (all_dots_sum - positive_dots.sum()) / n_negative + bias
    return float(mean_positive), float(mean_negative)


def embedding_diagnostics(zimg, ztxt, img_of_txt=None, *, scale: float | None = None, bias: float | None = None,
                          uniformity_samples: int | None = None, chunk: int = 2048) -> dict[str, float]:
    """All diagnostics of a paired set, on the embeddings as given.

    uniformity_samples: compute uniformity on the first that many embeddings of each modality
    (None: all; the cost is quadratic).
    """
    n = uniformity_samples
    pos_cos, neg_cos = mean_pair_scores(zimg, ztxt, img_of_txt)
    results = {
        "alignment": alignment(zimg, ztxt, img_of_txt),
        "uniformity_img": uniformity(np.asarray(zimg)[:n], chunk=chunk),
        "uniformity_txt": uniformity(np.asarray(ztxt)[:n], chunk=chunk),
        "modality_gap": modality_gap(zimg, ztxt),
        "pos_cosine": pos_cos,
        "neg_cosine": neg_cos,
    }
    if scale is not None:
        bias = 0.0 if bias is None else float(bias)
        results["pos_logit"], results["neg_logit"] = mean_pair_scores(
            zimg, ztxt, img_of_txt, scale=float(scale), bias=bias)
    return results


class DiagnosticsEvaluator(Evaluator):
    """config.evals.<name> with type='diagnostics', on an image-caption set (like retrieval)."""

    TYPE = "diagnostics"
    DEFAULTS = {
        "image_field": "image",
        "text_field": "texts",
        "caption_mask_field": None,
        "image_id_field": None,
        "uniformity_samples": None,
        "chunk": 2048,
    }

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        cfg = self.config
        zimg, ztxt, img_of_txt = embed_pairs_for(self, data, encoders)
        return embedding_diagnostics(zimg, ztxt, img_of_txt, scale=encoders.scale,
                                     bias=encoders.bias, uniformity_samples=cfg["uniformity_samples"],
                                     chunk=cfg["chunk"])
