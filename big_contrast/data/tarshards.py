"""Reading webdataset-style tar shards (as written by img2dataset) for `convert`.

A sample is the run of consecutive tar members sharing a key: the member path up to the first
dot of its file name (`00001/000010042.jpg`, `00001/000010042.txt` and `00001/000010042.json`
form sample `00001/000010042`). The image is the `jpg` / `jpeg` / `png` / `webp` member; the
caption comes from `txt` (the whole text), or else from the `json` member's `json_caption_key`
field (a string or a list of strings). Shards are read as a stream (`.tar`, `.tar.gz`, ...).

A shard that ends inside a member (a truncated download) yields its last, incomplete sample as
`SkipRecord('truncated_tar_member')` and stops; an uncompressed `.tar` whose size is not a
multiple of the 512-byte tar block is also treated as truncated at its end. Shards are read
through `big_contrast.paths`, so a shard may be local or in a bucket (`gs://`, `s3://`).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator

from PIL import Image

from big_contrast import paths
from big_contrast.data.errors import SkipRecord
from big_contrast.errors import MissingFileError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_TRUNCATION_ERRORS = (tarfile.ReadError, EOFError, zlib.error, OSError)


def split_key(member_name: str) -> tuple[str, str] | None:
    """`'dir/0001.seg.png'` -> `('dir/0001', 'seg.png')`; None for names without an extension."""
    match = _KEY_RE.match(member_name)
    return (match.group(1), match.group(2).lower()) if match else None


def _caption_from_files(files: dict[str, bytes], json_caption_key: str) -> list:
    if "txt" in files:
        try:
            return [files["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            raise SkipRecord("non_text_caption", "txt member is not UTF-8") from None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SkipRecord("non_text_caption", "json member does not parse") from None
        value = meta.get(json_caption_key) if isinstance(meta, dict) else None
        if value is None:
            raise SkipRecord("empty_caption", f"json member has no {json_caption_key!r}")
        return value if isinstance(value, list) else [value]
    raise SkipRecord("empty_caption", "sample has no txt or json member")


def sample_to_record(key: str, files: dict[str, bytes], json_caption_key: str = "caption") -> dict:
    """One webdataset sample -> raw example; raises `SkipRecord` for an unusable sample."""
    from big_contrast.data.preprocess import usable_captions

    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None:
        raise SkipRecord("missing_image", f"sample {key!r} has no image member")
    captions = usable_captions(_caption_from_files(files, json_caption_key))
    check_image_header(files[image_ext])
    return {"image": files[image_ext], "captions": captions, "key": key}


def check_image_header(data: bytes) -> None:
    """Cheap check that the bytes are an image PIL can identify (full decoding is left to training)."""
    try:
        Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SkipRecord("undecodable_image", str(e)) from None


def iter_tar_samples(path: str, json_caption_key: str = "caption") -> Iterator[dict | SkipRecord]:
    """Yields a raw example, or the `SkipRecord` explaining why it was dropped, per sample."""
    shard = paths.parse(path)
    if not shard.is_file():
        raise MissingFileError(f"tar shard {path!r} does not exist")
    key, files = None, {}
    truncated = False
    with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        try:
            for member in tar:
                parts = split_key(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if key is not None and parts[0] != key:
                    yield _record_or_skip(key, files, json_caption_key)
                    files = {}
                key = parts[0]
                files[parts[1]] = tar.extractfile(member).read()
        except _TRUNCATION_ERRORS:
            truncated = True
    if path.endswith(".tar") and shard.stat().length % tarfile.BLOCKSIZE:
        truncated = True
    if truncated:
        yield SkipRecord("truncated_tar_member", f"{path}: ends inside sample {key!r}")
    elif key is not None:
        yield _record_or_skip(key, files, json_caption_key)


def _record_or_skip(key, files, json_caption_key):
    try:
        return sample_to_record(key, files, json_caption_key)
    except SkipRecord as e:
        return e
