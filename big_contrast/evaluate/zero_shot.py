"""Zero-shot classification: class names x prompt templates -> a linear classifier -> top-k accuracy.

The classifier is CLIP's: each prompt is embedded and L2-normalised, the T prompt embeddings of a
class are averaged, and the mean is normalised again (open_clip `build_zero_shot_classifier`).
An image is classified by the dot product of its normalised embedding with each class row.

Ties between class scores are broken towards the lower class index (the order of
`np.argsort(-logits, kind="stable")`); it matters for ImageNet, whose standard name list names
two pairs of classes identically (see imagenet_classes.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate import prompts
from big_contrast.evaluate.base import Encoders, Evaluator, check_ks, l2_normalize
from big_contrast.evaluate.embed import embed_dataset


def classifier_from_prompt_embeddings(ztxt_ctd: np.ndarray) -> np.ndarray:
    """[C classes, T templates, D] prompt embeddings -> [C, D] classifier rows (unit norm)."""
    ztxt_ctd = l2_normalize(ztxt_ctd)
    return l2_normalize(ztxt_ctd.mean(axis=1))


def build_classifier(
    class_names: Sequence[str],
    templates: Sequence[str],
    encoders: Encoders,
    *,
    batch_size: int,
    context: str = "zero-shot classifier",
) -> np.ndarray:
    """Embed every (class, template) prompt and return the [C, D] zero-shot classifier."""
    templates = prompts.resolve_templates(templates)
    class_names = prompts.resolve_class_names(class_names)
    if encoders.tokenize is None:
        raise ConfigError(f"{context}: zero-shot classification needs Encoders(tokenize=...) for the prompts.")
    tokens = np.asarray(encoders.tokenize(prompts.build_prompts(class_names, templates)), np.int32)
    out = embed_dataset({"prompt": tokens}, {"ztxt": ("prompt", encoders.embed_texts)}, batch_size=batch_size,
                        mesh=encoders.mesh, batch_axes=encoders.batch_axes, context=context)
    ztxt = np.asarray(out["ztxt"], np.float32)
    return classifier_from_prompt_embeddings(ztxt.reshape(len(class_names), len(templates), -1))


@jax.jit
def _class_ranks_chunk(zimg_nd, classifier_cd, labels_n):
    logits_nc = jnp.dot(zimg_nd, classifier_cd.T, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    true_n = jnp.take_along_axis(logits_nc, labels_n[:, None], axis=1)
    class_index = jnp.arange(logits_nc.shape[1])[None, :]
    before = (logits_nc > true_n) | ((logits_nc == true_n) & (class_index < labels_n[:, None]))
    return before.sum(axis=1, dtype=jnp.int32)


def class_ranks(zimg, classifier, labels, *, chunk: int = 4096) -> np.ndarray:
    """0-based rank of the true class of every image (number of classes ordered before it)."""
    zimg = np.asarray(zimg, np.float32)
    classifier = np.asarray(classifier, np.float32)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    num_classes = len(classifier)
    if len(labels) != len(zimg):
        raise ValueError(f"Got {len(zimg)} image embeddings but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"Labels must lie in [0, {num_classes}) for {num_classes} class names; got min "
                         f"{labels.min()}, max {labels.max()}. Check the class-name list matches the dataset.")
    ranks = []
    for start in range(0, len(zimg), chunk):
        stop = min(start + chunk, len(zimg))
        # Pad the last chunk so every call has the same shape (one compilation).
        pad = chunk - (stop - start) if len(zimg) > chunk else 0
        zimg_chunk = np.pad(zimg[start:stop], ((0, pad), (0, 0)))
        labels_chunk = np.pad(labels[start:stop], (0, pad))
        ranks.append(np.asarray(_class_ranks_chunk(zimg_chunk, classifier, labels_chunk))[:stop - start])
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int32)


def effective_ks(ks: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """ks clamped to the number of classes, duplicates removed (top-5 of 3 classes is reported as top3)."""
    return tuple(sorted({min(int(k), num_classes) for k in ks}))


def topk_accuracy(zimg, classifier, labels, ks: Sequence[int] = (1, 5), *, chunk: int = 4096) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: fraction of images whose true class is among the k best.

    k larger than the number of classes C is clamped to C and named after it ('top3' for 3
    classes), so no metric is silently always 1 under a misleading name.
    """
    ranks = class_ranks(zimg, classifier, labels, chunk=chunk)
    if not len(ranks):
        raise ConfigError("No images to classify; the evaluation set is empty.")
    return {f"top{k}": float(np.mean(ranks < k)) for k in effective_ks(ks, len(np.asarray(classifier)))}


class ZeroShotEvaluator(Evaluator):
    """config.evals.<name> with type='zero_shot'.

    class_names: list | 'imagenet' | 'file:PATH' | 'tfds:NAME' | 'folder:DIR' (see
    prompts.resolve_class_names), optionally through class_name_map;
    templates: 'imagenet80' | 'simple7' | 'photo' | list of strings with '{}'.
    """

    TYPE = "zero_shot"
    DEFAULTS = {
        "class_names": "imagenet",
        "templates": "imagenet80",
        "canonicalize": False,     # lower-case and strip punctuation from class names
        "tfds_data_dir": None,     # where 'tfds:NAME' class names are read from
        "class_name_map": None,    # dict or file mapping raw names (folder / ClassLabel) to prompt names
        "image_field": "image",
        "label_field": "label",
        "ks": (1, 5),
        "text_batch_size": None,   # batch size for embedding prompts; defaults to batch_size
        "chunk": 4096,             # images per block when scoring against all classes
    }

    def __init__(self, name, config=()):
        super().__init__(name, config)
        cfg = self.config
        self.templates = prompts.resolve_templates(cfg["templates"])
        self.class_names = prompts.resolve_class_names(
            cfg["class_names"], canonicalize=cfg["canonicalize"], tfds_data_dir=cfg["tfds_data_dir"],
            label_field=cfg["label_field"], name_map=cfg["class_name_map"])
        self.ks = check_ks(cfg["ks"], self.context)
        self.text_batch_size = int(cfg["text_batch_size"] or self.batch_size)

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        classifier = build_classifier(self.class_names, self.templates, encoders,
                                      batch_size=self.text_batch_size, context=self.context)
        out = embed_dataset(data, {"zimg": (self.config["image_field"], encoders.embed_images)},
                            batch_size=self.batch_size, keep=[self.config["label_field"]], mesh=encoders.mesh,
                            batch_axes=encoders.batch_axes, context=self.context)
        zimg = l2_normalize(out["zimg"])
        return topk_accuracy(zimg, classifier, out[self.config["label_field"]], self.ks,
                             chunk=self.config["chunk"])
