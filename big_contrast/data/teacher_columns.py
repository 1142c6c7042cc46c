"""Precomputed teacher embeddings as columns of the data: embed a source with a teacher workdir
and write ArrayRecord shards whose records carry `teacher_image` / `teacher_text` float vectors.

    from big_contrast.data.teacher_columns import write_teacher_columns
    write_teacher_columns({"kind": "manifest", "path": "pairs.csv"}, "runs/large", "data/with_teacher")

    # the student's config:
    config.data.sources = {"pairs": dict(kind="array_record", path="data/with_teacher")}
    config.data.vector_keys = ("teacher_image", "teacher_text")
    config.teacher = "data"
    config.loss_objective = "sigmoid + 1.0 * distill"

Why: a teacher run inside the step (`config.teacher = dict(workdir=...)`) costs its forward pass
every step and must read the student's tokens; stored embeddings cost one pass over the data
and let the teacher use its own preprocessing and tokenizer (MobileCLIP's reinforced datasets,
CLIP-KD's offline variant). Each record keeps its image bytes, captions, key and other fields
(labels) as they were, plus the two vectors (JSON lists of float32 values in the record header,
`records.py`). What the teacher embeds: the image through the teacher's recorded `pp_eval` (one
deterministic view; the student's augmented crop differs, as in any offline distillation) and the
record's FIRST usable caption with the teacher's tokenizer. A record with several captions
therefore pairs the student's drawn caption with the teacher's first one: write one caption per
record for exact pairs. Records the teacher's preprocessing cannot read are skipped and counted.
The output is a local folder or a bucket (`gs://...`, `s3://...`): ArrayRecord writes local files
only, so a bucket's shards are staged in a local temporary folder and uploaded when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np

from big_contrast import paths, sharding
from big_contrast import teacher as frozen
from big_contrast.data.convert import _ShardWriter
from big_contrast.data.errors import SkipRecord
from big_contrast.data.image_ops import parse_image_pp
from big_contrast.data.preprocess import usable_captions
from big_contrast.data.records import encode_record
from big_contrast.data.sources import open_source
from big_contrast.data.tokenizer import encode_fixed, make_tokenizer
from big_contrast.errors import ConfigError

COLUMNS = ("teacher_image", "teacher_text")


def write_teacher_columns(source_config: dict, teacher_workdir, output_dir: str, *, batch_size: int = 64,
                          step: int | None = None, examples_per_shard: int = 10_000, limit: int | None = None) -> dict:
    """Embeds every record of `source_config` (a data source config, `sources.py`) with the
    teacher of `teacher_workdir` (its checkpoint `step`, default the newest) and writes them to
    `output_dir` with the two columns. Returns {"records", "skipped", "shards", "dim", "step"}."""
    output_dir = paths.validate(output_dir)
    if paths.glob(str(paths.join(output_dir, "*.array_record*"))):
        raise ConfigError(f"{output_dir} holds ArrayRecord files already; write the teacher columns into a new folder.")
    paths.check_writable(output_dir)  # fail before embedding anything, not at the first write
    remote = paths.is_remote(output_dir)
    staging = tempfile.mkdtemp(prefix="teacher-columns-") if remote else output_dir
    record = frozen.read_record(teacher_workdir)
    if record.pp is None or record.tokenizer is None:
        raise ConfigError(f"The teacher in {record.workdir} records no pp_eval or tokenizer; it cannot embed raw data.")
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])
    teacher, params = frozen.load_teacher(record, mesh, towers=("image", "text"), student_pp=record.pp, step=step)
    embed = jax.jit(lambda p, images, texts: frozen.embed(teacher, p, images, texts)[0])
    source = open_source("input", dict(source_config))
    pp, tokenizer = parse_image_pp(record.pp), make_tokenizer(record.tokenizer, bool(record.lowercase))
    writer, pending, skipped, dim = _ShardWriter(staging, "data", examples_per_shard), [], 0, None

    def flush():
        nonlocal dim
        images = np.stack([p[1] for p in pending])
        texts = np.stack([p[2] for p in pending])
        out = jax.device_get(embed(params, images, texts))
        dim = out["image"].shape[-1]
        for (raw, _, _), zimg, ztxt in zip(pending, out["image"], out["text"]):
            writer.write(_with_columns(raw, zimg, ztxt))
        pending.clear()

    count = len(source) if limit is None else min(limit, len(source))
    for index in range(count):
        try:
            raw = source[index]
            caption = usable_captions(raw.get("captions"))[0]
            pending.append((raw, pp(raw.get("image"), None), encode_fixed(tokenizer, caption, record.max_len)))
        except SkipRecord:
            skipped += 1
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    shards = writer.finish()
    if remote:
        shards = _upload(shards, output_dir, staging)
    return dict(records=count - skipped, skipped=skipped, shards=shards, dim=dim, step=teacher.step)


def _upload(local_shards: list[str], output_dir: str, staging: str) -> list[str]:
    """Copies each finished shard to the bucket (one object each, visible when closed)."""
    uploaded = []
    try:
        for local in local_shards:
            target = paths.join(output_dir, os.path.basename(local))
            with open(local, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            uploaded.append(str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return uploaded


def _with_columns(raw: dict, zimg, ztxt) -> bytes:
    """The record re-serialised as it was (image bytes untouched), plus the two vectors."""
    extra = {k: _json_value(v) for k, v in raw.items() if k not in ("image", "captions", "key") and not k.startswith("_")}
    captions = raw["captions"] if isinstance(raw["captions"], list) else [raw["captions"]]
    return encode_record(raw["image"], [str(c) for c in captions], raw.get("key"), **extra,
                         teacher_image=[float(v) for v in np.asarray(zimg, np.float32)],
                         teacher_text=[float(v) for v in np.asarray(ztxt, np.float32)])


def _json_value(value):
    return value.item() if isinstance(value, np.generic) else value
