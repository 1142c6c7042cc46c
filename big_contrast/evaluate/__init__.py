"""Zero-shot evaluation: classification, retrieval and embedding diagnostics.

    from big_contrast import evaluate
    evaluators = evaluate.build_evaluators(config.evals)
    encoders = evaluate.Encoders(embed_images, embed_texts, tokenize, mesh=mesh, scale=..., bias=...)
    results = {}
    for ev in evaluators.values():
        results.update(ev.run(data_for(ev.data_config, ev.batch_size), encoders))
    print(evaluate.format_table(results))
"""
from __future__ import annotations

from typing import Any, Mapping

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator
from big_contrast.evaluate.captioning import CaptioningEvaluator
from big_contrast.evaluate.diagnostics import (
    DiagnosticsEvaluator, alignment, embedding_diagnostics, mean_pair_scores, modality_gap, uniformity)
from big_contrast.evaluate.embed import (
    batches_from_arrays, batches_from_source, embed_dataset, embed_image_text_pairs, pad_batch)
from big_contrast.evaluate.referring import ReferringEvaluator
from big_contrast.evaluate.prompts import (
    IMAGENET_TEMPLATES, PHOTO_TEMPLATE, SIMPLE_IMAGENET_TEMPLATES, canonicalize_class_name, resolve_class_names,
    resolve_templates)
from big_contrast.evaluate.fewshot import FewShotEvaluator, fewshot_accuracy
from big_contrast.evaluate.imagenet_classes import IMAGENET_CLASSNAMES
from big_contrast.evaluate.report import format_table, write_json
from big_contrast.evaluate.retrieval import RetrievalEvaluator, recall_at_k, retrieval_ranks
from big_contrast.evaluate.zero_shot import ZeroShotEvaluator, build_classifier, topk_accuracy

EVALUATORS: dict[str, type[Evaluator]] = {
    cls.TYPE: cls for cls in (ZeroShotEvaluator, RetrievalEvaluator, DiagnosticsEvaluator, FewShotEvaluator,
                              CaptioningEvaluator, ReferringEvaluator)}


def build_evaluator(name: str, config: Mapping[str, Any] | Any) -> Evaluator:
    """The evaluator for one `config.evals.<name>` entry, chosen by its `type`."""
    kind = config.get("type") if hasattr(config, "get") else None
    if kind not in EVALUATORS:
        raise ConfigError(f"Evaluator {name!r} has type {kind!r}; set type to one of {sorted(EVALUATORS)}.")
    return EVALUATORS[kind](name, config)


def build_evaluators(evals_config: Mapping[str, Any] | Any) -> dict[str, Evaluator]:
    """All evaluators of `config.evals` (a ConfigDict or dict of entries), by name."""
    items = evals_config.items() if evals_config is not None else ()
    return {name: build_evaluator(name, entry) for name, entry in items}


__all__ = [
    "Encoders", "Evaluator", "EVALUATORS", "ReferringEvaluator", "build_evaluator", "build_evaluators",
    "ZeroShotEvaluator", "RetrievalEvaluator", "DiagnosticsEvaluator", "FewShotEvaluator", "fewshot_accuracy",
    "build_classifier", "topk_accuracy", "recall_at_k", "retrieval_ranks",
    "alignment", "uniformity", "modality_gap", "mean_pair_scores", "embedding_diagnostics",
    "embed_dataset", "embed_image_text_pairs", "batches_from_arrays", "batches_from_source", "pad_batch",
    "IMAGENET_CLASSNAMES", "IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES", "PHOTO_TEMPLATE",
    "resolve_templates", "resolve_class_names", "canonicalize_class_name",
    "format_table", "write_json",
]
