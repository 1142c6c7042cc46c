"""The per-example map stage: raw example -> `{'image', 'text', ...}` or a skip marker.

Runs in grain's worker processes (it is part of the `MapDataset` that `mp_prefetch` slices).
A record that cannot be used becomes `{'_skip': reason_index, '_source': k}` instead of
raising; the batcher (`batching.py`) counts those markers and leaves them out of the batch.
A marker followed by a counting batcher, rather than grain's `filter`, is what lets the
counts reach the trainer: a filter would drop the record without a trace.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from big_contrast.data.errors import REASON_INDEX, SkipRecord
from big_contrast.data.image_ops import parse_image_pp
from big_contrast.data.tokenizer import encode_fixed
from big_contrast.errors import ConfigError


def _as_text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRecord("non_text_caption", "caption bytes are not UTF-8") from None
    if isinstance(value, np.str_):
        return str(value)
    if not isinstance(value, str):
        raise SkipRecord("non_text_caption", f"caption of type {type(value).__name__}")
    return value


def usable_captions(captions) -> list[str]:
    """The non-empty, stripped text captions of a record; raises `SkipRecord` if there is none.

    `captions` may be a string, bytes (UTF-8), or a list / array of them. The reason is
    `empty_caption`, or `non_text_caption` when some value was not text.
    """
    if captions is None:
        raise SkipRecord("empty_caption", "no caption")
    if isinstance(captions, (str, bytes, np.str_)):
        captions = [captions]
    elif isinstance(captions, np.ndarray):
        captions = captions.reshape(-1).tolist()
    elif not isinstance(captions, (list, tuple)):
        raise SkipRecord("non_text_caption", f"captions of type {type(captions).__name__}")
    usable, non_text = [], None
    for value in captions:
        try:
            text = _as_text(value).strip()
        except SkipRecord as e:
            non_text = e
            continue
        if text:
            usable.append(text)
    if not usable:
        raise non_text or SkipRecord("empty_caption", "only empty captions")
    return usable


def choose_caption(captions, rng: np.random.Generator) -> str:
    """One usable caption, uniformly at random (seeded by `rng`) when there are several."""
    usable = usable_captions(captions)
    return usable[int(rng.integers(len(usable)))] if len(usable) > 1 else usable[0]


def all_captions(captions, max_captions: int, tokenizer, max_len: int) -> dict:
    """Every usable caption (retrieval evaluation): `'texts'` int32 [K, max_len] and
    `'caption_mask'` bool [K], K = max_captions, real captions first."""
    usable = usable_captions(captions)
    if len(usable) > max_captions:
        raise ConfigError(
            f"an image has {len(usable)} captions, more than data.max_captions={max_captions}; raise "
            "data.max_captions so that every caption is evaluated")
    texts = np.zeros((max_captions, max_len), np.int32)
    for i, caption in enumerate(usable):
        texts[i] = encode_fixed(tokenizer, caption, max_len)
    return {"texts": texts, "caption_mask": np.arange(max_captions) < len(usable)}


class ProcessExample(grain.transforms.RandomMap):
    """Picks a caption, tokenizes it, decodes and preprocesses the image.

    Output: `{'image': [H, W, 3], 'text': int32 [max_len], '_source': k, <label_keys>...}`;
    an op string ending in `naflex(...)` gives `patches`, `patch_mask`, `spatial_shapes` instead
    of `image` (`data/naflex.py`).
    With `max_captions` (evaluation), every caption instead (`all_captions`). With
    `captions_optional` (evaluation), a record without a `captions` field (a labelled source
    without captions) gives no text fields; in training it is skipped as `empty_caption`.
    The random draws (caption choice, then image ops) come from grain's per-index generator,
    so an example is processed the same way whichever worker handles it. With `decoder_targets`
    (a `location_targets.LocationTargets`: LocCa), the decoder's target fields are added from the
    chosen caption and the record's `boxes`, their task drawn last from the same generator (so the
    earlier draws are unchanged and a resumed run draws the same task per example).
    """

    def __init__(self, image_pp: str, tokenizer, max_len: int, label_keys: Sequence[str] = (),
                 max_captions: int | None = None, captions_optional: bool = False, decoder_targets=None,
                 multicrop=None, vector_keys: Sequence[str] = ()):
        if max_len < 2:
            raise ConfigError(f"max_len={max_len} leaves no room for a token before EOS; use >= 2")
        self.image_pp = parse_image_pp(image_pp)
        self.tokenizer, self.max_len = tokenizer, max_len
        self.label_keys = tuple(label_keys)
        self.vector_keys = tuple(vector_keys)  # float vectors copied as float32 (teacher embeddings, issue 23)
        self.max_captions, self.captions_optional = max_captions, captions_optional
        self.decoder_targets = decoder_targets
        self.multicrop = multicrop  # SILC: a data.multicrop.MultiCrop adds 'local_images' [V, h, w, 3]

    def _text(self, raw: dict, rng: np.random.Generator) -> tuple[dict, str]:
        """(text fields, the caption they hold: the decoder's captioning target)."""
        if "captions" not in raw and self.captions_optional:
            return {}, ""
        if self.max_captions:
            fields = all_captions(raw.get("captions"), self.max_captions, self.tokenizer, self.max_len)
            return fields, usable_captions(raw.get("captions"))[0]
        caption = choose_caption(raw.get("captions"), rng)
        return {"text": encode_fixed(self.tokenizer, caption, self.max_len)}, caption

    def random_map(self, raw: dict, rng: np.random.Generator) -> dict:
        source = raw["_source"]
        if "_skip" in raw:
            return {"_skip": REASON_INDEX[raw["_skip"]], "_source": source}
        try:
            text, caption = self._text(raw, rng)
            if self.multicrop is None:
                image, views = self.image_pp(raw.get("image"), rng), {}
            else:  # SILC (data/multicrop.py): the same global view first, then the local crops
                views = self.multicrop(raw.get("image"), rng)
                image = views.pop("image")
            if self.decoder_targets is not None:  # LocCa: decoder_targets / _mask / _task / _box
                text.update(self.decoder_targets.from_record(raw, caption, rng))
        except SkipRecord as e:
            return {"_skip": REASON_INDEX[e.reason], "_source": source}
        fields = image if isinstance(image, dict) else {"image": image}  # a dict: NaFlex fields (issue 22)
        out = {**fields, **views, **text, "_source": source}
        for key in self.label_keys:
            if key not in raw:
                raise ConfigError(
                    f"data.label_keys asks for {key!r}, which this source's examples lack "
                    f"(they have {sorted(k for k in raw if not k.startswith('_'))})")
            out[key] = np.int32(raw[key])
        for key in self.vector_keys:  # issue 23: e.g. teacher_image / teacher_text (data/teacher_columns.py)
            if key not in raw:
                raise ConfigError(f"data.vector_keys asks for {key!r}, which this source's examples lack; write it "
                                  "with big_contrast.data.teacher_columns (or drop it from data.vector_keys)")
            out[key] = np.asarray(raw[key], np.float32)
        return out
