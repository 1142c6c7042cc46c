"""`big-contrast data ...` sub-commands, as plain functions plus an argparse hook.

    big-contrast data convert shards/*.tar out_dir/ [--examples-per-shard N] [--runner serial]
    big-contrast data convert 'gs://b/shards/*.tar' gs://b/out --runner DataflowRunner \
        --project=P --region=R --temp_location=gs://b/tmp   (Beam's own options, as --name=value)
    big-contrast data convert manifest.csv out_dir/ --csv-img-key filepath --csv-caption-key title
    big-contrast data train-tokenizer manifest.csv --vocab-size 8000 --output tok.model

`add_data_subcommands(subparsers)` registers the `data` command on the CLI's subparsers;
every leaf parser sets `func`, called as `args.func(args)` and returning an exit code; a parser
that sets `accepts_pipeline_options` gets the options argparse does not know as
`args.pipeline_args` (Beam's pipeline options for `convert`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from big_contrast import paths
from big_contrast.data.convert import ConvertSummary, convert_to_array_record
from big_contrast.data.errors import SkipRecord
from big_contrast.data.manifest import MANIFEST_EXTENSIONS
from big_contrast.errors import ConfigError


def convert(inputs: str | Sequence[str], output_dir: str, *, examples_per_shard: int = 10_000,
            image_key: str = "filepath", caption_key: str = "title",
            json_caption_key: str = "caption", overwrite: bool = False,
            progress: bool = True, runner: str = "serial", pipeline_args: Sequence[str] = (),
            workers: int | None = None) -> ConvertSummary:
    """Tar shards / manifests -> ArrayRecord shards in `output_dir`; prints and returns the summary.

    `runner='serial'` converts in this process (records packed `examples_per_shard` per file);
    a Beam runner name (`'DirectRunner'`, `'DataflowRunner'`, ...) runs `convert_beam`, with one
    output shard per tar shard / per `examples_per_shard` manifest rows, and resumes a re-run.
    """
    keys = dict(examples_per_shard=examples_per_shard, image_key=image_key, caption_key=caption_key,
                json_caption_key=json_caption_key, overwrite=overwrite)
    if runner == "serial":
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


def _run_convert(args) -> int:
    try:
        convert(args.inputs, args.output_dir, examples_per_shard=args.examples_per_shard,
                image_key=args.csv_img_key, caption_key=args.csv_caption_key,
                json_caption_key=args.json_caption_key, overwrite=args.overwrite, runner=args.runner,
                pipeline_args=getattr(args, "pipeline_args", ()), workers=args.workers)
    except paths.StorageError as e:  # a bad URL or bucket: one sentence, no traceback
        print(f"big-contrast data convert: {e}", file=sys.stderr)
        return 2
    return 0


def _run_train_tokenizer(args) -> int:
    config = source_config_from_spec(args.source, split=args.split, data_dir=args.data_dir,
                                     image_key=args.image_key, caption_key=args.caption_key)
    train_tokenizer(config, args.vocab_size, args.output, lowercase=not args.keep_case,
                    max_captions=args.max_captions, model_type=args.model_type)
    return 0


def parse_data_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that `data convert` passes unknown `--name=value` options on
    to Beam as `args.pipeline_args`; any other command rejects them as argparse does."""
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_pipeline_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra and getattr(args, "runner", None) == "serial":
        parser.error(f"pipeline options {' '.join(extra)} need a Beam runner; drop --runner serial")
    args.pipeline_args = extra
    return args


def add_data_subcommands(subparsers) -> argparse.ArgumentParser:
    """Adds `data convert` and `data train-tokenizer` to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare data: convert shards, train a tokenizer")
    commands = data.add_subparsers(dest="data_command", required=True)

    conv = commands.add_parser(
        "convert", help="webdataset tar shards or CSV/TSV/JSONL manifests -> ArrayRecord shards",
        allow_abbrev=False)  # Beam's options (--num_workers, ...) must not match ours by prefix
    conv.add_argument("inputs", nargs="+", help="tar shards / manifests (paths or globs)")
    conv.add_argument("output_dir", help="folder for the .array_record files")
    conv.add_argument("--examples-per-shard", type=int, default=10_000)
    conv.add_argument("--csv-img-key", default="filepath", help="manifest image path column")
    conv.add_argument("--csv-caption-key", default="title",
                      help="manifest caption column(s), comma-separated")
    conv.add_argument("--json-caption-key", default="caption",
                      help="caption field of a tar sample's .json when it has no .txt")
    conv.add_argument("--overwrite", action="store_true", help="replace existing .array_record files")
    conv.add_argument("--runner", default="DirectRunner",
                      help="'serial' (in-process), or an Apache Beam runner: DirectRunner (parallel "
                           "here), DataflowRunner, FlinkRunner, SparkRunner; Beam's own pipeline "
                           "options follow as --name=value (e.g. --project=P --region=R)")
    conv.add_argument("--workers", type=int, default=None,
                      help="DirectRunner worker processes (default: one per core)")
    conv.set_defaults(func=_run_convert, accepts_pipeline_options=True)

    tok = commands.add_parser("train-tokenizer", help="train a sentencepiece model on captions")
    tok.add_argument("source", help="'demo', 'tfds:<name>', a manifest, or ArrayRecord files / folder")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--output", required=True, help="path of the .model file to write")
    tok.add_argument("--keep-case", action="store_true", help="do not lowercase captions")
    tok.add_argument("--max-captions", type=int, default=1_000_000,
                     help="records sampled evenly over the source")
    tok.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "word", "char"))
    tok.add_argument("--split", default="train", help="TFDS / demo split")
    tok.add_argument("--data-dir", default=None, help="TFDS data_dir")
    tok.add_argument("--image-key", default=None, help="manifest / TFDS image key")
    tok.add_argument("--caption-key", default=None, help="manifest / TFDS caption key")
    tok.set_defaults(func=_run_train_tokenizer)
    return data
