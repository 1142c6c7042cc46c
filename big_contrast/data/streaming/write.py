"""Writing streamable webdataset tar shards: the streaming counterpart of `data convert`.

    summary = convert_to_tar_shards(["data.csv"], "gs://bucket/shards", examples_per_shard=10_000)

`data convert` writes ArrayRecord, whose pinned C++ reader opens local files only; streaming
reads tar shards by range requests instead (`reader.py`, `tar.py`). This writes the same
inputs `convert` reads (tar shards to re-shard or clean, `.csv` / `.tsv` / `.jsonl` manifests)
as uncompressed tars in img2dataset's layout -- `<key>.<jpg|png|...>`, `<key>.txt` (the first
caption) and `<key>.json` (`{"captions": [...], "key": ...}`) per sample -- with the bad
records skipped and counted exactly as `convert` does. Each shard is built in memory and
written in one piece through `big_contrast.paths` (local or a bucket), named
`<prefix>-00000-of-000NN.tar` once all are written (written first as `<prefix>-00000.tar`).
"""

from __future__ import annotations

import collections
import io
import json
import tarfile
from collections.abc import Sequence

from big_contrast import paths
from big_contrast.data.convert import ConvertSummary, _records, expand_inputs
from big_contrast.data.errors import SkipRecord
from big_contrast.errors import ConfigError


def _image_extension(image: bytes) -> str:
    if image[:3] == b"\xff\xd8\xff":
        return "jpg"
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # PIL identifies by content, not by name


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _TarShardWriter:
    def __init__(self, output: str, prefix: str, per_shard: int):
        self.output, self.prefix, self.per_shard = output.rstrip("/"), prefix, per_shard
        self.paths: list[str] = []
        self._buffer, self._tar, self._count = None, None, 0

    def write(self, record: dict, index: int) -> None:
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)
        key = f"{index:09d}"
        captions = list(record["captions"])
        _add(self._tar, f"{key}.{_image_extension(record['image'])}", record["image"])
        _add(self._tar, f"{key}.txt", captions[0].encode("utf-8"))
        meta = {"captions": captions, "key": record.get("key")}
        _add(self._tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self._count += 1
        if self._count == self.per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = f"{self.output}/{self.prefix}-{len(self.paths):05d}.tar"
        paths.write_bytes(path, self._buffer.getvalue())
        self.paths.append(path)
        self._buffer, self._tar, self._count = None, None, 0

    def finish(self) -> list[str]:
        self._flush()
        final = []
        for i, path in enumerate(self.paths):
            target = f"{self.output}/{self.prefix}-{i:05d}-of-{len(self.paths):05d}.tar"
            paths.parse(path).rename(target)
            final.append(target)
        return final


def convert_to_tar_shards(inputs: str | Sequence[str], output: str, *, examples_per_shard: int = 10_000,
                          prefix: str = "data", image_key: str = "filepath", caption_key: str = "title",
                          json_caption_key: str = "caption") -> ConvertSummary:
    """Writes `inputs` (tar shards and / or manifests) as streamable tar shards under `output`."""
    if examples_per_shard <= 0:
        raise ConfigError(f"examples_per_shard={examples_per_shard} must be positive")
    files = expand_inputs(inputs)
    existing = paths.glob(f"{output.rstrip('/')}/{prefix}-*.tar")
    if existing:
        raise ConfigError(f"{output!r} already holds {len(existing)} {prefix}-*.tar shard(s); choose an empty folder")
    summary, writer = ConvertSummary(), _TarShardWriter(output, prefix, examples_per_shard)
    for path in files:
        skipped_here = collections.Counter()
        for item in _records(path, image_key, caption_key, json_caption_key):
            if isinstance(item, SkipRecord):
                skipped_here[item.reason] += 1
            else:
                writer.write(item, summary.written)
                summary.written += 1
        summary.skipped.update(skipped_here)
        summary.skipped_by_input[path] = dict(skipped_here)
    summary.shards = writer.finish()
    return summary
