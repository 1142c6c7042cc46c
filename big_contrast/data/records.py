"""The serialization of one image-text record inside an ArrayRecord file.

A record is a byte string laid out as

    b"BCR1"                      4 bytes, magic + format version
    header_length                4 bytes, unsigned little-endian
    header                       header_length bytes, UTF-8 JSON object
    image                        the rest: the encoded image file (JPEG, PNG, ...) as is

The JSON header holds `"captions"` (a list of strings, at least one) and optionally `"key"`
(the record's name in its original data, e.g. the webdataset key) and any extra
JSON-serialisable fields (kept, ignored by the pipeline). The image bytes are not re-encoded.
Any language reads it with a JSON parser and no protobuf or TensorFlow:

    header_length = int.from_bytes(record[4:8], "little")
    header = json.loads(record[8:8 + header_length]); image = record[8 + header_length:]
"""

from __future__ import annotations

import json
import struct

from big_contrast.errors import ConfigError

MAGIC = b"BCR1"
_LENGTH = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LENGTH.size


def encode_record(image: bytes, captions: list[str], key: str | None = None, **extra) -> bytes:
    """Serializes one record; `captions` must be a non-empty list of strings."""
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(f"image must be the encoded file as bytes, got {type(image).__name__}")
    if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
    header = {"captions": list(captions), **extra}
    if key is not None:
        header["key"] = key
    header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + _LENGTH.pack(len(header_bytes)) + header_bytes + bytes(image)


def decode_record(record: bytes) -> dict:
    """Parses one record into `{'image': bytes, 'captions': [...], 'key': ..., ...}`."""
    if record[: len(MAGIC)] != MAGIC:
        raise ConfigError(
            f"not a big_contrast record (first bytes {bytes(record[:8])!r}, expected {MAGIC!r}); "
            "ArrayRecord files for training are written by `big-contrast data convert`")
    (header_length,) = _LENGTH.unpack_from(record, len(MAGIC))
    header = json.loads(bytes(record[_PREFIX : _PREFIX + header_length]).decode("utf-8"))
    header["image"] = bytes(record[_PREFIX + header_length :])
    return header
