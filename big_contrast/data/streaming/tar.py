"""A forward-only webdataset tar parser that knows the byte span of every sample.

    for sample in iter_samples(reader, url):   # reader: read(n) / tell(), e.g. a ShardReader
        sample.key, sample.files, sample.start, sample.end   # or a SkipRecord for a bad one

Why not `tarfile` in stream mode: resuming mid-shard and restoring a shuffle buffer need the
byte offset where each sample starts and ends, so that a resumed stream reopens the shard at
`end` and a buffered sample is fetched again with one range request over `[start, end)`.
The format is the POSIX one img2dataset writes through python's `tarfile` (ustar, with pax
`x` headers for long or non-ASCII names, GNU `L` long names also accepted): 512-byte headers,
member data padded to 512 bytes, two zero blocks at the end.

Samples group consecutive members by key as in `tarshards.py` (`split_key`); a sample's span
starts at its first header (pax / long-name headers included) and ends where the next key's
first header starts. Bad input: a header whose checksum does not match is `corrupt_shard` (the
rest of the shard cannot be framed, so it counts as one skipped record); a shard that ends
inside a member yields its partial sample as `truncated_tar_member` and stops.
"""

from __future__ import annotations

import dataclasses
import io

from big_contrast.data.errors import SkipRecord
from big_contrast.data.tarshards import split_key

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


@dataclasses.dataclass
class Sample:
    key: str
    files: dict
    start: int
    end: int


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _Corrupt(f"bad number field {field!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == computed


def _read_exact(reader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) < n:
        raise _Truncated()
    return data


def _read_padded(reader, size: int) -> bytes:
    padded = -(-size // BLOCK) * BLOCK
    return _read_exact(reader, padded)[:size]


def _pax_fields(data: bytes) -> dict:
    fields, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return fields


def _members(reader):
    """Yields `(header_offset, name, data)` per regular file; stops at the end marker."""
    pending_name, pending_size = None, None
    start = None  # first header of the current member, extended headers included
    while True:
        offset = reader.tell()
        block = reader.read(BLOCK)
        if not block:
            return  # the object ends without the end marker: treated as a clean end
        if len(block) < BLOCK:
            raise _Truncated()
        if block == bytes(BLOCK):
            return
        if not _checksum_ok(block):
            raise _Corrupt(f"tar header at byte {offset} fails its checksum")
        start = offset if start is None else start
        kind, size = block[156:157], _number(block[124:136])
        if kind in (b"x", b"L"):
            data = _read_padded(reader, size)
            if kind == b"x":
                fields = _pax_fields(data)
                pending_name = fields.get("path", pending_name)
                pending_size = int(fields["size"]) if "size" in fields else pending_size
            else:
                pending_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        size = pending_size if pending_size is not None else size
        name = pending_name or _header_name(block)
        data = _read_padded(reader, size)
        if kind in _REGULAR:
            yield start, name, data
        pending_name = pending_size = start = None


def _header_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def iter_samples(reader, url: str = "<shard>"):
    """Yields `Sample`s (or `SkipRecord`s for a truncated / corrupt rest of the shard)."""
    current = None
    try:
        for offset, name, data in _members(reader):
            parts = split_key(name)
            if parts is None:
                continue
            key, ext = parts
            if current is not None and key != current.key:
                current.end = offset
                yield current
                current = None
            if current is None:
                current = Sample(key, {}, offset, offset)
            current.files[ext] = data
            current.end = reader.tell()  # members follow each other without gaps
    except _Truncated:
        yield SkipRecord("truncated_tar_member", f"{url}: ends inside sample "
                         f"{current.key if current else None!r}")
        return
    except _Corrupt as e:
        yield SkipRecord("corrupt_shard", f"{url}: {e}")
        return
    if current is not None:
        yield current


def sample_from_bytes(data: bytes, start: int, url: str = "<shard>") -> Sample | SkipRecord:
    """Parses the one sample of `data` = bytes `[start, start + len(data))` of a shard."""

    class _Offset(io.BytesIO):
        def tell(self):  # offsets in the shard, not in this slice
            return start + super().tell()

    samples = list(iter_samples(_Offset(data), url))
    if len(samples) != 1:
        return SkipRecord("corrupt_shard", f"{url}: bytes {start}+{len(data)} hold {len(samples)} samples")
    return samples[0]
