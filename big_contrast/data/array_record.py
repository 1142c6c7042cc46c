"""Random-access source over ArrayRecord files of `records.py`-serialized image-text records."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import grain

from big_contrast.data.errors import SkipRecord
from big_contrast.data.records import decode_record


def resolve_array_record_paths(path: str | Sequence[str]) -> list[str]:
    """A file, a directory (all `*.array_record*` files in it) or a glob -> sorted file list."""
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = []
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.array_record*")))
            if not found:
                raise FileNotFoundError(
                    f"directory {pattern!r} holds no *.array_record files; write them with "
                    "`big-contrast data convert`")
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise FileNotFoundError(f"no file matches the ArrayRecord pattern {pattern!r}")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f"ArrayRecord path {pattern!r} does not exist")
        files.extend(found)
    return files


class ArrayRecordSource:
    """Image-text records from ArrayRecord files, in file order then record order.

    `source[i]` -> `{'image': bytes, 'captions': [str, ...], 'key': ...}`. A record that is not
    in the `records.py` format raises `SkipRecord('undecodable_image')`.
    """

    def __init__(self, path: str | Sequence[str]):
        self.paths = resolve_array_record_paths(path)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        try:
            return decode_record(self._records[index])
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipRecord("undecodable_image", f"record {index}: {e}") from None

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"
