"""big-contrast data train-tokenizer: a sentencepiece model trained on a source's captions.

    big-contrast data train-tokenizer manifest.csv --vocab_size 8000 --output tok.model
    big-contrast data train-tokenizer tfds:coco_captions --data_dir D --vocab_size 32000 --output gs://b/spm.model

SOURCE is 'demo', 'tfds:<name>', a manifest, or ArrayRecord files / a folder.
"""

from __future__ import annotations

from absl import flags as absl_flags

from big_contrast.commands import base


def define_flags(fv, argv) -> None:
    del argv
    absl_flags.DEFINE_integer("vocab_size", None, "Pieces in the model.", flag_values=fv)
    absl_flags.DEFINE_string("output", None, "Path of the .model file to write (local or a bucket).", flag_values=fv)
    absl_flags.DEFINE_boolean("keep_case", False, "Do not lowercase captions.", flag_values=fv)
    absl_flags.DEFINE_integer("max_captions", 1_000_000, "Records sampled evenly over the source.", flag_values=fv)
    absl_flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "word", "char"], "sentencepiece model type.",
                           flag_values=fv)
    absl_flags.DEFINE_string("split", "train", "TFDS / demo split.", flag_values=fv)
    absl_flags.DEFINE_string("data_dir", None, "TFDS data_dir.", flag_values=fv)
    absl_flags.DEFINE_string("image_key", None, "Manifest / TFDS image key.", flag_values=fv)
    absl_flags.DEFINE_string("caption_key", None, "Manifest / TFDS caption key.", flag_values=fv)


def run(flags, args) -> int:
    from big_contrast.data.commands import source_config_from_spec, train_tokenizer

    base.require(flags, "vocab_size", "output")
    if len(args) != 1:
        raise base.UsageError("give one SOURCE: 'demo', 'tfds:<name>', a manifest, or ArrayRecord files / a folder.")
    config = source_config_from_spec(args[0], split=flags.split, data_dir=flags.data_dir,
                                     image_key=flags.image_key, caption_key=flags.caption_key)
    train_tokenizer(config, flags.vocab_size, flags.output, lowercase=not flags.keep_case,
                    max_captions=flags.max_captions, model_type=flags.model_type)
    return 0
