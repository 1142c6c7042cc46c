"""The `config.data` section: its fields, defaults (which run on the demo data) and checks.

    sources            name -> source config (see `sources.py` for the kinds and their fields),
                       each with an optional `weight`; several sources are mixed with
                       probabilities proportional to their weights. The names label the skip
                       counts in the metrics. Default: {'demo': demo train split}.
    batch_size         global batch size B (all processes together); each process loads
                       B / process_count examples per step.
    pp_train           image op string for training (`image_ops.py`), e.g.
                       'decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)'
    pp_eval            image op string for evaluation, e.g.
                       'decode|resize_small(224)|central_crop(224)|value_range(-1, 1)'
    device_normalize   send images as uint8 and apply the pp string's final value_range /
                       normalize on the device (in the jitted train step and eval embedding,
                       `device_ops.py`): 4x fewer image bytes on the host and on the way to
                       the devices, same numbers (the default); False: float32 images from
                       the host (what a consumer of the batches without the device op needs)
    tokenizer          'demo' | 'bytes' | path to a sentencepiece .model (`tokenizer.py`)
    max_len            tokens per caption, EOS included (pad=0)
    lowercase          lowercase captions before tokenizing
    label_keys         integer fields copied from the raw examples into the batch, e.g.
                       ('label/shape',) for zero-shot evaluation on the demo data, ('label',)
                       for a labelled source (image_folder, manifest / tfds with label_key)
    vector_keys        (optional, unset by default) float-vector fields copied from the raw
                       examples into the batch as float32, e.g. ('teacher_image', 'teacher_text'):
                       precomputed teacher embeddings (`teacher_columns.py`, config.teacher='data')
    max_captions       evaluation only: None samples one caption per image ('text'); K keeps
                       every caption ('texts' [K, L], 'caption_mask' [K]) for retrieval; an
                       image with more than K captions is an error that says to raise K
    seed               shuffle / augmentation seed (same seed -> same batches)
    num_workers        grain worker processes (`mp_prefetch`) doing decode + preprocessing;
                       0 = in the training process. Changing it changes the batch order.
    num_threads        threads per process reading and mapping examples (PIL releases the GIL)
    prefetch_buffer_size  examples buffered ahead per process
    max_skip_fraction  a source whose skipped / seen fraction passes this stops the run with
                       an error naming the source and reason (None disables)
    min_seen           records a source must have produced before that check applies
    streaming          settings of the streaming pipeline, used when the sources are kind='stream'
                       (webdataset tar shards read in order, `data/streaming/`): num_streams
                       (fixed per run; must divide B and be a multiple of the host count),
                       shuffle_buffer, interleave, read_ahead, chunk_bytes, max_requests,
                       retries, timeout_s, backoff_s (see `streaming/pipeline.py`)
    decoder_targets    None, or LocCa's decoder targets (`location_targets.py`): dict(num_bins=1024,
                       task_weights={'caption': 1, 'referring': 1, 'grounded': 1},
                       text_vocab_size=None, grounded_predicts_box=False); batches then hold 'decoder_targets' [L],
                       'decoder_mask' [L], 'decoder_task', 'decoder_box' [4] from each
                       record's caption and `boxes` (sources: manifest `boxes_key`, demo `boxes`)
    local_crops        None (off) | dict(count, size, scale, ratio, pp): SILC's local crops of each
                       training image, batch field 'local_images' [B, V, h, w, 3] (`multicrop.py`)
    keep_freed_memory  tune glibc malloc in the decoding processes (the workers, or this
                       process when num_workers=0) to keep freed memory instead of returning
                       it to the OS: ~25% less CPU per 224 px image (`memory.py`)
"""

from __future__ import annotations

import ml_collections

from big_contrast.errors import ConfigError

# The demo images have 'left' / 'right' in their captions, so the demo pp does not flip.
DEMO_PP_TRAIN = "decode|random_resized_crop(64, scale=(0.6, 1.0), ratio=(0.9, 1.1))|value_range(-1, 1)"
DEMO_PP_EVAL = "decode|resize(64)|value_range(-1, 1)"


def default_data_config() -> ml_collections.ConfigDict:
    """A data section that trains on the built-in demo data."""
    config = ml_collections.ConfigDict()
    config.sources = ml_collections.ConfigDict(
        {"demo": {"kind": "demo", "split": "train", "size": None, "image_size": 64, "weight": 1.0}})
    config.batch_size = 64
    config.pp_train = DEMO_PP_TRAIN
    config.pp_eval = DEMO_PP_EVAL
    config.device_normalize = True
    config.tokenizer = "demo"
    config.max_len = 16
    config.lowercase = True
    config.label_keys = ()
    config.max_captions = None
    config.seed = 0
    config.num_workers = 0
    config.num_threads = 2
    config.prefetch_buffer_size = 256
    config.max_skip_fraction = 0.1
    config.min_seen = 1000
    config.keep_freed_memory = True
    config.decoder_targets = None  # LocCa (location_targets.py): box targets for the SigLIP 2 decoder
    config.local_crops = ml_collections.FieldReference(None, field_type=dict)  # SILC (multicrop.py)
    from big_contrast.data.streaming.pipeline import STREAMING_DEFAULTS

    config.streaming = ml_collections.ConfigDict(STREAMING_DEFAULTS)  # used by kind='stream' sources
    return config


def check_data_config(config) -> None:
    """Fails early, with a sentence, on values that cannot work."""
    if not config.sources:
        raise ConfigError("config.data.sources is empty; name at least one source")
    if config.batch_size <= 0:
        raise ConfigError(f"config.data.batch_size={config.batch_size} must be positive")
    if config.max_len < 2:
        raise ConfigError(f"config.data.max_len={config.max_len} must be >= 2 (one token + EOS)")
    max_captions = config.get("max_captions")
    if max_captions is not None and max_captions < 1:
        raise ConfigError(f"config.data.max_captions={max_captions} must be >= 1 (or None for one caption)")
    if config.num_workers < 0 or config.num_threads < 0:
        raise ConfigError(
            f"config.data.num_workers={config.num_workers} / num_threads={config.num_threads} "
            "must be >= 0")
    for name, source in config.sources.items():
        weight = source.get("weight", 1.0)
        if not weight or weight <= 0:
            raise ConfigError(f"config.data.sources.{name}.weight={weight} must be positive")
        group_size = source.get("group_size", 1)
        if not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"config.data.sources.{name}.group_size={group_size!r} must be a positive int")
        if group_size > 1 and len(config.sources) > 1:
            raise ConfigError(
                f"config.data.sources.{name}.group_size={group_size} keeps groups of records in one "
                f"batch, but a mixture of {len(config.sources)} sources interleaves them record by "
                "record; train on that source alone or set group_size=1")
