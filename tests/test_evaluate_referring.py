"""LocCa's evaluators on hand-made batches: the referring-expression evaluator reads the 4 tokens
after the forced prefix as a box and scores it against the record's box; the captioning evaluator
compares captions after the task token when the batches hold LocCa's targets."""

import numpy as np
import pytest

from big_contrast.data.demo import demo_vocabulary
from big_contrast.data.location_targets import LocationTargets, box_iou, dequantize, quantize
from big_contrast.data.tokenizer import WordTokenizer, encode_fixed
from big_contrast.errors import ConfigError
from big_contrast.evaluate import CaptioningEvaluator, Encoders, ReferringEvaluator
from big_contrast.evaluate.embed import VALID

TOKENIZER = WordTokenizer(demo_vocabulary())
BINS, TEXT_VOCAB, L = 16, 64, 12
BOXES = [(0.1, 0.1, 0.4, 0.5), (0.5, 0.2, 0.9, 0.6), (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.35, 0.7)]


def batch_of(task, captions=("red circle",) * 4):
    targets = LocationTargets(TOKENIZER, L, num_bins=BINS, text_vocab_size=TEXT_VOCAB, task_weights={task: 1})
    rows = [targets(c, [(box, c)], np.random.default_rng(i)) for i, (c, box) in enumerate(zip(captions, BOXES))]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["image"] = np.zeros((4, 8, 8, 3), np.float32)
    batch["text"] = np.stack([encode_fixed(TOKENIZER, c, L) for c in captions])
    batch[VALID] = np.asarray([True, True, True, False])  # the last row is padding
    return batch


def encoders(write):
    """A fake decoder: `write(targets, mask)` is its greedy output; loss sums count the masked tokens."""
    def caption(images, targets, mask=None):
        mask = np.ones(targets.shape, bool) if mask is None else mask
        return write(np.asarray(targets), mask), mask.sum(1) * 0.5, mask.sum(1).astype(np.float32)

    return Encoders(lambda x: x, lambda x: x, tokenize=lambda words: np.stack(
        [encode_fixed(TOKENIZER, w, L) for w in words]), caption=caption)


def referring(**config):
    return ReferringEvaluator("refer", dict(num_bins=BINS, text_vocab_size=TEXT_VOCAB, **config))


def test_a_decoder_that_writes_the_true_box_scores_its_quantisation_iou():
    metrics = referring().evaluate([batch_of("referring")], encoders(lambda targets, mask: targets))
    centres = [dequantize(quantize(box, BINS), BINS) for box in BOXES[:3]]
    expected = np.mean([box_iou(c, box) for c, box in zip(centres, BOXES[:3])])
    assert metrics["count"] == 3 and metrics["valid"] == 1.0
    np.testing.assert_allclose(metrics["iou"], expected, rtol=1e-6)
    assert metrics["accuracy"] == 1.0 and metrics["loss"] == 0.5


def test_shifted_boxes_and_non_location_tokens_score_by_iou():
    def shifted(targets, mask):
        out = targets.copy()
        start = np.argmax(mask, axis=1)
        out[0, start[0]:start[0] + 4] += np.asarray([8, 0, 8, 0])  # row 0: the box moved down half the image
        out[1, start[1] + 2] = 5  # row 1: a word where a box token should be
        return out

    metrics = referring().evaluate([batch_of("referring")], encoders(shifted))
    box0 = dequantize(np.clip(quantize(BOXES[0], BINS) + [8, 0, 8, 0], 0, BINS - 1), BINS)
    box2 = dequantize(quantize(BOXES[2], BINS), BINS)
    ious = [box_iou(box0, BOXES[0]), 0.0, box_iou(box2, BOXES[2])]
    np.testing.assert_allclose(metrics["iou"], np.mean(ious), rtol=1e-6)
    assert metrics["valid"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(1 / 3)


def test_the_referring_evaluator_needs_referring_rows_and_where_the_location_tokens_sit():
    with pytest.raises(ConfigError, match="no referring-expression rows"):
        referring().evaluate([batch_of("caption")], encoders(lambda t, m: t))
    with pytest.raises(ConfigError, match="text_vocab_size"):
        ReferringEvaluator("refer", dict(num_bins=BINS))
    with pytest.raises(ConfigError, match="lack"):
        referring().evaluate([{"image": np.zeros((1, 8, 8, 3))}], encoders(lambda t, m: t))


def test_captions_after_the_task_token_are_compared_with_the_reference_words():
    captions = ("red circle", "blue square", "a small green star", "red circle")
    batch = batch_of("caption", captions)
    evaluator = CaptioningEvaluator("captions", dict(names=dict(colour=["red", "blue", "green"],
                                                                shape=["circle", "square", "star"])))
    perfect = evaluator.evaluate([batch], encoders(lambda targets, mask: targets))
    assert perfect["names_colour"] == perfect["names_shape"] == perfect["names_all"] == 1.0
    assert perfect["ngram"] == 1.0 and perfect["count"] == 3

    def wrong_colour(targets, mask):
        out = targets.copy()
        out[out == TOKENIZER.encode("red")[0]] = TOKENIZER.encode("blue")[0]
        return out

    wrong = evaluator.evaluate([batch], encoders(wrong_colour))
    assert wrong["names_colour"] == pytest.approx(2 / 3) and wrong["names_shape"] == 1.0  # row 0 only
    # Without LocCa's fields the text tower's tokens are the references, as before.
    plain = {k: batch[k] for k in ("image", "text", VALID)}
    assert evaluator.evaluate([plain], encoders(lambda targets, mask: targets))["names_all"] == 1.0
