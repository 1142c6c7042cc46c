"""Glue between the trainer and `big_contrast.evaluate`: data, encoders, one evaluator run.

An entry of `config.evals` names its evaluator `type` and, under `data`, the overrides of
`config.data` that select the eval data, e.g. for the demo's held-out split:

    config.evals.shapes = dict(type="zero_shot", class_names=demo_class_names("shape"),
                               templates=("a photo of a {}.",), label_field="label/shape",
                               data=dict(sources={"demo": dict(kind="demo", split="eval")},
                                         label_keys=("label/shape",)))

The data pipeline reads it in eval mode (one pass, no shuffle, padded batches); padding rows
are dropped here because the evaluators pad and mask on their own.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from big_contrast import evaluate, sharding
from big_contrast.data import encode_fixed, make_pipeline, make_tokenizer
from big_contrast.data.device_ops import device_normalization, normalize_on_device


def build(config) -> list:
    return list(evaluate.build_evaluators(config.evals).values()) if config.evals else []


def eval_data_config(config, evaluator) -> ml_collections.ConfigDict:
    """`config.data` with the evaluator's `data` overrides (its `sources` replace the train ones)."""
    data = config.data.copy_and_resolve_references()
    overrides = evaluator.data_config or {}
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    with data.unlocked():
        if "sources" in overrides:
            data.sources = ml_collections.ConfigDict(overrides.pop("sources"))
        data.update(overrides)
        data.num_workers = 0  # one pass over a small split: worker start-up would dominate
    return data


def eval_batches(data_config, batch_size: int):
    """Process-local numpy batches of one pass over the eval data, padding rows removed."""
    with make_pipeline(data_config, None, train=False, global_batch_size=batch_size) as it:
        for batch in it:
            keep = np.asarray(batch.pop("mask"), bool)
            if keep.any():
                yield {k: np.asarray(v)[keep] for k, v in batch.items()}


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
    return evaluate.Encoders(embed_images, embed_texts, tokenize, mesh=run.mesh,
                             batch_axes=sharding.batch_axes(run.mesh), scale=float(model.scale()), bias=bias)


def run_one(evaluator, run, state, config) -> dict[str, float]:
    data_config = eval_data_config(config, evaluator)
    encoders = make_encoders(run, state.params, config, device_normalization(data_config.pp_eval))
    return evaluator.run(eval_batches(data_config, evaluator.batch_size), encoders)
