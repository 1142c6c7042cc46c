"""big-contrast data convert: webdataset tar shards or CSV / TSV / JSONL manifests -> ArrayRecord shards.

    big-contrast data convert shards/*.tar out_dir/ [--examples_per_shard N] [--runner serial]
    big-contrast data convert 'gs://b/shards/*.tar' gs://b/out --runner DataflowRunner \\
        --project=P --region=R --temp_location=gs://b/tmp   (Beam's own options, as --name=value)
    big-contrast data convert manifest.csv out_dir/ --csv_img_key filepath --csv_caption_key title
    big-contrast data convert manifest.csv gs://b/shards --format tar   (streamable tar shards, kind='stream')

Flags this command does not define are Beam pipeline options, handed to the Beam runner.
"""

from __future__ import annotations

from absl import flags as absl_flags

from big_contrast.commands import base

PASSES_UNKNOWN_FLAGS = True  # Beam's pipeline options


def define_flags(fv, argv) -> None:
    del argv
    absl_flags.DEFINE_integer("examples_per_shard", 10_000, "Records per output shard (serial runner / "
                              "manifests).", flag_values=fv)
    absl_flags.DEFINE_string("csv_img_key", "filepath", "Manifest image path column.", flag_values=fv)
    absl_flags.DEFINE_string("csv_caption_key", "title", "Manifest caption column(s), comma-separated.",
                             flag_values=fv)
    absl_flags.DEFINE_string("json_caption_key", "caption", "Caption field of a tar sample's .json when it has "
                             "no .txt.", flag_values=fv)
    absl_flags.DEFINE_boolean("overwrite", False, "Replace the shards an earlier conversion wrote there.",
                              flag_values=fv)
    absl_flags.DEFINE_string("runner", "DirectRunner", "'serial' (in-process), or an Apache Beam runner: "
                             "DirectRunner (parallel here), DataflowRunner, FlinkRunner, SparkRunner.", flag_values=fv)
    absl_flags.DEFINE_enum("format", "array_record", ["array_record", "tar"], "Output: ArrayRecord (random "
                           "access) or webdataset tar shards (streaming, kind='stream'; written in this process).",
                           flag_values=fv)
    absl_flags.DEFINE_integer("workers", None, "DirectRunner worker processes (default: one per core).",
                              flag_values=fv)


def run(flags, args) -> int:
    from big_contrast.data.commands import convert

    positional = [a for a in args if not a.startswith("-")]
    pipeline_args = [a for a in args if a.startswith("-")]
    if len(positional) < 2:
        raise base.UsageError("give the inputs (tar shards / manifests, paths or globs) and then the output folder.")
    if flags.format == "tar" and (pipeline_args or flags["runner"].present):
        raise base.UsageError("--format tar writes the shards in this process; drop --runner and Beam options.")
    if pipeline_args and flags.runner == "serial":
        raise base.UsageError(f"pipeline options {' '.join(pipeline_args)} need a Beam runner; drop --runner serial.")
    convert(positional[:-1], positional[-1], examples_per_shard=flags.examples_per_shard,
            image_key=flags.csv_img_key, caption_key=flags.csv_caption_key, json_caption_key=flags.json_caption_key,
            overwrite=flags.overwrite, runner=flags.runner, pipeline_args=pipeline_args, workers=flags.workers,
            output_format=flags.format)
    return 0
