"""Dense-feature probe (evaluate/dense_probe.py): separable features are probed perfectly, random
ones at chance, the fit is a plain ridge regression, and the demo's patches line up with their labels."""

import numpy as np
import pytest

from big_contrast.data.demo import COLOURS
from big_contrast.evaluate.dense_probe import (demo_probe_set, dense_probe, dense_probe_accuracy, embed_patches,
                                               segmentation_metrics, weighted_ridge_predictions)
from big_contrast.evaluate.fewshot import ridge_predictions


def synthetic(rng, images, patches, classes, width, noise):
    """Uniform random labels; tokens = a class direction + Gaussian noise (noise=None: no signal)."""
    labels = rng.integers(0, classes, size=(images, patches))
    if noise is None:
        return rng.normal(size=(images, patches, width)), labels
    directions = rng.normal(size=(classes, width))
    return directions[labels] + noise * rng.normal(size=(images, patches, width)), labels


def test_separable_patch_features_are_probed_perfectly():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(5, 32))
    y_train, y_test = rng.integers(0, 5, size=(60, 16)), rng.integers(0, 5, size=(40, 16))
    x_train = directions[y_train] + 0.1 * rng.normal(size=(60, 16, 32))
    x_test = directions[y_test] + 0.1 * rng.normal(size=(40, 16, 32))
    metrics = dense_probe_accuracy(x_train, y_train, x_test, y_test)
    assert metrics["accuracy"] >= 0.99 and metrics["miou"] >= 0.98 and metrics["mean_class_accuracy"] >= 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_features_are_probed_at_chance(seed):
    rng = np.random.default_rng(seed)
    classes = 4
    x_train, y_train = synthetic(rng, 100, 16, classes, 24, None)
    x_test, y_test = synthetic(rng, 100, 16, classes, 24, None)
    accuracy = dense_probe_accuracy(x_train, y_train, x_test, y_test)["accuracy"]
    chance, n = 1 / classes, y_test.size
    assert abs(accuracy - chance) <= 3 * np.sqrt(chance * (1 - chance) / n)


@pytest.mark.parametrize("balanced", [False, True])
def test_the_fit_is_a_plain_weighted_ridge_regression_on_the_non_held_out_images(balanced):
    rng = np.random.default_rng(3)
    x_train, y_train = synthetic(rng, 20, 6, 3, 8, 1.5)
    y_train[y_train == 2] = rng.integers(0, 2, size=(y_train == 2).sum()) * 2  # imbalanced classes
    x_test, y_test = synthetic(rng, 10, 6, 3, 8, 1.5)
    y_train[0, :2] = -1  # ignored patches
    l2 = 0.7
    metrics = dense_probe_accuracy(x_train, y_train, x_test, y_test, l2_regs=(l2,), holdout_fraction=0.25,
                                   seed=5, normalize=False, balanced=balanced)
    held = np.zeros(20, bool)
    held[np.random.default_rng(5).permutation(20)[:5]] = True
    x, y = x_train[~held].reshape(-1, 8), y_train[~held].reshape(-1)
    x, y = x[y >= 0], y[y >= 0]
    w = 1.0 / np.bincount(y)[y] if balanced else np.ones(len(y))
    w = w * len(w) / w.sum()  # mean 1, as the probe scales them
    targets = 2.0 * np.eye(3)[y] - 1.0
    x_mean, t_mean = w @ x / len(w), w @ targets / len(w)
    xc = x - x_mean
    weights = np.linalg.solve(xc.T @ (w[:, None] * xc) + l2 * np.eye(8), xc.T @ (w[:, None] * (targets - t_mean)))
    predicted = np.argmax((x_test.reshape(-1, 8) - x_mean) @ weights + t_mean, axis=1)
    expected = segmentation_metrics(predicted, y_test.reshape(-1), 3)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["miou"] == pytest.approx(expected["miou"])
    assert metrics["l2"] == l2


def test_unweighted_predictions_are_the_few_shot_probes():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20_000, 12)), rng.integers(0, 4, size=20_000)  # > one 8192-row chunk
    x_eval, l2_regs = rng.normal(size=(9000, 12)), (1e-3, 0.1, 10.0)
    np.testing.assert_array_equal(weighted_ridge_predictions(x, y, x_eval, l2_regs, 4),
                                  ridge_predictions(x, y, x_eval, l2_regs, 4))


def test_segmentation_metrics_against_a_hand_count():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    metrics = segmentation_metrics(predicted, labels, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["foreground_accuracy"] == pytest.approx(2 / 3)
    assert metrics["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert metrics["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)  # IoU 2/3, 1/3, 1/2


def test_embed_patches_calls_with_fixed_batches_and_keeps_the_order():
    images = np.arange(7 * 2 * 2 * 3, dtype=np.float32).reshape(7, 2, 2, 3)
    shapes = []

    def tokens_fn(batch):
        shapes.append(batch.shape)
        return batch.reshape(len(batch), 4, 3) * 2.0

    out = embed_patches(tokens_fn, images, batch_size=3)
    assert shapes == [(3, 2, 2, 3)] * 3
    np.testing.assert_array_equal(out, images.reshape(7, 4, 3) * 2.0)


NOMINAL = np.asarray([*COLOURS.values(), (70, 70, 70)], np.float32) / 127.5 - 1.0  # + a grey background


def nearest_colour_histogram(images_bhwc, patch=8):
    """Per patch: the fraction of its pixels nearest each nominal demo colour (or grey), from the
    pixels alone: the features a perfect colour segmenter would have."""
    b, h, w, _ = images_bhwc.shape
    nearest = np.linalg.norm(images_bhwc[..., None, :] - NOMINAL, axis=-1).argmin(-1)
    one_hot = np.eye(len(NOMINAL))[nearest]
    return one_hot.reshape(b, h // patch, patch, w // patch, patch, -1).mean(axis=(2, 4)).reshape(b, h * w // patch ** 2, -1)


def test_demo_patches_line_up_with_their_labels():
    options = dict(image_size=32, pp="decode|resize(32)|value_range(-1, 1)", grid=4, task="colour",
                   min_coverage=0.3)
    train = demo_probe_set("train", 400, **options)
    test = demo_probe_set("eval", 192, **options)
    assert train[0].shape == (400, 32, 32, 3) and train[1].shape == (400, 16)
    metrics = dense_probe(nearest_colour_histogram, *train, *test, batch_size=64, normalize=False)
    assert metrics["foreground_accuracy"] >= 0.95 and metrics["miou"] >= 0.6 and metrics["accuracy"] >= 0.9
    rolled = (train[0], np.roll(train[1].reshape(-1, 4, 4), 2, axis=2).reshape(-1, 16))  # labels of other patches
    misaligned = dense_probe(nearest_colour_histogram, *rolled, *test, batch_size=64, normalize=False)
    assert misaligned["foreground_accuracy"] < 0.5 and misaligned["miou"] < metrics["miou"] - 0.3


@pytest.mark.parametrize("call, words", [
    (lambda: dense_probe_accuracy(np.zeros((4, 3, 2)), np.zeros((4, 2), int), np.zeros((2, 3, 2)),
                                  np.zeros((2, 3), int)), "one label per patch"),
    (lambda: dense_probe_accuracy(np.zeros((4, 3, 2)), np.zeros((4, 3), int), np.zeros((2, 3, 5)),
                                  np.zeros((2, 3), int)), "width"),
    (lambda: dense_probe_accuracy(np.zeros((1, 3, 2)), np.zeros((1, 3), int), np.zeros((2, 3, 2)),
                                  np.zeros((2, 3), int)), "holdout_fraction"),
    (lambda: demo_probe_set("eval", 4, image_size=32, pp="decode|random_resized_crop(32)", grid=4),
     "move patches"),
])
def test_bad_inputs_fail_with_one_sentence(call, words):
    with pytest.raises(ValueError, match=words) as error:
        call()
    assert "\n" not in str(error.value) and str(error.value).endswith(".")
