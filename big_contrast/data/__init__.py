"""Image-text input data: sources, preprocessing, tokenizers, the grain pipeline, demo data.

    from big_contrast.data import default_data_config, make_pipeline
    it = make_pipeline(default_data_config(), mesh)   # global batches sharded over 'data'/'fsdp'
"""

from big_contrast.data.config import default_data_config
from big_contrast.data.demo import demo_class_names, demo_source, demo_templates
from big_contrast.data.errors import SKIP_REASONS, SkipCounter, SkipRecord, TooManySkippedError
from big_contrast.data.image_ops import parse_image_pp
from big_contrast.data.pipeline import DataIterator, batch_sharding, make_pipeline
from big_contrast.data.sources import open_source
from big_contrast.data.tokenizer import PAD_ID, encode_fixed, make_tokenizer, train_sentencepiece

__all__ = [
    "DataIterator", "PAD_ID", "SKIP_REASONS", "SkipCounter", "SkipRecord", "TooManySkippedError",
    "batch_sharding", "default_data_config", "demo_class_names", "demo_source", "demo_templates", "encode_fixed",
    "make_pipeline", "make_tokenizer", "open_source", "parse_image_pp", "train_sentencepiece",
]
