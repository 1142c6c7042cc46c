"""Converting webdataset tar shards or manifests into ArrayRecord shards for training.

    summary = convert_to_array_record(["shards/{00000..00099}.tar" expanded, ...], "out/")

writes `out/data-00000-of-000NN.array_record`, ... (records in `records.py` format, input order
kept, `examples_per_shard` per file) and `out/convert_summary.json`, shows a tqdm progress bar,
and returns a `ConvertSummary` of what was written and what was skipped, per reason and per
input. Bad samples (missing image, empty / non-text caption, image PIL cannot identify,
truncated tar member) are skipped and counted, never fatal.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence

from big_contrast import paths
from big_contrast.data.errors import SKIP_REASONS, SkipRecord
from big_contrast.data.manifest import MANIFEST_EXTENSIONS, ManifestSource
from big_contrast.data.records import encode_record
from big_contrast.data.tarshards import check_image_header, iter_tar_samples
from big_contrast.errors import ConfigError, MissingFileError

SUMMARY_FILE = "convert_summary.json"


@dataclasses.dataclass
class ConvertSummary:
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_by_input: dict = dataclasses.field(default_factory=dict)
    shards: list = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        total = self.written + sum(self.skipped.values())
        lines = [f"wrote {self.written} of {total} records to {len(self.shards)} ArrayRecord shard(s)"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  skipped {self.skipped[reason]:>8}  {reason}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"written": self.written, "skipped": dict(self.skipped),
                "skipped_by_input": self.skipped_by_input,
                "shards": [os.path.basename(s) for s in self.shards]}


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Paths or globs (local or in a bucket) -> existing files; every pattern must match something."""
    patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not patterns:
        raise ConfigError("convert needs at least one input (tar shards or a manifest)")
    files = []
    for pattern in map(os.fspath, patterns):
        found = paths.glob(pattern) if paths.has_magic(pattern) else [pattern]
        missing = [p for p in found if not paths.parse(p).is_file()]
        if not found or missing:
            raise MissingFileError(f"convert input {pattern!r} does not exist (or matches no file)")
        files.extend(found)
    return files


def _manifest_records(path: str, image_key: str, caption_key: str, start: int = 0,
                      stop: int | None = None, source: ManifestSource | None = None
                      ) -> Iterator[dict | SkipRecord]:
    """Rows `start:stop` of a manifest as raw examples or the `SkipRecord` of each bad row."""
    from big_contrast.data.preprocess import usable_captions

    source = source or ManifestSource(path, image_key=image_key, caption_key=caption_key)
    for index in range(start, len(source) if stop is None else min(stop, len(source))):
        try:
            raw = source[index]
            raw["captions"] = usable_captions(raw["captions"])
            check_image_header(raw["image"])
            yield raw
        except SkipRecord as e:
            yield e


def _records(path: str, image_key: str, caption_key: str, json_caption_key: str):
    if path.lower().endswith(MANIFEST_EXTENSIONS):
        return _manifest_records(path, image_key, caption_key)
    return iter_tar_samples(path, json_caption_key)


class _ShardWriter:
    """Writes records into numbered ArrayRecord files, `per_shard` records each."""

    def __init__(self, output_dir: str, prefix: str, per_shard: int):
        self.output_dir, self.prefix, self.per_shard = output_dir, prefix, per_shard
        self.paths, self._writer, self._count = [], None, 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self._count == self.per_shard:
            self._close_current()
            path = os.path.join(self.output_dir, f"{self.prefix}-{len(self.paths):05d}.array_record.tmp")
            self._writer = ArrayRecordWriter(path, "group_size:1")  # group_size 1: fast random access
            self.paths.append(path)
        self._writer.write(record)
        self._count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._count = None, 0

    def finish(self) -> list[str]:
        """Closes and renames the files to `<prefix>-00000-of-000NN.array_record`."""
        self._close_current()
        final = []
        for i, path in enumerate(self.paths):
            name = f"{self.prefix}-{i:05d}-of-{len(self.paths):05d}.array_record"
            os.replace(path, os.path.join(self.output_dir, name))
            final.append(os.path.join(self.output_dir, name))
        return final


def convert_to_array_record(inputs: str | Sequence[str], output_dir: str, *,
                            examples_per_shard: int = 10_000, prefix: str = "data",
                            image_key: str = "filepath", caption_key: str = "title",
                            json_caption_key: str = "caption", overwrite: bool = False,
                            progress: bool = True) -> ConvertSummary:
    """Converts tar shards (`.tar`, `.tar.gz`) and/or manifests (`.csv`, `.tsv`, `.jsonl`).

    Args:
      inputs: paths or globs; the kind follows each file's extension.
      output_dir: created if needed; must not already hold `.array_record` files unless
        `overwrite` (which deletes them first).
      image_key / caption_key: manifest columns (open_clip's --csv-img-key / --csv-caption-key).
      json_caption_key: caption field of a tar sample's `.json` member when it has no `.txt`.
    """
    if examples_per_shard <= 0:
        raise ConfigError(f"examples_per_shard={examples_per_shard} must be positive")
    files = expand_inputs(inputs)
    os.makedirs(output_dir, exist_ok=True)
    existing = glob.glob(os.path.join(output_dir, "*.array_record*"))
    if existing and not overwrite:
        raise ConfigError(f"output_dir {output_dir!r} already holds {len(existing)} ArrayRecord "
                         "file(s); choose an empty folder or pass overwrite=True")
    for path in existing:
        os.remove(path)
    from tqdm import tqdm

    summary, writer = ConvertSummary(), _ShardWriter(output_dir, prefix, examples_per_shard)
    with tqdm(desc="convert", unit=" records", disable=not progress) as bar:
        for path in files:
            skipped_here = collections.Counter()
            for item in _records(path, image_key, caption_key, json_caption_key):
                if isinstance(item, SkipRecord):
                    skipped_here[item.reason] += 1
                    bar.set_postfix(skipped=sum(summary.skipped.values()) + sum(skipped_here.values()))
                else:
                    writer.write(encode_record(item["image"], item["captions"], key=item.get("key")))
                    summary.written += 1
                bar.update(1)
            summary.skipped.update(skipped_here)
            summary.skipped_by_input[path] = dict(skipped_here)
    summary.shards = writer.finish()
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary.to_json(), f, indent=2)
    return summary
