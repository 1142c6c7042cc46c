"""recall_at_k against a brute-force numpy ranking (stable argsort), with ties and several captions."""
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.evaluate.retrieval import recall_at_k, retrieval_ranks
from conftest import unit


def brute_force_recall(zimg, ztxt, img_of_txt, ks):
    """Rank with np.argsort(-scores, kind='stable') over the full similarity matrix."""
    scores = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
    i2t_first_hit = np.array([
        np.flatnonzero(img_of_txt[np.argsort(-scores[i], kind="stable")] == i)[0] for i in range(len(zimg))])
    t2i_first_hit = np.array([
        np.flatnonzero(np.argsort(-scores[:, t], kind="stable") == img_of_txt[t])[0] for t in range(len(ztxt))])
    out = {}
    for k in ks:
        out[f"i2t_recall@{k}"] = float(np.mean(i2t_first_hit < k))
        out[f"t2i_recall@{k}"] = float(np.mean(t2i_first_hit < k))
    return out


def pessimistic_recall(zimg, ztxt, img_of_txt, ks):
    """Recall if every tie went against the positive (used to show a test has ties)."""
    scores = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
    positive = img_of_txt[None, :] == np.arange(len(zimg))[:, None]
    best_i = np.where(positive, scores, -np.inf).max(1)
    i2t_rank = ((scores >= best_i[:, None]) & ~positive).sum(1)
    t2i_rank = ((scores >= scores[img_of_txt, np.arange(len(ztxt))][None, :]) & ~positive).sum(0)
    return {f"{d}_recall@{k}": float(np.mean(r < k)) for k in ks for d, r in (("i2t", i2t_rank), ("t2i", t2i_rank))}


def shuffled_captions(rng, n_img, max_captions):
    """Every image gets 1..max_captions captions, stored in a random order (positives spread over tiles)."""
    counts = rng.integers(1, max_captions + 1, size=n_img)
    return rng.permutation(np.repeat(np.arange(n_img), counts))


# Tests share tile shapes (chunk 7, D 8) so the tile function compiles once.
@pytest.mark.parametrize("seed, chunks", [(0, (7, 4096)), (1, (7,))])
def test_random_embeddings_several_captions(seed, chunks):
    rng = np.random.default_rng(100 + seed)
    n_img, dim = 23, 8
    img_of_txt = shuffled_captions(rng, n_img, 5)
    zimg = unit(rng.normal(size=(n_img, dim))).astype(np.float32)
    # Captions near their image so recall is neither 0 nor 1.
    ztxt = unit(zimg[img_of_txt] + 0.9 * rng.normal(size=(len(img_of_txt), dim))).astype(np.float32)
    ks = (1, 2, 5, 10, 100)
    expected = brute_force_recall(zimg, ztxt, img_of_txt, ks)
    assert 0 < expected["i2t_recall@1"] < 1 and 0 < expected["t2i_recall@1"] < 1
    for chunk in chunks:  # tiles not dividing the sets, and one tile for everything
        got = recall_at_k(zimg, ztxt, img_of_txt, ks, chunk=chunk)
        assert got == pytest.approx(expected, abs=1e-12)


def test_ties_follow_stable_argsort():
    """Embeddings from a tiny dyadic alphabet: dot products are exact, so ties are exact and many."""
    rng = np.random.default_rng(7)
    n_img = 19
    img_of_txt = shuffled_captions(rng, n_img, 4)
    zimg = rng.integers(-1, 2, size=(n_img, 8)).astype(np.float32) / 2
    zimg[5] = zimg[2]  # duplicated images
    zimg[11] = zimg[2]
    ztxt = rng.integers(-1, 2, size=(len(img_of_txt), 8)).astype(np.float32) / 2
    ztxt[::3] = ztxt[0]  # many identical captions
    ks = (1, 3, 5, 10)
    expected = brute_force_recall(zimg, ztxt, img_of_txt, ks)
    # The data does exercise ties: breaking them against the positive gives other numbers.
    assert pessimistic_recall(zimg, ztxt, img_of_txt, ks) != pytest.approx(expected)
    for chunk in (7,):
        assert recall_at_k(zimg, ztxt, img_of_txt, ks, chunk=chunk) == pytest.approx(expected, abs=1e-12)


def test_tie_with_lower_index_ranks_first():
    # Image 0 and image 1 are identical; caption 0 belongs to image 1, caption 1 to image 0.
    zimg = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    ztxt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    img_of_txt = np.array([1, 0, 2])
    img_rank, txt_rank = retrieval_ranks(zimg, ztxt, img_of_txt)
    # Caption 0 -> image 1: image 0 ties and has the lower index, so it comes first: rank 1.
    # Caption 1 -> image 0: rank 0. Image 1 -> caption 0 (index 0, the first of the tie): rank 0.
    np.testing.assert_array_equal(txt_rank, [1, 0, 0])
    np.testing.assert_array_equal(img_rank, [1, 0, 0])


def test_one_caption_per_image_and_jax_inputs():
    rng = np.random.default_rng(3)
    zimg = unit(rng.normal(size=(30, 8))).astype(np.float32)
    ztxt = unit(zimg + rng.normal(size=(30, 8))).astype(np.float32)
    img_of_txt = np.arange(30)
    expected = brute_force_recall(zimg, ztxt, img_of_txt, (1, 5, 10))
    got = recall_at_k(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray(img_of_txt), chunk=7)
    assert set(got) == {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert got == pytest.approx(expected, abs=1e-12)


def test_bad_inputs():
    z = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(z, z[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(z, z, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="one image index per caption"):
        recall_at_k(z, z, np.array([0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        recall_at_k(z * np.nan, z, np.arange(3))
    with pytest.raises(ValueError, match="positive integers"):
        recall_at_k(z, z, np.arange(3), ks=(0,))
