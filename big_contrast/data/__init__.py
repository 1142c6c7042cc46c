"""Image-text input data: sources, preprocessing, tokenizers, the grain pipeline, demo data.

    from big_contrast.data import default_data_config, make_pipeline
    it = make_pipeline(default_data_config(), mesh)   # global batches sharded over 'data'/'fsdp'

The names below are imported on first use, so that `big_contrast.data.device_ops` (which the
train step calls) loads without grain, ml_collections or OpenCV: what the step benchmark runs
on an accelerator image that lacks them.
"""

import importlib

_EXPORTS = {
    "default_data_config": "config",
    "demo_class_names": "demo", "demo_source": "demo", "demo_templates": "demo",
    "SKIP_REASONS": "errors", "SkipCounter": "errors", "SkipRecord": "errors",
    "TooManySkippedError": "errors",
    "parse_image_pp": "image_ops",
    "DataIterator": "pipeline", "make_pipeline": "pipeline",
    "open_source": "sources",
    "PAD_ID": "tokenizer", "encode_fixed": "tokenizer", "make_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'big_contrast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"big_contrast.data.{_EXPORTS[name]}"), name)
