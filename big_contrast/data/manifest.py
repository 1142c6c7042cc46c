"""CSV / TSV / JSONL manifests: one row per image, a path column and one or more caption columns.

The idea of open_clip's `--csv-img-key filepath --csv-caption-key title --csv-separator`:
the column names are configurable (`image_key`, `caption_key`), image paths are relative to
the manifest's folder unless absolute, and `caption_key` may name several columns
(`"title,alt_text"` or a list) whose non-empty values all become captions of the row; in JSONL
a caption field may also hold a list of strings. The format follows the extension: `.csv`
(comma), `.tsv` (tab), `.jsonl` / `.json` (one JSON object per line); `separator` overrides the
CSV delimiter.

A labelled manifest (`label_key=COLUMN`) also yields an int `label`: the column holds class
indices or class names, the latter mapped through `class_names` (the evaluator's list, handed
over by the eval glue). Its captions are optional: without the caption column(s) the rows
have an image and a label only (a zero-shot / few-shot eval set).

With `boxes_key=COLUMN`, the column's value of a row becomes the record's `boxes` (LocCa regions
for the decoder's referring-expression / grounded-caption targets, `data/location_targets.py`):
a list of `{"box": [ymin, xmin, ymax, xmax], "phrase": "..."}` with coordinates in [0, 1] of the
image, as JSON text in a CSV / TSV cell or as the list itself in JSONL; an empty cell is a row
without boxes (captioned only). A malformed value is skipped and counted (`malformed_box`) when
the pipeline reads it.

The manifest is read once, at construction, so a missing column or a bad label fails before
anything runs; image files are read lazily in `__getitem__` (a missing one is skipped and counted).
Manifest and images may be local or in a bucket (`gs://`, `s3://`, through `paths`); a relative
image path is joined to the manifest's folder, a URL or an absolute path is used as given.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

from big_contrast import paths
from big_contrast.data.errors import MissingDataError, SkipRecord
from big_contrast.data.labels import label_index
from big_contrast.errors import ConfigError

MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")


def parse_keys(keys: str | Sequence[str]) -> tuple[str, ...]:
    """`"a,b"` or `["a", "b"]` -> `("a", "b")`."""
    parts = keys.split(",") if isinstance(keys, str) else list(keys)
    parts = tuple(k.strip() for k in parts if k.strip())
    if not parts:
        raise ConfigError(f"caption_key {keys!r} names no column")
    return parts


def _read_rows(path: str, separator: str | None) -> tuple[list[dict], list[str]]:
    """Returns the rows as dicts and the column names (for error messages)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in MANIFEST_EXTENSIONS:
        raise ConfigError(
            f"manifest {path!r} has extension {ext!r}; use one of {MANIFEST_EXTENSIONS}")
    # Bytes through the path layer, then text with newlines as written (csv wants newline="").
    with io.StringIO(paths.read_bytes(path).decode("utf-8"), newline="") as f:
        if ext in (".jsonl", ".json"):
            rows = []
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"manifest {path!r} line {line_number} is not JSON: {e}") from None
            columns = sorted({k for row in rows[:100] for k in row})
            return rows, columns
        delimiter = separator or ("\t" if ext == ".tsv" else ",")
        reader = csv.DictReader(f, delimiter=delimiter)
        return list(reader), list(reader.fieldnames or [])


class ManifestSource:
    """Image-text pairs listed in a CSV/TSV/JSONL manifest.

    `source[i]` -> `{'image': bytes, 'captions': [...], 'key': image path}`.
    """

    def __init__(self, path: str, image_key: str = "filepath",
                 caption_key: str | Sequence[str] = "title", separator: str | None = None,
                 label_key: str | None = None, class_names: Sequence[str] | None = None,
                 boxes_key: str | None = None):
        if paths.is_remote(path):
            paths.check_readable(path)  # endpoint, credentials, bucket, object: one sentence, in seconds
            self.path = paths.validate(path)
            self.root = os.fspath(paths.parse(path).parent)
        else:
            if not os.path.isfile(path):
                raise MissingDataError(f"manifest {path!r} does not exist")
            self.path = os.path.abspath(path)
            self.root = os.path.dirname(self.path)
        self.image_key = image_key
        self.caption_keys = parse_keys(caption_key)
        rows, columns = _read_rows(self.path, separator)
        if not rows:
            raise ConfigError(f"manifest {path!r} has no rows")
        if label_key and not any(k in columns for k in self.caption_keys):
            self.caption_keys = ()  # a labelled eval manifest without captions
        missing = [k for k in (image_key, *self.caption_keys, *([label_key] if label_key else []),
                               *([boxes_key] if boxes_key else [])) if k not in columns]
        if missing:
            raise ConfigError(
                f"manifest {path!r} has no column(s) {missing}; its columns are {columns}. "
                "Set the source's image_key / caption_key (open_clip's --csv-img-key / "
                "--csv-caption-key) to the right names, or check the separator.")
        # Keep only what __getitem__ needs: (image path, caption values) per row.
        self._rows = [(row.get(image_key), [row.get(k) for k in self.caption_keys]) for row in rows]
        self._labels = self._read_labels(rows, label_key, class_names) if label_key else None
        self._boxes = [row.get(boxes_key) or None for row in rows] if boxes_key else None  # LocCa regions

    def _read_labels(self, rows, label_key, class_names) -> list[int]:
        inverse = {name: i for i, name in enumerate(class_names)} if class_names is not None else None
        return [label_index(row.get(label_key), class_names,
                            f"manifest {self.path!r} row {i + 1} column {label_key!r}", inverse)
                for i, row in enumerate(rows)]

    def __len__(self) -> int:
        return len(self._rows)

    def captions(self, index: int) -> list:
        """The row's caption values (unvalidated), without reading the image."""
        values = []
        for value in self._rows[index][1]:
            values.extend(value if isinstance(value, list) else [value])
        return [v for v in values if v is not None]

    def image_path(self, index: int) -> str | None:
        relative = self._rows[index][0]
        if not isinstance(relative, str) or not relative.strip():
            return None
        if paths.is_remote(relative) or os.path.isabs(relative):
            return relative
        return os.fspath(paths.join(self.root, relative))

    def __getitem__(self, index: int) -> dict:
        path = self.image_path(index)
        if path is None:
            raise SkipRecord("missing_image", f"row {index} has no {self.image_key!r} value")
        try:
            image = paths.read_bytes(path)
        except OSError as e:  # FileNotFoundError locally and from gcsfs / s3fs alike
            raise SkipRecord("missing_image", f"{path}: {e.strerror or e}") from None
        example = {"image": image, "key": self._rows[index][0]}
        if self.caption_keys:
            example["captions"] = self.captions(index)
        if self._labels is not None:
            example["label"] = self._labels[index]
        if self._boxes is not None and self._boxes[index] is not None:
            example["boxes"] = self._boxes[index]
        return example

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, {len(self)} rows)"
