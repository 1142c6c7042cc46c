"""Image-text retrieval recall@k, computed in tiles so the similarity matrix never exists whole.

Conventions (those of CLIP_benchmark / open_clip, made exact for ties):
- similarity = dot product of the given embeddings (pass L2-normalised ones for cosine; the
  evaluators do), computed in float32 with `Precision.HIGHEST`;
- each query ranks all candidates by descending similarity; **ties are broken by the lower
  candidate index first**, i.e. exactly the order of `np.argsort(-scores, kind="stable")`;
- image -> text: a hit at k when any of the image's captions is among its first k candidates;
  text -> image: a hit at k when the caption's image is among its first k candidates;
- recall@k = fraction of queries that hit (every image and every caption is one query).

Memory: the embeddings plus O(chunk^2) per tile. Pass 1 finds, for each query, the score and
index of its first positive, only on tiles that hold a positive pair (the block diagonal when
captions are stored next to their image); pass 2 counts, on every tile, the negatives ranked
before that positive. Both passes run the same compiled tile function, so a score is bit-identical
in both, which is what makes exact ties well defined.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator, check_ks
from big_contrast.evaluate.embed import embed_pairs_for

_NO_INDEX = np.iinfo(np.int32).max


@jax.jit
def _tile_step(zimg_ic, ztxt_tc, img_index_i, txt_index_t, img_of_txt_t, valid_i, valid_t,
               img_best_i, img_best_index_i, txt_best_t, img_rank_i, txt_rank_t):
    """Visit one (image block, text block) tile of the similarity matrix; returns the updated state.

    State per image: best positive score and the lowest caption index reaching it, rank so far;
    per caption: its positive score, rank so far. The best scores are merged with the tile's
    positive pairs, and the negatives of the tile ranked before the *incoming* best are added to
    the ranks. Pass 1 (positive tiles) settles the best scores, pass 2 (all tiles, ranks reset)
    counts; merging again in pass 2 changes nothing, since those tiles were all merged in pass 1.
    """
    scores_it = jnp.dot(zimg_ic, ztxt_tc.T, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    both_valid = valid_i[:, None] & valid_t[None, :]
    positive = (img_of_txt_t[None, :] == img_index_i[:, None]) & both_valid
    negative = ~positive & both_valid

    # A negative ranks before the positive when it scores higher, or equal with a lower index.
    img_before = (scores_it > img_best_i[:, None]) | (
        (scores_it == img_best_i[:, None]) & (txt_index_t[None, :] < img_best_index_i[:, None]))
    txt_before = (scores_it > txt_best_t[None, :]) | (
        (scores_it == txt_best_t[None, :]) & (img_index_i[:, None] < img_of_txt_t[None, :]))
    img_rank_i = img_rank_i + (negative & img_before).sum(axis=1, dtype=jnp.int32)
    txt_rank_t = txt_rank_t + (negative & txt_before).sum(axis=0, dtype=jnp.int32)

    pos_scores = jnp.where(positive, scores_it, -jnp.inf)
    tile_best_i = pos_scores.max(axis=1)
    at_best = positive & (scores_it == tile_best_i[:, None])
    tile_best_index_i = jnp.where(at_best, txt_index_t[None, :], _NO_INDEX).min(axis=1)
    take_tile = (tile_best_i > img_best_i) | ((tile_best_i == img_best_i) & (tile_best_index_i < img_best_index_i))
    img_best_i = jnp.where(take_tile, tile_best_i, img_best_i)
    img_best_index_i = jnp.where(take_tile, tile_best_index_i, img_best_index_i)
    txt_best_t = jnp.maximum(txt_best_t, pos_scores.max(axis=0))  # a caption has one image
    return img_best_i, img_best_index_i, txt_best_t, img_rank_i, txt_rank_t


def _blocks(array: np.ndarray, size: int, fill) -> list[jax.Array]:
    """Equal blocks of `size` rows on the device, the last one padded with `fill`."""
    n_blocks = max(1, math.ceil(len(array) / size))
    padded = np.full((n_blocks * size,) + array.shape[1:], fill, array.dtype)
    padded[:len(array)] = array
    return list(jax.device_put(np.split(padded, n_blocks)))


def _check_inputs(zimg: np.ndarray, ztxt: np.ndarray, img_of_txt: np.ndarray) -> None:
    if zimg.ndim != 2 or ztxt.ndim != 2 or zimg.shape[1] != ztxt.shape[1]:
        raise ValueError(f"zimg and ztxt must be [N, D] with the same D; got {zimg.shape} and {ztxt.shape}.")
    if img_of_txt.shape != (len(ztxt),):
        raise ValueError(f"img_of_txt must give one image index per caption, shape ({len(ztxt)},); "
                         f"got {img_of_txt.shape}.")
    if len(zimg) == 0 or len(ztxt) == 0:
        raise ConfigError(f"Retrieval needs at least one image and one caption; got {len(zimg)} and {len(ztxt)}.")
    if img_of_txt.min() < 0 or img_of_txt.max() >= len(zimg):
        raise ConfigError(f"img_of_txt has image indices outside [0, {len(zimg)}): "
                         f"min {img_of_txt.min()}, max {img_of_txt.max()}.")
    uncaptioned = np.setdiff1d(np.arange(len(zimg)), img_of_txt)
    if len(uncaptioned):
        raise ConfigError(f"Images {uncaptioned[:5].tolist()} (of {len(uncaptioned)}) have no caption, so they "
                         "cannot be image->text queries; drop them or give them captions.")
    for name, z in (("zimg", zimg), ("ztxt", ztxt)):
        if not np.isfinite(z).all():
            raise ConfigError(f"{name} has non-finite values; check the model outputs before retrieval.")


def retrieval_ranks(zimg, ztxt, img_of_txt, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the first positive of every query: (rank per image [Ni], rank per caption [Nt]).

    zimg [Ni, D], ztxt [Nt, D] (numpy or jax), img_of_txt [Nt] int: the image of each caption.
    Rank r means r negatives come first in the stable descending order (see the module docstring).
    """
    zimg = np.asarray(zimg, np.float32)
    ztxt = np.asarray(ztxt, np.float32)
    img_of_txt = np.asarray(img_of_txt).astype(np.int32)
    _check_inputs(zimg, ztxt, img_of_txt)
    n_img, n_txt = len(zimg), len(ztxt)
    ci, ct = min(chunk, n_img), min(chunk, n_txt)

    zimg_blocks = _blocks(zimg, ci, 0.0)
    ztxt_blocks = _blocks(ztxt, ct, 0.0)
    img_index = _blocks(np.arange(n_img, dtype=np.int32), ci, -1)
    txt_index = _blocks(np.arange(n_txt, dtype=np.int32), ct, _NO_INDEX)
    img_of_txt_blocks = _blocks(img_of_txt, ct, -1)
    valid_img = _blocks(np.ones(n_img, bool), ci, False)
    valid_txt = _blocks(np.ones(n_txt, bool), ct, False)

    img_best = [np.full(ci, -np.inf, np.float32) for _ in zimg_blocks]
    img_best_index = [np.full(ci, _NO_INDEX, np.int32) for _ in zimg_blocks]
    txt_best = [np.full(ct, -np.inf, np.float32) for _ in ztxt_blocks]

    def visit(bi, bt, img_rank, txt_rank):
        img_best[bi], img_best_index[bi], txt_best[bt], img_rank[bi], txt_rank[bt] = _tile_step(
            zimg_blocks[bi], ztxt_blocks[bt], img_index[bi], txt_index[bt], img_of_txt_blocks[bt],
            valid_img[bi], valid_txt[bt], img_best[bi], img_best_index[bi], txt_best[bt], img_rank[bi], txt_rank[bt])

    def zero_ranks():
        return [np.zeros(ci, np.int32) for _ in zimg_blocks], [np.zeros(ct, np.int32) for _ in ztxt_blocks]

    # Pass 1: best positive per query, on the tiles that contain positive pairs only (ranks discarded).
    img_rank, txt_rank = zero_ranks()
    for bi, bt in sorted(set(zip((img_of_txt // ci).tolist(), (np.arange(n_txt) // ct).tolist()))):
        visit(bi, bt, img_rank, txt_rank)
    # Pass 2: negatives ranked before that positive, on every tile.
    img_rank, txt_rank = zero_ranks()
    for bi in range(len(zimg_blocks)):
        for bt in range(len(ztxt_blocks)):
            visit(bi, bt, img_rank, txt_rank)
    return (np.concatenate(jax.device_get(img_rank))[:n_img],
            np.concatenate(jax.device_get(txt_rank))[:n_txt])


def recall_at_k(zimg, ztxt, img_of_txt, ks: Sequence[int] = (1, 5, 10), *, chunk: int = 4096) -> dict[str, float]:
    """Image->text and text->image recall@k: {'i2t_recall@1': ..., 't2i_recall@1': ..., ...}.

    zimg [Ni, D], ztxt [Nt, D], img_of_txt [Nt]: caption t describes image img_of_txt[t] (several
    captions per image allowed; every image needs at least one). Numpy or jax arrays. Fractions in
    [0, 1]. Ties: stable descending order, see the module docstring. `chunk` bounds a tile.
    """
    ks = check_ks(ks, "recall_at_k")
    img_rank, txt_rank = retrieval_ranks(zimg, ztxt, img_of_txt, chunk=chunk)
    results = {}
    for k in ks:
        results[f"i2t_recall@{k}"] = float(np.mean(img_rank < k))
        results[f"t2i_recall@{k}"] = float(np.mean(txt_rank < k))
    return results


class RetrievalEvaluator(Evaluator):
    """config.evals.<name> with type='retrieval' (COCO / Flickr30k style).

    Each example holds an image and its captions in text_field: [L] tokens or a string for one
    caption, [K, L] tokens or K strings for K captions (caption_mask_field marks the real ones
    when images have fewer than K). image_id_field merges rows that show the same image.
    """

    TYPE = "retrieval"
    DEFAULTS = {
        "image_field": "image",
        "text_field": "texts",
        "caption_mask_field": None,
        "image_id_field": None,
        "ks": (1, 5, 10),
        "chunk": 4096,
    }

    def __init__(self, name, config=()):
        super().__init__(name, config)
        self.ks = check_ks(self.config["ks"], self.context)

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        zimg, ztxt, img_of_txt = embed_pairs_for(self, data, encoders)
        return recall_at_k(zimg, ztxt, img_of_txt, self.ks, chunk=self.config["chunk"])
