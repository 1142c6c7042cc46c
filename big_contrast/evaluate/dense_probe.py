"""Dense-feature probe: per-patch segmentation accuracy of a linear probe on frozen patch tokens.

SigLIP 2's self-distillation (SILC) and masked prediction (TIPS) terms are there for the
image tower's *patch* features; a zero-shot or retrieval score, read from the pooled feature,
barely sees them. This probe measures them directly: a closed-form ridge regressor (the
few-shot probe's, `fewshot.ridge_predictions`: ±1 one-hot targets, centred, every λ from one
eigendecomposition; here with class-balanced row weights) maps each frozen patch token to the
label of that patch -- background or the class of the shape covering it on the demo data
(`data.demo.demo_patch_labels`) -- and scores the test patches.

    tokens_fn = lambda images_bhwc: patch_tokens_bpd         # the tower's un-pooled tokens
    metrics = dense_probe(tokens_fn, train_images, train_labels_np, test_images, test_labels_np)

Metrics: `accuracy` (all patches), `foreground_accuracy` (patches whose label is not 0, the
background: most demo patches are background, so `accuracy` alone flatters a probe that
finds no shape), `mean_class_accuracy` (mean per-class recall), `miou` (mean intersection over
union over the classes that occur), `majority` (the accuracy of always answering the most
frequent train class: the floor to beat) and `l2` (the λ chosen). Labels < 0 are ignored
(padding). λ is chosen by mIoU on `holdout_fraction` of the train *images* (never patches of a
fitted image, which would leak), ties to the larger λ; the regressor is fit on the other train
images. Segmentation probes are usually trained by SGD with a cross-entropy loss (e.g. linear
heads on ADE20k); a closed form is deterministic, needs no tuning and runs in seconds: a proxy
for comparing features, not a published protocol.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import l2_normalize
from big_contrast.evaluate.fewshot import DEFAULT_L2_REGS

PROBE_SAFE_OPS = ("decode", "resize", "value_range", "normalize")


def _flat(tokens_npd, labels_np, normalize: bool, context: str):
    tokens_npd, labels_np = np.asarray(tokens_npd), np.asarray(labels_np)
    if tokens_npd.ndim != 3 or labels_np.shape != tokens_npd.shape[:2]:
        raise ValueError(f"dense probe: {context} tokens {tokens_npd.shape} and labels {labels_np.shape} must be "
                         "[N, P, D] and [N, P] (one label per patch token; drop a class token first).")
    x = l2_normalize(tokens_npd) if normalize else tokens_npd.astype(np.float32)
    return x, labels_np.astype(np.int64)


def _holdout_images(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """bool [N]: the train images that choose λ."""
    count = int(round(num_images * fraction))
    if not 0 < count < num_images:
        raise ConfigError(f"dense probe: holdout_fraction={fraction} of {num_images} train images leaves no "
                          "image to hold out or none to fit; use more train images or another fraction.")
    held = np.zeros(num_images, bool)
    held[np.random.default_rng(seed).permutation(num_images)[:count]] = True
    return held


def segmentation_metrics(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, foreground accuracy, mean per-class recall and mIoU of flat patch predictions."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_c, predicted_c, hits_c = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    present = true_c > 0
    union_c = true_c + predicted_c - hits_c
    foreground = labels != 0
    return {
        "accuracy": float(hits_c.sum() / max(labels.size, 1)),
        "foreground_accuracy": float((predicted[foreground] == labels[foreground]).mean()) if foreground.any()
        else float("nan"),
        "mean_class_accuracy": float((hits_c[present] / true_c[present]).mean()),
        "miou": float((hits_c[union_c > 0] / union_c[union_c > 0]).mean()),
    }


def _chunks(n: int, size: int = 8192):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def weighted_ridge_predictions(x_train, y_train, x_eval, l2_regs: Sequence[float], num_classes: int,
                               weights=None) -> np.ndarray:
    """Predicted classes [len(l2_regs), n_eval] of ridge regressors to ±1 one-hot targets with
    per-row `weights` (None: uniform, the few-shot probe's `ridge_predictions`), every λ from one
    eigendecomposition. Minimises Σ_i w_i |x_i W + b - t_i|² + λ|W|² with the weights scaled to
    mean 1 (so λ means what it means for the few-shot probe) and b unregularised: the weighted
    means centre x and t. Accumulated over row chunks in float64, so a probe over
    10^5-10^6 patches never holds a centred float64 copy of its features."""
    n, width = x_train.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64) * (n / np.sum(weights))
    targets = 2.0 * np.eye(num_classes)[y_train] - 1.0
    x_mean, t_mean = np.zeros(width), (w @ targets) / n
    gram, cross = np.zeros((width, width)), np.zeros((width, num_classes))
    for rows in _chunks(n):
        xw = np.asarray(x_train[rows], np.float64) * w[rows, None]
        x_mean += xw.sum(0) / n
        gram += xw.T @ np.asarray(x_train[rows], np.float64)
        cross += xw.T @ targets[rows]
    gram -= n * np.outer(x_mean, x_mean)           # Σ w (x - x̄)(x - x̄)ᵀ, x̄ = Σ w x / n
    cross -= n * np.outer(x_mean, t_mean)          # Σ w (x - x̄)(t - t̄)ᵀ
    eigvals, eigvecs = np.linalg.eigh(gram)
    projected = eigvecs.T @ cross                  # [D, C]
    # every λ's weights side by side [D, Λ·C]: one wide matmul per chunk instead of Λ skinny ones
    shrink = np.maximum(eigvals, 0.0)[:, None] + np.asarray(l2_regs, np.float64)[None, :]   # [D, Λ]
    weights_dlc = (projected[:, None, :] / shrink[:, :, None]).reshape(width, -1)
    out = np.zeros((len(l2_regs), len(x_eval)), np.int64)
    for rows in _chunks(len(x_eval)):
        x_eval_c = (np.asarray(x_eval[rows], np.float64) - x_mean) @ eigvecs
        scores_nlc = (x_eval_c @ weights_dlc).reshape(len(x_eval_c), len(l2_regs), num_classes) + t_mean
        out[:, rows] = np.argmax(scores_nlc, axis=2).T
    return out


def _class_weights(labels: np.ndarray, balanced: bool):
    """Row weights giving every present class the same total weight (None: uniform)."""
    if not balanced:
        return None
    return 1.0 / np.bincount(labels)[labels]


def dense_probe_accuracy(tokens_train, labels_train, tokens_test, labels_test, *,
                         l2_regs: Sequence[float] = DEFAULT_L2_REGS, holdout_fraction: float = 0.2,
                         seed: int = 0, normalize: bool = True, balanced: bool = True) -> dict[str, float]:
    """The probe on precomputed tokens: `tokens_*` [N, P, D], `labels_*` int [N, P] (< 0: ignored).

    `balanced`: every class weighs the same in the fit (background patches outnumber a demo
    colour's ~100 to 1, and an unweighted least-squares probe then rarely answers a colour).
    λ is the one with the best held-out mIoU."""
    x_train, y_train = _flat(tokens_train, labels_train, normalize, "train")
    x_test, y_test = _flat(tokens_test, labels_test, normalize, "test")
    if x_train.shape[2] != x_test.shape[2]:
        raise ValueError(f"dense probe: train tokens have width {x_train.shape[2]}, test tokens {x_test.shape[2]}.")
    held = _holdout_images(len(x_train), holdout_fraction, seed)
    fit_rows, held_rows = (y_train[~held] >= 0), (y_train[held] >= 0)
    x_fit, y_fit = x_train[~held][fit_rows], y_train[~held][fit_rows]
    x_held, y_held = x_train[held][held_rows], y_train[held][held_rows]
    x_eval, y_eval = x_test[y_test >= 0], y_test[y_test >= 0]
    if not len(y_fit) or not len(y_held) or not len(y_eval):
        raise ConfigError("dense probe: every label of the fit, held-out or test images is negative (ignored).")
    num_classes = int(max(y_fit.max(), y_held.max(), y_eval.max())) + 1
    l2_regs = tuple(sorted(float(l) for l in l2_regs))
    if not l2_regs or l2_regs[0] <= 0:
        raise ConfigError(f"dense probe: l2_regs={l2_regs} must be a non-empty list of positive numbers.")
    predictions = weighted_ridge_predictions(x_fit, y_fit, np.concatenate([x_held, x_eval]), l2_regs,
                                             num_classes, _class_weights(y_fit, balanced))
    held_miou = [segmentation_metrics(p[:len(y_held)], y_held, num_classes)["miou"] for p in predictions]
    best = len(l2_regs) - 1 - int(np.argmax(held_miou[::-1]))  # ties -> the larger λ
    metrics = segmentation_metrics(predictions[best, len(y_held):], y_eval, num_classes)
    metrics["majority"] = float((y_eval == np.bincount(y_fit).argmax()).mean())
    metrics["l2"] = l2_regs[best]
    return metrics


def embed_patches(tokens_fn: Callable, images_nhwc, batch_size: int) -> np.ndarray:
    """float32 [N, P, D]: `tokens_fn` over `images_nhwc` in batches of exactly `batch_size` (the
    last one padded by repeating its final image, so a jitted function compiles once)."""
    images_nhwc = np.asarray(images_nhwc)
    if batch_size < 1 or not len(images_nhwc):
        raise ConfigError(f"dense probe: batch_size={batch_size} must be >= 1 and there must be images.")
    out = []
    for start in range(0, len(images_nhwc), batch_size):
        batch = images_nhwc[start:start + batch_size]
        valid = len(batch)
        if valid < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, axis=0)])
        out.append(np.asarray(tokens_fn(batch), np.float32)[:valid])
    return np.concatenate(out)


def dense_probe(tokens_fn: Callable, train_images, train_labels, test_images, test_labels, *,
                batch_size: int = 64, **probe_options) -> dict[str, float]:
    """Embeds both splits' images with `tokens_fn` (images [B, H, W, 3] -> tokens [B, P, D]) and
    runs `dense_probe_accuracy` (its keyword options pass through)."""
    tokens_train = embed_patches(tokens_fn, train_images, batch_size)
    tokens_test = embed_patches(tokens_fn, test_images, batch_size)
    return dense_probe_accuracy(tokens_train, train_labels, tokens_test, test_labels, **probe_options)


def demo_probe_set(split: str, size: int, *, image_size: int, pp: str, grid: int, task: str = "shape",
                   min_coverage: float = 0.5, **source_options) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, 3], labels int32 [N, grid * grid]) of the first `size` demo examples of
    `split`, preprocessed by `pp` (which must not crop or flip: the labels' grid spans the whole
    image), with `demo_patch_labels` for `task`."""
    from big_contrast.data.demo import demo_patch_labels, demo_source
    from big_contrast.data.image_ops import parse_image_pp

    pipeline = parse_image_pp(pp)
    moving = [name for name, _ in pipeline.ops if name not in PROBE_SAFE_OPS]
    if moving:
        raise ConfigError(f"dense probe: pp {pp!r} uses {moving}, which move patches away from their labels; "
                          f"use only {PROBE_SAFE_OPS} (e.g. 'decode|resize(S)|value_range(-1, 1)').")
    source = demo_source(split, size, image_size, **source_options)
    images = np.stack([pipeline(source[i]["image"], np.random.default_rng(i)) for i in range(size)])
    labels = np.stack([demo_patch_labels(source, i, grid, task, min_coverage).reshape(-1) for i in range(size)])
    return images, labels
