"""Karpathy-split caption files (`dataset_coco.json`, `dataset_flickr30k.json`) as a source.

The files researchers already have for COCO 5k / Flickr30k 1k retrieval (Karpathy & Fei-Fei's
splits, used by CLIP, ALIGN and CLIP_benchmark):

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "test", "sentences": [{"raw": "A man with a red helmet ..."}, ...]}, ...]}

(`filepath` is absent for Flickr30k). Image i of the chosen split is
`image_dir/filepath/filename`; `image_dir` defaults to the JSON file's folder. Every sentence
of an image is one of its captions (`raw`, as CLIP_benchmark reads them). The JSON is read
once, at construction; image bytes lazily (a missing file is skipped and counted).
"""

from __future__ import annotations

import json

from big_contrast.data.errors import MissingDataError, SkipRecord
from big_contrast.errors import ConfigError


def _path(path):
    from big_contrast import paths

    return paths.parse(path)  # local or a bucket; a malformed URL is refused, not made a folder


def read_split(path: str, split: str) -> list[dict]:
    """The image entries of one split ('test', 'val', 'train', 'restval')."""
    file = _path(path)
    if not file.is_file():
        raise MissingDataError(
            f"Karpathy split file {str(path)!r} does not exist; download dataset_coco.json / "
            "dataset_flickr30k.json (Karpathy's splits) and put it there")
    try:
        images = json.loads(file.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(path)!r} is not a Karpathy split file (a JSON object with 'images'): {e}") from None
    entries = [image for image in images if image.get("split") == split]
    if not entries:
        splits = sorted({str(image.get("split")) for image in images})
        raise ConfigError(f"Karpathy split file {str(path)!r} has no images in split {split!r}; its splits are {splits}")
    return entries


class KarpathySource:
    """`source[i]` -> `{'image': bytes, 'captions': [every sentence], 'key': relative path}`."""

    def __init__(self, path: str, split: str = "test", image_dir: str | None = None):
        self.path, self.split = str(path), split
        self.image_dir = str(image_dir) if image_dir else str(_path(path).parent)
        self._entries = [(f"{e['filepath']}/{e['filename']}" if e.get("filepath") else e["filename"],
                          [s.get("raw") for s in e.get("sentences", [])]) for e in read_split(path, split)]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        relative, captions = self._entries[index]
        try:
            image = (_path(self.image_dir) / relative).read_bytes()
        except OSError as e:
            raise SkipRecord("missing_image", f"{relative}: {e}") from None
        return {"image": image, "captions": captions, "key": relative}

    def __repr__(self) -> str:
        return f"KarpathySource({self.path!r}, split={self.split!r}, {len(self)} images)"
