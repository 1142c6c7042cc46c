"""LocCa decoder targets (data/location_targets.py): box quantisation, token ranges, the three
task sequences and their loss masks, truncation, and malformed boxes skipped and counted."""

import grain
import numpy as np
import pytest

from big_contrast.data.batching import SkipCountingBatchIterDataset
from big_contrast.data.demo import demo_vocabulary
from big_contrast.data.errors import REASON_INDEX, SkipCounter, SkipRecord
from big_contrast.data.location_targets import (TASKS, LocationTargets, LocationVocab, box_iou, box_tokens,
                                                check_pp_keeps_boxes, dequantize, parse_regions, quantize,
                                                targets_from_config, tokens_to_box)
from big_contrast.data.tokenizer import PAD_ID, WordTokenizer, encode_fixed

TOKENIZER = WordTokenizer(demo_vocabulary())
EOS = TOKENIZER.eos_id


@pytest.mark.parametrize("num_bins", [7, 100, 1024])
def test_quantisation_round_trip_is_within_half_a_bin(num_bins):
    coords = np.concatenate([np.random.default_rng(0).random(10_000), [0.0, 1.0, 0.5, 1 - 1e-12]])
    bins = quantize(coords, num_bins)
    assert bins.min() >= 0 and bins.max() == num_bins - 1
    assert np.abs(dequantize(bins, num_bins) - coords).max() <= 0.5 / num_bins + 1e-6
    centres = dequantize(np.arange(num_bins), num_bins)
    np.testing.assert_array_equal(quantize(centres, num_bins), np.arange(num_bins))


def test_location_and_task_tokens_follow_the_text_vocabulary():
    vocab = LocationVocab(TOKENIZER.vocab_size, num_bins=50)
    box = (0.0, 0.25, 0.5, 1.0)
    tokens = box_tokens(box, vocab)
    assert tokens.dtype == np.int32 and tokens.min() >= TOKENIZER.vocab_size
    assert tokens.max() < TOKENIZER.vocab_size + 50 and vocab.is_location(tokens).all()
    assert tokens.tolist() == [TOKENIZER.vocab_size + b for b in (0, 12, 25, 49)]
    task_ids = [vocab.task_id(t) for t in TASKS]
    assert task_ids == list(range(TOKENIZER.vocab_size + 50, vocab.vocab_size))
    assert not vocab.is_location(task_ids).any() and not vocab.is_location([EOS, TOKENIZER.vocab_size - 1]).any()
    np.testing.assert_allclose(tokens_to_box(tokens, vocab), box, atol=0.5 / 50)
    assert tokens_to_box([tokens[0], EOS, tokens[2], tokens[3]], vocab) is None


def test_the_three_task_sequences_and_their_loss_masks():
    targets = LocationTargets(TOKENIZER, 16, num_bins=100)
    vocab, caption, region = targets.vocab, "a small red circle", ((0.1, 0.2, 0.5, 0.6), "red circle")
    words, loc = TOKENIZER.encode(caption), box_tokens(region[0], vocab).tolist()
    phrase = TOKENIZER.encode(region[1])
    expected = {
        "caption": ([vocab.task_id("caption")] + words + [EOS], 1),
        "referring": ([vocab.task_id("referring")] + phrase + loc + [EOS], 1 + len(phrase)),
        "grounded": ([vocab.task_id("grounded")] + loc + phrase + [EOS], 5),  # the box is the prompt
    }
    for task, (sequence, first_loss) in expected.items():
        weights = {t: float(t == task) for t in TASKS}
        out = LocationTargets(TOKENIZER, 16, num_bins=100, task_weights=weights)(caption, [region],
                                                                                np.random.default_rng(0))
        assert out["decoder_targets"].dtype == np.int32 and out["decoder_targets"].shape == (16,)
        assert out["decoder_targets"].tolist() == sequence + [PAD_ID] * (16 - len(sequence))
        assert out["decoder_mask"].tolist() == [first_loss <= i < len(sequence) for i in range(16)]
        assert int(out["decoder_task"]) == TASKS.index(task)
        assert out["decoder_targets"].max() < vocab.vocab_size
        np.testing.assert_array_equal(out["decoder_box"], np.float32(region[0]) if task != "caption" else 0)
    assert targets(caption)["decoder_targets"].tolist()[:len(words) + 2] == expected["caption"][0]  # no regions
    joint = LocationTargets(TOKENIZER, 16, num_bins=100, task_weights={"grounded": 1}, grounded_predicts_box=True)
    out = joint(caption, [region], np.random.default_rng(0))  # LocCa's joint GCAP: the box is predicted too
    sequence = expected["grounded"][0]
    assert out["decoder_mask"].tolist() == [1 <= i < len(sequence) for i in range(16)]


def test_captioning_alone_is_the_text_towers_encoding():
    targets = LocationTargets(TOKENIZER, 8, task_prefix=False)
    out = targets("a photo of a small red circle in the top left")
    np.testing.assert_array_equal(out["decoder_targets"], encode_fixed(TOKENIZER, "a photo of a small red circle "
                                                                       "in the top left", 8))
    assert out["decoder_mask"].all()  # 7 words + EOS fill all 8 positions
    with pytest.raises(ValueError, match="task_prefix=True"):
        targets("red circle", [((0, 0, 1, 1), "red circle")], np.random.default_rng(0))


def test_long_text_is_truncated_but_box_tokens_and_eos_are_kept():
    long_phrase = " ".join(["red"] * 30)
    for task in ("referring", "grounded"):
        targets = LocationTargets(TOKENIZER, 10, num_bins=10, task_weights={task: 1.0})
        out = targets("c", [((0.0, 0.0, 0.95, 0.95), long_phrase)], np.random.default_rng(1))
        tokens = out["decoder_targets"]
        assert (tokens != PAD_ID).all() and tokens[-1] == EOS and targets.vocab.is_location(tokens).sum() == 4
        assert tokens_to_box(tokens[targets.vocab.is_location(tokens)], targets.vocab) is not None


def test_tasks_and_regions_are_drawn_by_the_weights_and_deterministically():
    targets = LocationTargets(TOKENIZER, 16, task_weights={"caption": 1, "referring": 2, "grounded": 1})
    regions = [((0.1, 0.1, 0.2, 0.2), "red circle"), ((0.5, 0.5, 0.9, 0.9), "blue square")]
    draws = [targets("red circle", regions, np.random.default_rng(s)) for s in range(2000)]
    tasks = np.bincount([int(d["decoder_task"]) for d in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(tasks, (0.25, 0.5, 0.25), atol=0.04)
    again = targets("red circle", regions, np.random.default_rng(17))
    np.testing.assert_array_equal(again["decoder_targets"], draws[17]["decoder_targets"])
    boxes = {tuple(d["decoder_targets"][targets.vocab.is_location(d["decoder_targets"])]) for d in draws}
    assert len(boxes) == 3  # both regions drawn (and none for the caption task)


def test_regions_parse_from_dicts_parallel_lists_and_json():
    dicts = [{"box": [0.1, 0.2, 0.3, 0.4], "phrase": " a cat "}]
    assert parse_regions(dicts) == [((0.1, 0.2, 0.3, 0.4), "a cat")]
    assert parse_regions(np.array([[0.1, 0.2, 0.3, 0.4]]), ["a cat"]) == [((0.1, 0.2, 0.3, 0.4), "a cat")]
    assert parse_regions('[{"box": [0.1, 0.2, 0.3, 0.4], "phrase": "a cat"}]') == [((0.1, 0.2, 0.3, 0.4), "a cat")]
    assert parse_regions(None) == [] and parse_regions([]) == [] and parse_regions("[]") == []
    assert parse_regions([[0.5, 0.5, 0.5, 0.5]], ["a point"]) == [((0.5, 0.5, 0.5, 0.5), "a point")]


MALFORMED = [
    ([[0.1, 0.2, 1.3, 0.4]], ["x"]),         # outside [0, 1]
    ([[-0.1, 0.2, 0.3, 0.4]], ["x"]),        # outside [0, 1]
    ([[0.7, 0.2, 0.3, 0.4]], ["x"]),         # ymin > ymax
    ([[0.1, 0.5, 0.3, 0.4]], ["x"]),         # xmin > xmax
    ([[0.1, 0.2, 0.3]], ["x"]),              # 3 numbers
    ([[0.1, float("nan"), 0.3, 0.4]], ["x"]),
    ([["a", 0.2, 0.3, 0.4]], ["x"]),
    ([[0.1, 0.2, 0.3, 0.4]], ["   "]),       # empty phrase
    ([[0.1, 0.2, 0.3, 0.4]], ["x", "y"]),    # counts differ
    ([[0.1, 0.2, 0.3, 0.4]], None),          # no phrase at all
    ("not json", None),
    ({"box": [0.1, 0.2, 0.3, 0.4]}, None),   # one dict, not a list
]


@pytest.mark.parametrize("boxes, phrases", MALFORMED)
def test_malformed_regions_raise_skip_record_with_a_reason(boxes, phrases):
    with pytest.raises(SkipRecord) as error:
        parse_regions(boxes, phrases)
    assert error.value.reason == "malformed_box" and len(str(error.value)) > len("malformed_box: ")


class _Targets(grain.transforms.RandomMap):
    """What ProcessExample will do: a SkipRecord becomes a counted skip marker."""

    def __init__(self):
        self.targets = LocationTargets(TOKENIZER, 12)

    def random_map(self, raw, rng):
        try:
            return {**self.targets.from_record(raw, "red circle", rng), "_source": 0}
        except SkipRecord as e:
            return {"_skip": REASON_INDEX[e.reason], "_source": 0}


def test_malformed_boxes_are_skipped_and_counted_by_the_batcher():
    good = {"boxes": [[0.1, 0.1, 0.4, 0.4]], "phrases": ["red circle"]}
    records = [good, {"boxes": [[0.6, 0.1, 0.4, 0.4]], "phrases": ["red circle"]}, {},
               {"boxes": [[0.1, 0.1, 1.4, 0.4]], "phrases": ["red circle"]}, good]
    dataset = grain.MapDataset.source(records).seed(0).random_map(_Targets()).to_iter_dataset()
    batch = next(iter(SkipCountingBatchIterDataset(dataset, 3, ("m",), True, None, 0)))
    assert batch["decoder_targets"].shape == (3, 12) and batch["decoder_mask"].dtype == bool
    counter = SkipCounter(("m",), max_skip_fraction=None)
    counter.add(batch["_seen"], batch["_skipped"])
    assert counter.counts()["seen/m"] == 5 and counter.counts()["skipped/m/malformed_box"] == 2


def test_box_iou_against_hand_values():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 1)) == pytest.approx(0.5)


@pytest.mark.parametrize("call, words", [
    (lambda: LocationTargets(TOKENIZER, 6), "max_len"),
    (lambda: LocationTargets(TOKENIZER, 16, task_weights={"captions": 1}), "task_weights"),
    (lambda: LocationTargets(TOKENIZER, 16, task_weights={"caption": 0}), "task_weights"),
    (lambda: LocationTargets(TOKENIZER, 16, num_bins=0), "num_bins"),
    (lambda: LocationVocab(10).task_id("detect"), "unknown decoder task"),
    (lambda: LocationTargets(TOKENIZER, 16, text_vocab_size=TOKENIZER.vocab_size - 1), "text_vocab_size"),
    (lambda: targets_from_config({"bins": 8}, TOKENIZER, 16), "unknown field"),
    (lambda: check_pp_keeps_boxes("decode|random_resized_crop(224)|value_range(-1, 1)"), "move the boxes"),
    (lambda: check_pp_keeps_boxes("decode|resize(224)|flip_lr"), "move the boxes"),
])
def test_bad_options_fail_with_one_sentence(call, words):
    with pytest.raises(ValueError, match=words) as error:
        call()
    assert "\n" not in str(error.value) and str(error.value).endswith(".")
    check_pp_keeps_boxes("decode|resize(224)|value_range(-1, 1)")  # SigLIP's training pp keeps them


def test_location_tokens_may_start_after_the_text_towers_vocabulary():
    """A run sets text_vocab_size to the text tower's vocabulary (128 on the demo), so the decoder's
    size follows from the model config; the config section builds the same targets."""
    targets = targets_from_config({"num_bins": 32, "text_vocab_size": 128, "task_weights": {"referring": 1}},
                                  TOKENIZER, 16)
    assert targets.vocab.vocab_size == 128 + 32 + 3 and targets_from_config(None, TOKENIZER, 16) is None
    out = targets("a red circle", [((0.0, 0.5, 0.5, 1.0), "red circle")], np.random.default_rng(0))
    assert out["decoder_targets"][3:7].tolist() == [128 + 0, 128 + 16, 128 + 16, 128 + 31]
    assert int(out["decoder_task"]) == TASKS.index("referring")
