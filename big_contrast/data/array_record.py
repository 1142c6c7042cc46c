"""Random-access source over ArrayRecord files of `records.py`-serialized image-text records.

Shards may be local or in a bucket. The pinned `array_record` reader opens local files only (on
a `gs://` path it hangs, see experiments/cloud_storage), so remote shards are copied once, whole,
through `paths` into a per-host cache folder (`cache_dir`, default `$BIG_CONTRAST_CACHE` or
`~/.cache/big_contrast`) and read from there: the first run on a host pays one sequential
download of the shards, later runs and resumes reuse the copies (same object, same size). If
the shards do not fit on the cache's disk, opening the source fails before anything is copied.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import grain

from big_contrast import paths
from big_contrast.data.errors import SkipRecord
from big_contrast.data.records import decode_record
from big_contrast.errors import ConfigError, MissingFileError


def resolve_array_record_paths(path: str | Sequence[str]) -> list[str]:
    """A file, a directory (all `*.array_record*` files in it) or a glob -> sorted file list."""
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = []
    for pattern in map(paths.validate, patterns):
        if paths.is_remote(pattern):
            paths.check_readable(paths.glob_root(pattern))  # one sentence, in seconds
        if paths.has_magic(pattern):
            found = paths.glob(pattern)
            if not found:
                raise MissingFileError(f"no file matches the ArrayRecord pattern {pattern!r}")
        elif paths.parse(pattern).is_dir():
            found = paths.glob(os.path.join(pattern, "*.array_record*"))
            if not found:
                raise MissingFileError(
                    f"directory {pattern!r} holds no *.array_record files; write them with "
                    "`big-contrast data convert`")
        elif paths.parse(pattern).is_file():
            found = [pattern]
        else:
            raise MissingFileError(f"ArrayRecord path {pattern!r} does not exist")
        files.extend(found)
    return files


def default_cache_dir() -> str:
    return os.environ.get("BIG_CONTRAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "big_contrast")


def local_copies(files: Sequence[str], cache_dir: str | None = None) -> list[str]:
    """`files` with every remote one replaced by its copy under `cache_dir` (made on first use).

    A copy is reused when its size equals the object's; it is written to a temporary name and
    renamed, so a run killed mid-copy leaves no partial shard. Raises `ValueError` (one sentence)
    when the missing copies would not fit on the cache's disk.
    """
    cache_dir = cache_dir or default_cache_dir()
    plan = []  # (remote URL, local path, size) of each copy still to make
    local = []
    for name in files:
        if not paths.is_remote(name):
            local.append(name)
            continue
        target = os.path.join(cache_dir, paths.scheme(name), name.split("://", 1)[1])
        size = paths.parse(name).stat().length
        if not (os.path.isfile(target) and os.path.getsize(target) == size):
            plan.append((name, target, size))
        local.append(target)
    needed = sum(size for _, _, size in plan)
    if plan:
        os.makedirs(cache_dir, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if needed > free:
            raise ConfigError(
                f"the ArrayRecord shards to copy from the bucket need {needed / 2**30:.1f} GiB but the cache "
                f"folder {cache_dir!r} has {free / 2**30:.1f} GiB free; set the source's cache_dir (or "
                "BIG_CONTRAST_CACHE) to a larger disk")
    for url, target, _ in plan:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = f"{target}.partial-{os.getpid()}"
        with paths.parse(url).open("rb") as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, length=16 * 2**20)
        os.replace(partial, target)
    return local


class ArrayRecordSource:
    """Image-text records from ArrayRecord files, in file order then record order.

    `source[i]` -> `{'image': bytes, 'captions': [str, ...], 'key': ...}`. A record that is not
    in the `records.py` format raises `SkipRecord('undecodable_image')`.
    """

    def __init__(self, path: str | Sequence[str], cache_dir: str | None = None):
        self.paths = resolve_array_record_paths(path)
        self._records = grain.sources.ArrayRecordDataSource(local_copies(self.paths, cache_dir))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        try:
            return decode_record(self._records[index])
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipRecord("undecodable_image", f"record {index}: {e}") from None

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"
