"""LocCa's referring-expression evaluator: given a phrase, the decoder writes the box.

    config.evals.refer = dict(type="referring", num_bins=32, text_vocab_size=128,
                              data=dict(decoder_targets=dict(num_bins=32, text_vocab_size=128,
                                        task_weights=dict(caption=0, referring=1, grounded=0)), sources=...))

The eval data holds LocCa's targets with the referring task (`data/location_targets.py`):
`<ref> phrase y0 x0 y1 x1 EOS`. Decoding is greedy with the task token and the phrase forced
(`Encoders.caption` with the loss mask: the tokens before the first loss position are the
prefix); the next 4 tokens are read as a box (`tokens_to_box`, bin centres) and scored against
the record's unquantised box (`decoder_box`). Metrics: `iou` (mean; a row whose 4 tokens are not
all location tokens scores 0), `accuracy` (IoU >= `iou_threshold`, the usual RefCOCO
accuracy@0.5), `valid` (rows that decoded 4 location tokens), `loss` (teacher-forced, over the box
tokens and EOS), `count`. Rows of another task (an image without boxes) are left out. `num_bins`
and `text_vocab_size` must be the training data's (where the location tokens sit).
"""
from __future__ import annotations

import numpy as np

from big_contrast.data.location_targets import TASKS, LocationVocab, box_iou, tokens_to_box
from big_contrast.errors import ConfigError
from big_contrast.evaluate.base import Encoders, Evaluator
from big_contrast.evaluate.embed import VALID

FIELDS = ("decoder_targets", "decoder_mask", "decoder_task", "decoder_box")


class ReferringEvaluator(Evaluator):
    TYPE = "referring"
    DEFAULTS = {"image_field": "image", "num_bins": 1024, "text_vocab_size": None, "iou_threshold": 0.5}

    def __init__(self, name, config=()):
        super().__init__(name, config)
        if self.config["text_vocab_size"] is None:
            raise ConfigError(f"{self.context} needs text_vocab_size: where the location tokens start (the "
                              "training data's decoder_targets.text_vocab_size, else its tokenizer's vocabulary).")
        self.vocab = LocationVocab(int(self.config["text_vocab_size"]), int(self.config["num_bins"]))

    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        if encoders.caption is None:
            raise ConfigError(f"{self.context} needs a model with a captioning decoder; set config.model.decoder "
                              "or remove this evaluator.")
        ious, valid_boxes, nll, count = [], [], 0.0, 0.0
        for batch in data:
            missing = [f for f in FIELDS if f not in batch]
            if missing:
                raise ConfigError(f"{self.context}: the eval batches lack {missing}; set the evaluator's "
                                  "data.decoder_targets (referring task) and a source with boxes.")
            targets, mask = np.asarray(batch["decoder_targets"]), np.asarray(batch["decoder_mask"], bool)
            rows = np.asarray(batch.get(VALID, np.ones(len(targets), bool))) & (
                np.asarray(batch["decoder_task"]) == TASKS.index("referring"))
            tokens, nll_b, count_b = (np.asarray(x) for x in encoders.caption(batch[self.config["image_field"]],
                                                                              targets, mask))
            nll, count = nll + float(nll_b[rows].sum()), count + float(count_b[rows].sum())
            start = np.argmax(mask, axis=1)
            for i in np.flatnonzero(rows):
                box = tokens_to_box(tokens[i, start[i]:start[i] + 4], self.vocab)
                valid_boxes.append(box is not None)
                ious.append(0.0 if box is None else box_iou(box, np.asarray(batch["decoder_box"][i], np.float64)))
        ious = np.asarray(ious, np.float64)
        if not len(ious):
            raise ConfigError(f"{self.context} found no referring-expression rows: its data needs boxes and "
                              "task_weights with referring > 0.")
        return dict(iou=float(ious.mean()), accuracy=float((ious >= self.config["iou_threshold"]).mean()),
                    valid=float(np.mean(valid_boxes)), loss=nll / max(count, 1.0), count=float(len(ious)))
