"""The captioning decoder's evaluator (SigLIP 2 / LocCa / CapPa): teacher-forced captioning loss,
greedy captions, a CIDEr-like n-gram score against the reference caption, and how often the
greedy caption names the reference's words of each listed attribute.

    config.evals.captions = dict(type="captioning", text_field="text", length=8,
                                 names=dict(colour=["red", ...], shape=["circle", ...]), data=...)

It needs `Encoders.caption` (the trainer provides it when the model has a decoder):
`caption(images, texts) -> (greedy token ids [B, length], per-example token NLL sums [B],
per-example token counts [B])`. Attribute words are compared as token-id sequences (the
tokenizer need not decode): a caption names a word when the word's ids occur contiguously in it;
an attribute is right when the caption names exactly the reference's (non-empty) set of its words.

LocCa: when the batches hold the decoder's own targets (`decoder_targets`, `decoder_mask`, from
`config.data.decoder_targets`; give the evaluator's data caption-only task weights), those are
the references, the tokens before a row's first loss position (its task token) are a forced
prefix, and captions and references are compared after it.
"""
from __future__ import annotations

import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator
from big_contrast.evaluate.embed import VALID
from big_contrast.models.decoder import ngram_overlap


class CaptioningEvaluator(Evaluator):
    TYPE = "captioning"
    DEFAULTS = {"image_field": "image", "text_field": "text", "length": 16, "names": {}, "max_n": 4}

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        if encoders.caption is None:
            raise ConfigError(f"{self.context} needs a model with a captioning decoder; set config.model.decoder "
                              "or remove this evaluator.")
        words = self._word_ids(encoders)
        nll, count, candidates, references = 0.0, 0.0, [], []
        for batch in data:
            valid = np.asarray(batch.get(VALID, np.ones(len(batch[self.config["image_field"]]), bool)))
            texts, mask = _targets(batch, self.config["text_field"])
            tokens, nll_b, count_b = (np.asarray(x) for x in encoders.caption(batch[self.config["image_field"]],
                                                                              texts, *mask))
            start = np.argmax(mask[0] & (texts != 0), axis=1) if mask else np.zeros(len(texts), int)
            nll += float(nll_b[valid].sum())
            count += float(count_b[valid].sum())
            candidates += [_strip(t[s:]) for t, s in zip(tokens[valid], start[valid])]
            references += [_strip(t[s:]) for t, s in zip(texts[valid], start[valid])]
        metrics = dict(loss=nll / max(count, 1.0), ngram=ngram_overlap(candidates, references, self.config["max_n"]),
                       count=float(len(candidates)))
        for attribute, ids in words.items():
            metrics[f"names_{attribute}"] = _naming_rate(candidates, references, ids)
        if words:
            metrics["names_all"] = float(np.mean([all(_names_same(c, r, ids) for ids in words.values())
                                                  for c, r in zip(candidates, references)]))
        return metrics

    def _word_ids(self, encoders) -> dict[str, list[list[int]]]:
        names = dict(self.config["names"] or {})
        if names and encoders.tokenize is None:
            raise ConfigError(f"{self.context}: `names` needs a tokenizer in the encoders.")
        return {attribute: [_strip(t) for t in encoders.tokenize(list(values))] for attribute, values in names.items()}


def _targets(batch, text_field: str) -> tuple[np.ndarray, tuple]:
    """(targets [B, L], (loss mask,) or ()): LocCa's decoder targets when the batch has them."""
    if "decoder_targets" in batch:
        return np.asarray(batch["decoder_targets"]), (np.asarray(batch["decoder_mask"], bool),)
    return np.asarray(batch[text_field]), ()


def _strip(tokens, pad_id: int = 0, eos_id: int = 1) -> list[int]:
    """Token ids up to the first EOS or padding."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t in (pad_id, eos_id):
            break
        out.append(int(t))
    return out


def _named(tokens: list[int], word_ids: list[list[int]]) -> frozenset:
    return frozenset(i for i, w in enumerate(word_ids)
                     if w and any(tokens[k:k + len(w)] == w for k in range(len(tokens) - len(w) + 1)))


def _names_same(candidate, reference, word_ids) -> bool:
    expected = _named(reference, word_ids)
    return bool(expected) and _named(candidate, word_ids) == expected


def _naming_rate(candidates, references, word_ids) -> float:
    """Fraction of examples whose reference names a word of the attribute and whose caption names
    exactly the same ones."""
    scored = [(c, r) for c, r in zip(candidates, references) if _named(r, word_ids)]
    return float(np.mean([_names_same(c, r, word_ids) for c, r in scored])) if scored else 0.0
