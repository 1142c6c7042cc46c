"""What `big-contrast data convert | train-tokenizer` do, as plain functions (the command line
itself is `big_contrast/commands/data_convert.py` and `data_tokenizer.py`).

    convert(["shards/*.tar"], "out_dir/", runner="serial")          # -> ConvertSummary
    convert(["data.csv"], "gs://b/shards", output_format="tar")     # streamable tar shards
    train_tokenizer("manifest.csv", 8000, "tok.model")              # -> {'path', 'vocab_size', 'records'}
    source_config_from_spec("tfds:coco_captions")                   # -> a source config
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from big_contrast import paths
from big_contrast.data.convert import ConvertSummary, convert_to_array_record
from big_contrast.data.errors import SkipRecord
from big_contrast.data.manifest import MANIFEST_EXTENSIONS
from big_contrast.errors import ConfigError

OUTPUT_FORMATS = ("array_record", "tar")  # `data convert --format`


def convert(inputs: str | Sequence[str], output_dir: str, *, examples_per_shard: int = 10_000,
            image_key: str = "filepath", caption_key: str = "title",
            json_caption_key: str = "caption", overwrite: bool = False,
            progress: bool = True, runner: str = "serial", pipeline_args: Sequence[str] = (),
            workers: int | None = None, output_format: str = "array_record") -> ConvertSummary:
    """Tar shards / manifests -> ArrayRecord shards in `output_dir`; prints and returns the summary.

    `output_format='tar'` writes streamable webdataset tar shards instead (kind='stream',
    `data/streaming/write.py`), in this process, to a local folder or a bucket.

    `runner='serial'` converts in this process (records packed `examples_per_shard` per file);
    a Beam runner name (`'DirectRunner'`, `'DataflowRunner'`, ...) runs `convert_beam`, with one
    output shard per tar shard / per `examples_per_shard` manifest rows, and resumes a re-run.
    """
    keys = dict(examples_per_shard=examples_per_shard, image_key=image_key, caption_key=caption_key,
                json_caption_key=json_caption_key, overwrite=overwrite)
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output format {output_format!r} is not one of {list(OUTPUT_FORMATS)}")
    if output_format == "tar":  # >>> streaming (issue 21)
        summary = _convert_to_tar(inputs, output_dir, keys)
    elif runner == "serial":
        if paths.is_remote(output_dir):
            raise paths.StorageError(f"the serial converter writes local folders only, not "
                                     f"{output_dir!r}; use a Beam runner (the default DirectRunner)")
        summary = convert_to_array_record(inputs, output_dir, progress=progress, **keys)
    else:
        from big_contrast.data.convert_beam import convert_with_beam

        summary = convert_with_beam(inputs, output_dir, runner=runner, pipeline_args=pipeline_args,
                                    workers=workers, **keys)
    print(summary.describe())
    return summary


def _convert_to_tar(inputs, output_dir: str, keys: dict) -> ConvertSummary:
    from big_contrast.data.streaming.write import convert_to_tar_shards

    if keys.pop("overwrite"):  # what an earlier conversion wrote there
        for path in paths.glob(f"{output_dir.rstrip('/')}/data-*.tar"):
            paths.parse(path).unlink()
    return convert_to_tar_shards(inputs, output_dir, **keys)


def source_config_from_spec(spec: str, *, split: str = "train", data_dir: str | None = None,
                            image_key: str | None = None, caption_key: str | None = None) -> dict:
    """`'demo'`, `'demo:eval'`, `'tfds:<name>'`, a manifest path or an ArrayRecord path / dir / glob."""
    keys = {k: v for k, v in (("image_key", image_key), ("caption_key", caption_key)) if v}
    if spec in ("demo", "demo:train", "demo:eval"):
        return {"kind": "demo", "split": spec.partition(":")[2] or split}
    if spec.startswith("tfds:"):
        return {"kind": "tfds", "name": spec[len("tfds:"):], "split": split, "data_dir": data_dir, **keys}
    if spec.lower().endswith(MANIFEST_EXTENSIONS):
        return {"kind": "manifest", "path": spec, **keys}
    if ".tar" in os.path.basename(spec):
        raise ConfigError(f"{spec!r} looks like a tar shard: convert it first with "
                         "`big-contrast data convert`, then pass the output folder")
    return {"kind": "array_record", "path": spec}


def _source_captions(source, max_captions: int):
    """Captions of up to `max_captions` records spread evenly over the source; bad ones skipped."""
    from big_contrast.data.preprocess import usable_captions

    indices = np.unique(np.linspace(0, len(source) - 1, min(max_captions, len(source))).astype(int))
    for index in indices:
        try:
            values = source.captions(index) if hasattr(source, "captions") else source[index]["captions"]
            yield from usable_captions(values)
        except SkipRecord:
            continue


def train_tokenizer(source: str | Mapping, vocab_size: int, output_path: str, *,
                    lowercase: bool = True, max_captions: int = 1_000_000,
                    model_type: str = "unigram", exact_vocab_size: bool = False) -> dict:
    """Trains a sentencepiece model on a source's captions and writes it to `output_path`.

    `source` is a source config (see `sources.py`) or a spec string for
    `source_config_from_spec`. Returns `{'path', 'vocab_size', 'records'}`.
    """
    from big_contrast.data.sources import open_source
    from big_contrast.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    config = source_config_from_spec(source) if isinstance(source, str) else dict(source)
    records = open_source("tokenizer_source", config)
    model = train_sentencepiece(_source_captions(records, max_captions), vocab_size,
                                lowercase=lowercase, model_type=model_type,
                                exact_vocab_size=exact_vocab_size)
    paths.write_bytes(output_path, model)  # a local file or an object in a bucket
    trained = SentencePieceTokenizer(model)
    result = {"path": output_path, "vocab_size": trained.vocab_size,
              "records": min(max_captions, len(records))}
    print(f"wrote a {trained.vocab_size}-piece sentencepiece model ({'lowercased, ' if lowercase else ''}"
          f"pad=0 eos=1 unk=2) trained on the captions of {result['records']} records to {output_path}")
    return result
