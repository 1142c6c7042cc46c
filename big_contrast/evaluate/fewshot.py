"""Few-shot linear probe: closed-form ridge regression on frozen, L2-normalised image features.

big_vision's `fewshot_lsr` idea: for k in `shots` (1, 5, 10, 25), draw k train images per class
with a fixed seed, fit a least-squares regressor to the ±1 one-hot targets (`2·onehot − 1`),
and report top-1 on the test split. Features and targets are centred on the shot set (an
unregularised bias); the weights are `W = (XᵀX + λI)⁻¹ XᵀY`, solved for every λ of the grid
from one eigendecomposition of `XᵀX`. λ is chosen on a held-out part of the train split
(`holdout_per_class` other train images per class, never among the shots); ties go to the
larger λ. The shot sets are nested (the 5-shot set contains the 1-shot one), as in big_vision.

    config.evals.fewshot = dict(type="fewshot", label_field="label",
                                train_data=dict(sources={"train": ...}, label_keys=("label",)),
                                data=dict(sources={"test": ...}, label_keys=("label",)))

`evaluate(data, encoders)` takes `{'train_data': batches, 'data': batches}` (what the trainer's
glue passes: one pass of each split), or precomputed features through `fewshot_accuracy`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator, l2_normalize
from big_contrast.evaluate.embed import embed_dataset

DEFAULT_L2_REGS = tuple(float(2.0 ** p) for p in range(-10, 20))


def draw_shots(labels: np.ndarray, shots: int, holdout: int, seed: int,
               num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices `[C, shots]` of the shot images and `[C * holdout]` of the held-out ones.

    Each class's train images are permuted with one seeded generator; the first `shots` are the
    shots (so a smaller k takes a prefix) and the next `holdout` are held out for choosing λ.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    shot_rows, holdout_rows = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots + holdout:
            raise ConfigError(
                f"class {c} has {len(members)} train images; a {shots}-shot probe with {holdout} held out per "
                f"class needs {shots + holdout}: use a larger train split or fewer shots / holdout_per_class")
        members = rng.permutation(members)
        shot_rows.append(members[:shots])
        holdout_rows.append(members[shots:shots + holdout])
    return np.stack(shot_rows), np.concatenate(holdout_rows)


def _targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return 2.0 * np.eye(num_classes)[labels] - 1.0


def ridge_predictions(x_train, y_train, x_eval, l2_regs: Sequence[float], num_classes: int) -> np.ndarray:
    """Predicted classes `[len(l2_regs), n_eval]` of ridge regressors fit for every λ."""
    x = np.asarray(x_train, np.float64)
    x_mean = x.mean(0)
    targets = _targets(np.asarray(y_train), num_classes)
    y_mean = targets.mean(0)
    xc, yc = x - x_mean, targets - y_mean
    eigvals, eigvecs = np.linalg.eigh(xc.T @ xc)
    projected = eigvecs.T @ (xc.T @ yc)                      # [D, C]
    x_eval_c = (np.asarray(x_eval, np.float64) - x_mean) @ eigvecs
    predictions = []
    for l2 in l2_regs:
        scores = x_eval_c @ (projected / (np.maximum(eigvals, 0.0) + l2)[:, None]) + y_mean
        predictions.append(np.argmax(scores, axis=1))
    return np.stack(predictions)


def fewshot_accuracy(zimg_train, labels_train, zimg_test, labels_test, *, shots: Sequence[int] = (1, 5, 10, 25),
                     l2_regs: Sequence[float] = DEFAULT_L2_REGS, seed: int = 0,
                     holdout_per_class: int = 5) -> dict[str, float]:
    """{'<k>shot': top-1 on the test set, '<k>shot_l2': the λ chosen on the held-out images}."""
    x_train, x_test = l2_normalize(zimg_train), l2_normalize(zimg_test)
    y_train = np.asarray(labels_train).astype(np.int64).reshape(-1)
    y_test = np.asarray(labels_test).astype(np.int64).reshape(-1)
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ValueError(f"few-shot: {len(x_train)}/{len(x_test)} train/test features but "
                         f"{len(y_train)}/{len(y_test)} labels")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    l2_regs = tuple(sorted(float(l) for l in l2_regs))
    shot_sets, holdout = draw_shots(y_train, max(shots), holdout_per_class, seed, num_classes)
    results = {}
    for k in sorted(set(int(s) for s in shots)):
        rows = shot_sets[:, :k].reshape(-1)
        predictions = ridge_predictions(x_train[rows], y_train[rows], np.concatenate([x_train[holdout], x_test]),
                                        l2_regs, num_classes)
        held_out_acc = (predictions[:, :len(holdout)] == y_train[holdout]).mean(1)
        best = len(l2_regs) - 1 - int(np.argmax(held_out_acc[::-1]))  # ties -> the larger λ
        results[f"{k}shot"] = float((predictions[best, len(holdout):] == y_test).mean())
        results[f"{k}shot_l2"] = l2_regs[best]
    return results


class FewShotEvaluator(Evaluator):
    """config.evals.<name> with type='fewshot': `train_data` and `data` (the test split) select
    the data like every evaluator's `data`; both need an int label field."""

    TYPE = "fewshot"
    DATA_KEYS = ("train_data", "data")
    DEFAULTS = {
        "train_data": None,
        "image_field": "image",
        "label_field": "label",
        "shots": (1, 5, 10, 25),
        "l2_regs": DEFAULT_L2_REGS,
        "seed": 0,
        "holdout_per_class": 5,
    }

    def __init__(self, name, config=()):
        super().__init__(name, config)
        shots = tuple(int(k) for k in self.config["shots"])
        if not shots or min(shots) < 1 or self.config["holdout_per_class"] < 1:
            raise ConfigError(f"{self.context}: shots must be positive integers and holdout_per_class >= 1; got "
                             f"{shots} and {self.config['holdout_per_class']}.")
        if not self.config["l2_regs"] or min(self.config["l2_regs"]) <= 0:
            raise ConfigError(f"{self.context}: l2_regs must be a non-empty list of positive numbers.")
        self.shots = shots

    def _features(self, data, encoders: Encoders):
        cfg = self.config
        out = embed_dataset(data, {"zimg": (cfg["image_field"], encoders.embed_images)}, batch_size=self.batch_size,
                            keep=[cfg["label_field"]], mesh=encoders.mesh, batch_axes=encoders.batch_axes,
                            context=self.context)
        return out["zimg"], out[cfg["label_field"]]

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        if set(data) != set(self.DATA_KEYS):
            raise ConfigError(f"{self.context}: pass the data as {{'train_data': ..., 'data': ...}} (train and test "
                             f"split); got keys {sorted(data)}.")
        zimg_train, labels_train = self._features(data["train_data"], encoders)
        zimg_test, labels_test = self._features(data["data"], encoders)
        return fewshot_accuracy(zimg_train, labels_train, zimg_test, labels_test, shots=self.shots,
                                l2_regs=self.config["l2_regs"], seed=int(self.config["seed"]),
                                holdout_per_class=int(self.config["holdout_per_class"]))
