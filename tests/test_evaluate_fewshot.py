"""Few-shot ridge probe: separable features, random labels, and a plain numpy closed form."""

import numpy as np
import pytest

from big_contrast import evaluate
from big_contrast.evaluate.fewshot import DEFAULT_L2_REGS, draw_shots, fewshot_accuracy
from conftest import unit

C, D = 5, 16


def separable(n_per_class, seed):
    """Features near one of C orthogonal directions, by class: linearly separable by construction."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(C), n_per_class)
    features = 3.0 * np.eye(D)[labels] + 0.3 * rng.normal(size=(len(labels), D))
    return features, labels


def reference_accuracy(x_train, y_train, x_test, y_test, rows, l2):
    """W = (XᵀX + λI)⁻¹ XᵀY on centred features and ±1 targets, by np.linalg.solve."""
    x, t = unit(x_train)[rows], 2.0 * np.eye(C)[y_train[rows]] - 1.0
    x_mean, t_mean = x.mean(0), t.mean(0)
    w = np.linalg.solve((x - x_mean).T @ (x - x_mean) + l2 * np.eye(D), (x - x_mean).T @ (t - t_mean))
    predictions = np.argmax((unit(x_test) - x_mean) @ w + t_mean, axis=1)
    return float(np.mean(predictions == y_test))


def test_separable_features_are_learned_from_one_shot():
    x_train, y_train = separable(40, seed=0)
    x_test, y_test = separable(60, seed=1)
    results = fewshot_accuracy(x_train, y_train, x_test, y_test, shots=(1, 5, 10, 25), seed=3)
    for k in (1, 5, 10, 25):
        assert results[f"{k}shot"] >= 0.99, results


def test_random_labels_are_at_chance():
    rng = np.random.default_rng(5)
    x_train, y_train = rng.normal(size=(400, D)), rng.integers(0, C, 400)
    n_test = 3000
    x_test, y_test = rng.normal(size=(n_test, D)), rng.integers(0, C, n_test)
    results = fewshot_accuracy(x_train, y_train, x_test, y_test, shots=(10, 25), seed=0)
    sigma = np.sqrt((1 / C) * (1 - 1 / C) / n_test)
    for k in (10, 25):
        assert abs(results[f"{k}shot"] - 1 / C) <= 3 * sigma, results


def test_equals_numpy_closed_form_and_the_held_out_choice_of_l2():
    x_train, y_train = separable(30, seed=7)
    rng = np.random.default_rng(8)
    y_train = np.where(rng.random(len(y_train)) < 0.3, rng.integers(0, C, len(y_train)), y_train)  # label noise
    x_test, y_test = separable(30, seed=9)
    l2_regs = (1e-3, 0.1, 1.0, 10.0, 100.0)
    results = fewshot_accuracy(x_train, y_train, x_test, y_test, shots=(5, 10), l2_regs=l2_regs, seed=2,
                               holdout_per_class=4)
    shots, holdout = draw_shots(y_train, 10, 4, seed=2, num_classes=C)
    for k in (5, 10):
        rows = shots[:, :k].reshape(-1)
        held_out = [reference_accuracy(x_train, y_train, x_train[holdout], y_train[holdout], rows, l2)
                    for l2 in l2_regs]
        best = max(i for i, acc in enumerate(held_out) if acc == max(held_out))  # ties -> larger λ
        assert results[f"{k}shot_l2"] == l2_regs[best]
        assert results[f"{k}shot"] == pytest.approx(
            reference_accuracy(x_train, y_train, x_test, y_test, rows, l2_regs[best]), abs=1e-12)
    # Shots are nested, disjoint from the held-out images, and fixed by the seed.
    assert not set(shots.reshape(-1)) & set(holdout)
    np.testing.assert_array_equal(draw_shots(y_train, 10, 4, seed=2, num_classes=C)[0], shots)


def test_evaluator_embeds_train_and_test_splits_and_reports_bad_inputs():
    x_train, y_train = separable(12, seed=0)
    x_test, y_test = separable(10, seed=1)
    encoders = evaluate.Encoders(lambda x: np.asarray(x), lambda x: np.asarray(x))
    evaluator = evaluate.build_evaluator("probe", dict(type="fewshot", shots=(1, 5), batch_size=8))
    results = evaluator.run({"train_data": {"image": x_train, "label": y_train},
                             "data": {"image": x_test, "label": y_test}}, encoders)
    assert set(results) == {"probe/1shot", "probe/5shot", "probe/1shot_l2", "probe/5shot_l2"}
    assert results["probe/5shot"] >= 0.99
    assert results["probe/1shot_l2"] in DEFAULT_L2_REGS
    with pytest.raises(ValueError, match=r"class 0 has 12 train images; a 10-shot probe with 5 held out"):
        evaluate.build_evaluator("probe", dict(type="fewshot", shots=(10,))).run(
            {"train_data": {"image": x_train, "label": y_train}, "data": {"image": x_test, "label": y_test}}, encoders)
    with pytest.raises(ValueError, match="shots must be positive integers"):
        evaluate.build_evaluator("probe", dict(type="fewshot", shots=(0,)))
    with pytest.raises(ValueError, match=r"pass the data as \{'train_data'"):
        evaluator.run({"image": x_test, "label": y_test}, encoders)
