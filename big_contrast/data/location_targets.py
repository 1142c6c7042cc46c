"""LocCa's decoder targets: captioning, and where a source has boxes, referring expressions and
grounded captions, as token sequences with location tokens.

LocCa (Wan et al. 2024), SigLIP 2's decoder objective, trains one captioning decoder on three
tasks told apart by a task prefix (here one token, first in the sequence):

    caption      <cap>  caption words                 EOS     loss on: words, EOS
    referring    <ref>  phrase words  y0 x0 y1 x1     EOS     loss on: the 4 box tokens, EOS
    grounded     <gnd>  y0 x0 y1 x1   phrase words    EOS     loss on: phrase words, EOS

(the task token and the prompt -- a referring expression's phrase, a grounded caption's box --
are forced inputs: given, not predicted; `decoder_mask` is False on them). LocCa's GCAP predicts
box and caption jointly; `grounded_predicts_box=True` puts the grounded box tokens in the loss
for that reading (the box is then predicted, not a prompt). A box is
(ymin, xmin, ymax, xmax) in [0, 1] of the image, PaLI / PaliGemma's order; each coordinate is
quantised into `num_bins` uniform bins (bin = floor(c * N), clipped to N - 1; its value back is
the bin's centre, so a round trip is within half a bin) and written as the token
`text_vocab_size + bin` (`text_vocab_size` defaults to the tokenizer's; a run may set it to the
text tower's vocabulary so the decoder's size follows from the model config). The task tokens follow the location tokens, so the decoder's
vocabulary is `text_vocab_size + num_bins + 3` (`LocationVocab.vocab_size`; its mask token for
parallel prediction is one more, as `DecoderConfig.mask_id` says). Without regions an example
is captioned; `task_prefix=False` (a captioning-only run) drops the task token, and the target
is then `encode_fixed(caption)` of the built-in tokenizers (the tokens the text tower sees).

Regions come from a source field (`boxes`, e.g. a manifest column): a list of
`{"box": [ymin, xmin, ymax, xmax], "phrase": str}`, or boxes `[[ymin, xmin, ymax, xmax], ...]`
with a parallel `phrases` list, or either as JSON text (a CSV cell). A malformed region -- not
4 finite numbers, outside [0, 1], min > max, or an empty phrase -- makes the record
`SkipRecord('malformed_box')`: skipped and counted, with the box and why in the detail.

Per example one task is drawn (`task_weights`, default equal) and, for a region task, one
region uniformly, from the caller's generator (grain's per-index one), so the targets of an
index are the same in every worker and after a resume. Deviation from LocCa, stated in the
README: LocCa, as we read it, decodes every task of an image in the same step (the encoder runs
once); here each example draws one, so one decoder pass per example, each task seen less often.
Boxes refer to the whole image, so the image op string must not crop or flip
(`check_pp_keeps_boxes`: `decode|resize(S)|value_range(...)`, SigLIP's training pp).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from big_contrast.data.errors import SkipRecord
from big_contrast.data.tokenizer import PAD_ID
from big_contrast.errors import ConfigError

TASKS = ("caption", "referring", "grounded")
BOX_SAFE_OPS = ("decode", "resize", "value_range", "normalize")


@dataclasses.dataclass(frozen=True)
class LocationVocab:
    """Where the location and task tokens sit: after the text tokenizer's `text_vocab_size` ids."""

    text_vocab_size: int
    num_bins: int = 1024  # PaliGemma's <loc0000>..<loc1023>

    def __post_init__(self):
        for name in ("text_vocab_size", "num_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"location tokens: {name}={value!r} must be a positive integer.")

    @property
    def location_offset(self) -> int:
        return self.text_vocab_size

    def task_id(self, task: str) -> int:
        if task not in TASKS:
            raise ConfigError(f"unknown decoder task {task!r}; the tasks are {TASKS}.")
        return self.text_vocab_size + self.num_bins + TASKS.index(task)

    @property
    def vocab_size(self) -> int:
        """The decoder's vocabulary: text, location and task tokens."""
        return self.text_vocab_size + self.num_bins + len(TASKS)

    def is_location(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        return (tokens >= self.location_offset) & (tokens < self.location_offset + self.num_bins)


def quantize(coords, num_bins: int) -> np.ndarray:
    """int32 bins of coordinates in [0, 1]: floor(c * N), 1.0 in the last bin."""
    return np.clip(np.floor(np.asarray(coords, np.float64) * num_bins), 0, num_bins - 1).astype(np.int32)


def dequantize(bins, num_bins: int) -> np.ndarray:
    """The centres of `bins`: within half a bin (0.5 / N) of every coordinate of the bin."""
    return ((np.asarray(bins, np.float64) + 0.5) / num_bins).astype(np.float32)


def box_tokens(box, vocab: LocationVocab) -> np.ndarray:
    """int32 [4]: the location tokens of (ymin, xmin, ymax, xmax)."""
    return vocab.location_offset + quantize(box, vocab.num_bins)


def tokens_to_box(tokens, vocab: LocationVocab) -> np.ndarray | None:
    """The box (ymin, xmin, ymax, xmax) of 4 decoded tokens, None unless all 4 are location tokens."""
    tokens = np.asarray(tokens)
    if tokens.shape != (4,) or not vocab.is_location(tokens).all():
        return None
    return dequantize(tokens - vocab.location_offset, vocab.num_bins)


def box_iou(a, b) -> float:
    """Intersection over union of two (ymin, xmin, ymax, xmax) boxes (referring-expression accuracy
    is the fraction of predictions with IoU >= 0.5)."""
    (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) = a, b
    inter = max(0.0, min(ay1, by1) - max(ay0, by0)) * max(0.0, min(ax1, bx1) - max(ax0, bx0))
    union = (ay1 - ay0) * (ax1 - ax0) + (by1 - by0) * (bx1 - bx0) - inter
    return float(inter / union) if union > 0 else 0.0


def _box(value, k: int) -> tuple[float, float, float, float]:
    try:
        coords = tuple(float(c) for c in value)
    except (TypeError, ValueError):
        raise SkipRecord("malformed_box", f"box {k} {value!r} is not a list of numbers") from None
    if len(coords) != 4 or not all(math.isfinite(c) for c in coords):
        raise SkipRecord("malformed_box", f"box {k} {value!r} is not 4 finite numbers (ymin, xmin, ymax, xmax)")
    if not all(0.0 <= c <= 1.0 for c in coords):
        raise SkipRecord("malformed_box", f"box {k} {coords} has a coordinate outside [0, 1]")
    ymin, xmin, ymax, xmax = coords
    if ymin > ymax or xmin > xmax:
        raise SkipRecord("malformed_box", f"box {k} {coords} has ymin > ymax or xmin > xmax")
    return coords


def _phrase(value, k: int) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("malformed_box", f"box {k} has no phrase (got {value!r})")
    return value.strip()


def _json(value):
    if not isinstance(value, (str, bytes)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SkipRecord("malformed_box", f"the boxes field is not JSON: {e}") from None


def parse_regions(boxes, phrases=None) -> list[tuple[tuple[float, float, float, float], str]]:
    """[(box, phrase), ...] of a record's `boxes` field (and `phrases`, if separate); [] for none.
    Raises `SkipRecord('malformed_box')` on any malformed region."""
    boxes, phrases = _json(boxes), _json(phrases)
    if boxes is None or (hasattr(boxes, "__len__") and len(boxes) == 0):
        return []
    if isinstance(boxes, Mapping) or not isinstance(boxes, (list, tuple, np.ndarray)):
        raise SkipRecord("malformed_box", f"the boxes field is a {type(boxes).__name__}, not a list of regions")
    if phrases is None:
        if not all(isinstance(region, Mapping) for region in boxes):
            raise SkipRecord("malformed_box", "boxes without a phrases field must be {'box': ..., 'phrase': ...} dicts")
        pairs = [(region.get("box"), region.get("phrase")) for region in boxes]
    else:
        if len(phrases) != len(boxes):
            raise SkipRecord("malformed_box", f"{len(boxes)} boxes but {len(phrases)} phrases")
        pairs = list(zip(boxes, phrases))
    return [(_box(box, k), _phrase(phrase, k)) for k, (box, phrase) in enumerate(pairs)]


def check_pp_keeps_boxes(image_pp: str) -> None:
    """Raises unless `image_pp` keeps the whole image in place (boxes are fractions of it)."""
    ops = [p.strip().split("(")[0].strip() for p in image_pp.split("|") if p.strip()]
    moving = [op for op in ops if op not in BOX_SAFE_OPS]
    if moving:
        raise ConfigError(f"image pp {image_pp!r} uses {moving}, which move the boxes' contents; with box targets use "
                          f"only {BOX_SAFE_OPS} (e.g. 'decode|resize(224)|value_range(-1, 1)').")


class LocationTargets:
    """`targets(caption, regions, rng) -> {'decoder_targets': int32 [L], 'decoder_mask': bool [L],
    'decoder_task': int32, 'decoder_box': float32 [4]}`: one task's sequence, padded with PAD_ID;
    `decoder_mask` marks the tokens in the loss (not the task token, not the prompt, not padding);
    `decoder_box` is the drawn region's box (zeros for a caption), what a referring-expression
    evaluator scores the decoded box against.

    Args:
      tokenizer: the text tokenizer (`encode`, `eos_id`, `vocab_size`).
      max_len: L, the decoder's `max_len`; text is truncated to fit, box tokens and EOS never are.
      num_bins: quantisation bins per coordinate.
      task_weights: relative frequencies of (caption, referring, grounded) for examples with regions.
      task_prefix: False: captioning alone, no task token (then regions are an error).
      boxes_key, phrases_key: the record fields `from_record` reads.
      text_vocab_size: where the location tokens start (>= the tokenizer's vocabulary; default it).
      grounded_predicts_box: grounded captions predict their box too (LocCa's joint GCAP).
    """

    def __init__(self, tokenizer, max_len: int, *, num_bins: int = 1024,
                 task_weights: Mapping[str, float] | None = None, task_prefix: bool = True,
                 boxes_key: str = "boxes", phrases_key: str = "phrases", text_vocab_size: int | None = None,
                 grounded_predicts_box: bool = False):
        self.tokenizer, self.max_len, self.task_prefix = tokenizer, int(max_len), bool(task_prefix)
        self.grounded_predicts_box = bool(grounded_predicts_box)
        self.boxes_key, self.phrases_key = boxes_key, phrases_key
        text_vocab_size = int(tokenizer.vocab_size) if text_vocab_size is None else text_vocab_size
        if text_vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"decoder_targets.text_vocab_size={text_vocab_size} is below the tokenizer's "
                              f"{tokenizer.vocab_size} ids; location tokens must follow them (use >= "
                              f"{tokenizer.vocab_size}).")
        self.vocab = LocationVocab(text_vocab_size, num_bins)
        if self.max_len < (7 if task_prefix else 2):
            raise ConfigError(f"decoder max_len={max_len} is too short: a box target needs a task token, one word, "
                              "4 box tokens and EOS (>= 7).")
        weights = dict.fromkeys(TASKS, 1.0) if task_weights is None else dict(task_weights)
        unknown = sorted(set(weights) - set(TASKS))
        values = [float(weights.get(task, 0.0)) for task in TASKS]
        if unknown or min(values) < 0 or sum(values) <= 0:
            raise ConfigError(f"decoder task_weights={task_weights!r} must map tasks of {TASKS} to non-negative "
                              "numbers, not all zero.")
        self.task_probs = np.asarray(values) / sum(values)

    def _words(self, text: str, room: int) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        if ids and ids[-1] == self.tokenizer.eos_id:  # some tokenizers append EOS themselves
            ids = ids[:-1]
        return ids[:max(room, 1)]

    def _sequence(self, task: str, caption: str, region) -> tuple[list[int], int]:
        """(tokens without padding, index of the first token in the loss)."""
        eos, prefix = self.tokenizer.eos_id, [self.vocab.task_id(task)]
        if task == "caption":  # without the task prefix there is room for one more word
            return prefix + self._words(caption, self.max_len - 2 + (not self.task_prefix)) + [eos], 1
        box, phrase = region
        loc = box_tokens(box, self.vocab).tolist()
        words = self._words(phrase, self.max_len - 6)
        if task == "referring":
            return prefix + words + loc + [eos], 1 + len(words)
        return prefix + loc + words + [eos], 1 if self.grounded_predicts_box else 1 + len(loc)

    def __call__(self, caption: str, regions: Sequence = (), rng: np.random.Generator | None = None) -> dict:
        task, region = "caption", None
        if regions and not self.task_prefix:
            raise ConfigError("decoder targets with task_prefix=False are captions alone, but this source has "
                              "boxes; set task_prefix=True to train referring expressions and grounded captions.")
        if regions:
            if rng is None:
                raise ValueError("LocationTargets needs the example's rng to draw a task when it has regions.")
            task = TASKS[int(rng.choice(len(TASKS), p=self.task_probs))]
            region = regions[int(rng.integers(len(regions)))] if task != "caption" else None
        tokens, first_loss = self._sequence(task, caption, region)
        if not self.task_prefix:
            tokens, first_loss = tokens[1:], 0
        targets = np.full((self.max_len,), PAD_ID, np.int32)
        targets[:len(tokens)] = tokens
        mask = np.zeros((self.max_len,), bool)
        mask[first_loss:len(tokens)] = True
        box = np.zeros((4,), np.float32) if region is None else np.asarray(region[0], np.float32)
        return {"decoder_targets": targets, "decoder_mask": mask, "decoder_task": np.int32(TASKS.index(task)),
                "decoder_box": box}

    def from_record(self, raw: Mapping, caption: str, rng: np.random.Generator) -> dict:
        """The targets of a raw record: its regions parsed (`SkipRecord('malformed_box')` on a bad
        one), then a task drawn; `caption` is the caption the text tower gets this step."""
        return self(caption, parse_regions(raw.get(self.boxes_key), raw.get(self.phrases_key)), rng)


# `config.data.decoder_targets`: None (the decoder predicts the text tower's caption tokens, as
# before) or a dict of these fields; its max_len is `config.data.max_len`.
TARGETS_FIELDS = {"num_bins": 1024, "task_weights": None, "text_vocab_size": None, "grounded_predicts_box": False}


def targets_from_config(section, tokenizer, max_len: int) -> LocationTargets | None:
    """The `LocationTargets` of a `config.data.decoder_targets` section (None: off)."""
    if section is None:
        return None
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    unknown = sorted(set(section) - set(TARGETS_FIELDS))
    if unknown:
        raise ConfigError(f"config.data.decoder_targets has unknown field(s) {unknown}; its fields are "
                          f"{sorted(TARGETS_FIELDS)}.")
    return LocationTargets(tokenizer, max_len, **{**TARGETS_FIELDS, **section})
