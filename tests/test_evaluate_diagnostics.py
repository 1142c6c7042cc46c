"""Alignment, uniformity, modality gap and mean logits against brute-force numpy."""
import itertools

import numpy as np
import pytest

from big_contrast.evaluate.diagnostics import (
    alignment, embedding_diagnostics, mean_pair_scores, modality_gap, uniformity)
from conftest import unit


def brute_force_uniformity(z, t=2.0):
    pairs = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i, j in itertools.combinations(range(len(z)), 2)]
    return float(np.log(np.mean(pairs)))


def brute_force_pair_means(zimg, ztxt, img_of_txt, scale, bias):
    logits = scale * zimg.astype(np.float64) @ ztxt.astype(np.float64).T + bias
    positive = img_of_txt[None, :] == np.arange(len(zimg))[:, None]
    return logits[positive].mean(), logits[~positive].mean()


@pytest.fixture
def paired_set():
    """17 images, 1-3 captions each in shuffled order, captions near their image."""
    rng = np.random.default_rng(31)
    img_of_txt = rng.permutation(np.repeat(np.arange(17), rng.integers(1, 4, size=17)))
    zimg = unit(rng.normal(size=(17, 8)) + 0.5).astype(np.float32)  # off-centre: a real modality gap
    ztxt = unit(zimg[img_of_txt] + 0.8 * rng.normal(size=(len(img_of_txt), 8)) - 0.5).astype(np.float32)
    return zimg, ztxt, img_of_txt


def test_alignment(paired_set):
    zimg, ztxt, img_of_txt = paired_set
    expected = np.mean([np.sum((zimg[i] - ztxt[t]) ** 2) for t, i in enumerate(img_of_txt)])
    assert alignment(zimg, ztxt, img_of_txt) == pytest.approx(expected, rel=1e-6)
    assert alignment(zimg, zimg[[1, 0] + list(range(2, 17))]) == pytest.approx(
        np.sum((zimg[0] - zimg[1]) ** 2) * 2 / 17, rel=1e-6)


@pytest.mark.parametrize("chunk", [5, 4096])
def test_uniformity_with_duplicates(paired_set, chunk):
    zimg, ztxt, _ = paired_set
    z = np.concatenate([ztxt, ztxt[:4]])  # exact duplicates: pairs at distance 0 count too
    assert uniformity(z, chunk=chunk) == pytest.approx(brute_force_uniformity(z), abs=2e-6)
    assert uniformity(zimg, t=0.5, chunk=chunk) == pytest.approx(brute_force_uniformity(zimg, 0.5), abs=2e-6)


def test_modality_gap(paired_set):
    zimg, ztxt, _ = paired_set
    expected = np.sqrt(np.sum((zimg.mean(0) - ztxt.mean(0)) ** 2))
    assert expected > 0.1
    assert modality_gap(zimg, ztxt) == pytest.approx(expected, rel=1e-6)


def test_mean_positive_and_negative_logits(paired_set):
    zimg, ztxt, img_of_txt = paired_set
    for scale, bias in ((1.0, 0.0), (10.0, -10.0)):
        expected = brute_force_pair_means(zimg, ztxt, img_of_txt, scale, bias)
        assert mean_pair_scores(zimg, ztxt, img_of_txt, scale=scale, bias=bias) == pytest.approx(expected, abs=1e-5)


def test_all_diagnostics_together(paired_set):
    zimg, ztxt, img_of_txt = paired_set
    got = embedding_diagnostics(zimg, ztxt, img_of_txt, scale=10.0, bias=-10.0, chunk=5)
    pos, neg = brute_force_pair_means(zimg, ztxt, img_of_txt, 10.0, -10.0)
    pos_cos, neg_cos = brute_force_pair_means(zimg, ztxt, img_of_txt, 1.0, 0.0)
    assert got == pytest.approx({
        "alignment": np.mean(np.sum((zimg[img_of_txt] - ztxt) ** 2, axis=1)),
        "uniformity_img": brute_force_uniformity(zimg),
        "uniformity_txt": brute_force_uniformity(ztxt),
        "modality_gap": np.linalg.norm(zimg.mean(0) - ztxt.mean(0)),
        "pos_cosine": pos_cos, "neg_cosine": neg_cos, "pos_logit": pos, "neg_logit": neg,
    }, abs=1e-5)
    assert "pos_logit" not in embedding_diagnostics(zimg, ztxt, img_of_txt)


def test_bad_inputs():
    z = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="at least two"):
        uniformity(z[:1])
    with pytest.raises(ValueError, match="map each of the"):
        alignment(z, z, np.array([0, 1]))
