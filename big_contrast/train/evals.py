"""Glue between the trainer and `big_contrast.evaluate`: data, encoders, one evaluator run.

An entry of `config.evals` names its evaluator `type` and, under `data`, the overrides of
`config.data` that select the eval data, e.g. for the demo's held-out split:

    config.evals.shapes = dict(type="zero_shot", class_names=demo_class_names("shape"),
                               templates=("a photo of a {}.",), label_field="label/shape",
                               data=dict(sources={"demo": dict(kind="demo", split="eval")},
                                         label_keys=("label/shape",)))

The data pipeline reads it in eval mode (one pass, no shuffle, padded batches); its padding
mask becomes the evaluators' validity field (`embed.VALID`), so batches are padded once. The pipeline (and so each
source) is opened before the evaluator embeds anything, with the zero-shot evaluator's class
names handed to labelled sources, so a label that does not fit the class list fails first.
Records the pipeline skipped (e.g. undecodable images) are reported as `<prefix>/skipped`.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from big_contrast import evaluate
from big_contrast.data import encode_fixed, make_pipeline, make_tokenizer
from big_contrast.data.sources import is_labelled
from big_contrast.evaluate.embed import VALID
from big_contrast.data.device_ops import device_normalization, normalize_on_device
from big_contrast.models.naflex import NAFLEX_FIELDS, NaflexImages, is_naflex_batch
from big_contrast.train import siglip2


def build(config) -> list:
    return list(evaluate.build_evaluators(config.evals).values()) if config.evals else []


def eval_data_config(config, evaluator, key: str = "data") -> ml_collections.ConfigDict:
    """`config.data` with the evaluator's `key` overrides (its `sources` replace the train ones)."""
    data = config.data.copy_and_resolve_references()
    overrides = evaluator.config[key] or {}
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    with data.unlocked():
        if "sources" in overrides:
            data.sources = ml_collections.ConfigDict(overrides.pop("sources"))
        data.update(overrides)
        data.num_workers = 0  # one pass over a small split: worker start-up would dominate
        class_names = getattr(evaluator, "class_names", None)
        for source in data.sources.values():
            if class_names is not None and is_labelled(source) and source.get("class_names") is None:
                source.class_names = list(class_names)
    return data


class EvalData:
    """One pass over the eval data as process-local numpy batches, padded to the local batch
    with the pipeline's mask as the evaluators' validity field.

    The pipeline is built here, eagerly, so that bad sources fail before any embedding;
    `skipped` counts the records it skipped (after the pass)."""

    def __init__(self, data_config, batch_size: int):
        self._iterator = make_pipeline(data_config, None, train=False, global_batch_size=batch_size)

    def __iter__(self):
        with self._iterator as it:
            for batch in it:
                batch[VALID] = np.asarray(batch.pop("mask"), bool)
                if is_naflex_batch(batch):  # issue 22: the evaluators' image field holds NaflexImages
                    batch["image"] = NaflexImages(*(batch.pop(k) for k in NAFLEX_FIELDS))
                yield batch

    @property
    def skipped(self) -> int:
        return int(self._iterator.skips.skipped.sum())


def _embed_fn(run, tower: str, image_norm=None):
    """jit(params, inputs -> embeddings) of one tower, compiled once per run (params are an
    argument, not a constant baked into the program); uint8 images are normalised inside the
    same program by `image_norm` (`device_ops`)."""
    key = (tower, image_norm)
    if key not in run.jitted:
        run.jitted[key] = jax.jit(lambda params, inputs: getattr(run.model(params), tower)(
            normalize_on_device(inputs, image_norm)))
    return run.jitted[key]


def make_encoders(run, params, config, image_norm=None) -> evaluate.Encoders:
    model = run.model(params)
    embed_images = functools.partial(_embed_fn(run, "embed_images", image_norm), params)
    embed_texts = functools.partial(_embed_fn(run, "embed_texts"), params)
    tokenizer = make_tokenizer(config.data.tokenizer, config.data.lowercase)
    max_len = config.data.max_len

    def tokenize(texts):
        return np.stack([encode_fixed(tokenizer, t, max_len) for t in texts])

    bias = float(model.bias[...]) if model.bias is not None else None
    caption = None if model.decoder is None else siglip2.caption_fn(run, params, image_norm)  # SigLIP 2
    return evaluate.Encoders(embed_images, embed_texts, tokenize, mesh=run.mesh,
                             scale=float(model.scale()), bias=bias, caption=caption)


def run_one(evaluator, run, state, config) -> dict[str, float]:
    """The evaluator's metrics plus `<prefix>/skipped`, the records its data pipeline skipped."""
    data_configs = {key: eval_data_config(config, evaluator, key) for key in evaluator.DATA_KEYS}
    data = {key: EvalData(c, evaluator.batch_size) for key, c in data_configs.items()}
    image_norm = device_normalization(data_configs["data"].pp_eval)
    encoders = make_encoders(run, state.params, config, image_norm)
    results = evaluator.run(data if len(data) > 1 else data["data"], encoders)
    results[f"{evaluator.prefix}/skipped"] = float(sum(d.skipped for d in data.values()))
    return results
