"""The trainer's config: defaults for every key, and validation before anything compiles.

A config file (configs/*.py) returns `default_config()` updated with its own choices:

    config.seed                  PRNG seed of the parameter initialisation (data has its own)
    config.mesh                  (("data", -1), ("fsdp", 1), ("tensor", 1)); -1 takes the rest
    config.model                 see big_contrast.models.default_model_config(); .loss picks
                                 "softmax" (CLIP) or "sigmoid" (SigLIP)
    config.loss_impl             "ring" | "all_gather" | "dense" (the loss engine's impl)
    config.loss_block            ring tile size (None: the engine's default, `ring.default_block`)
    config.loss_dtype            None | "bfloat16": embeddings enter the loss engine in this
                                 dtype (f32 accumulation); None keeps the towers' output dtype
    config.batch_size            global batch (also config.data.batch_size)
    config.microbatch_size       per-device micro-batch for gradient caching (None: off)
    config.total_steps, config.log_every, config.checkpoint_every, config.keep_checkpoints
    config.stages                (dict(until_step=..., image_size=..., max_len=..., ...), ...):
                                 progressive resolution / text length / batch (train/stages.py);
                                 empty: one stage, the config itself
    config.stage_lr_schedule     "run" (one schedule over all stages) | "per_stage" (restarted)
    config.optimizer             name, lr, b1, b2, eps, weight_decay, grad_clip_norm,
                                 warmup_steps, schedule ("cosine" | "rsqrt" | "linear" |
                                 "constant"), min_lr_ratio, rsqrt_timescale
    config.lr_mults              ((path_regex, multiplier), ...); 0 freezes
    config.freeze                (path_regex, ...); added to the model's locked tower
    config.init_towers           {"image": workdir_or_checkpoint_dir, ...}: load tower weights
                                 from a checkpoint of this project before training
    config.data                  see big_contrast.data.default_data_config()
    config.evals                 see big_contrast.evaluate (type, data, every_steps, prefix)
    config.peak_flops_per_device for model FLOPs utilisation (None: not reported)
    config.prefetch_batches      global batches a background thread keeps on the devices ahead
                                 of the step (>= 1)
    config.profile_steps         (N, M): a jax.profiler trace of steps N..M in workdir/profile
                                 (empty: no trace)
    config.caption_loss_weight   weight of the captioning loss when config.model.decoder is set
                                 (SigLIP 2; train/siglip2.py)
    config.ema                   None (off) | dict(decay=0.999, start_step=0, every=1): an EMA of
                                 the parameters in the train state (train/ema.py), checkpointed
    config.loss_objective        None (config.model.loss) | e.g. "sigmoid + 0.5 * distill": a
                                 weighted sum of loss terms (train/objective.py, losses/objectives.py)
    config.teacher               None | "ema" | "data" | dict(workdir=..., step=None, ema=False):
                                 the teacher of distill / cwcl terms (train/teacher.py)
    config.self_distillation     None (off) | dict(silc_weight, tips_weight, *_start_fraction, ...):
                                 SigLIP 2's SILC / TIPS against the EMA (train/self_distill.py)
"""

from __future__ import annotations

import ml_collections

from big_contrast import losses
from big_contrast.data import default_data_config
from big_contrast.errors import ConfigError
from big_contrast.models import default_model_config
from big_contrast.train import naflex as train_naflex
from big_contrast.train import objective as train_objective
from big_contrast.train import self_distill
from big_contrast.train.ema import EmaConfig


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.model = default_model_config()
    config.loss_impl = "ring"
    config.loss_block = ml_collections.FieldReference(None, field_type=int)
    config.loss_dtype = ml_collections.FieldReference(None, field_type=str)
    config.batch_size = 64
    config.microbatch_size = ml_collections.FieldReference(None, field_type=int)
    config.total_steps = 100
    config.stages = ()
    config.stage_lr_schedule = "run"
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0,
        warmup_steps=10, schedule="cosine", min_lr_ratio=0.0, rsqrt_timescale=10_000, momentum=0.9,
    ))
    config.lr_mults = ()
    config.freeze = ()
    config.init_towers = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.evals = ml_collections.ConfigDict()
    config.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)
    config.prefetch_batches = 2
    config.profile_steps = ()
    config.caption_loss_weight = 1.0  # SigLIP 2's decoder (config.model.decoder), train/siglip2.py
    config.ema = ml_collections.FieldReference(None, field_type=dict)
    config.loss_objective = ml_collections.FieldReference(None, field_type=str)
    config.teacher = ml_collections.FieldReference(None, field_type=object)  # str or dict (issue 23)
    config.self_distillation = ml_collections.FieldReference(None, field_type=dict)  # SILC / TIPS
    return config


def validate(config, num_batch_shards: int) -> None:
    """One-sentence errors naming the key, for mistakes that would otherwise fail deep in a run."""
    if config.model.loss not in ("softmax", "sigmoid"):
        raise ConfigError(f"config.model.loss={config.model.loss!r} is unknown; use 'softmax' or 'sigmoid'.")
    if config.loss_impl not in losses.IMPLS:
        raise ConfigError(f"config.loss_impl={config.loss_impl!r} is unknown; use one of {losses.IMPLS}.")
    if not isinstance(config.batch_size, int) or config.batch_size <= 0:
        raise ConfigError(f"config.batch_size={config.batch_size!r} must be a positive integer (the global batch).")
    if config.batch_size % num_batch_shards:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not divide over the {num_batch_shards} "
            f"data-parallel devices; use a multiple of {num_batch_shards}."
        )
    per_device = config.batch_size // num_batch_shards
    micro = config.microbatch_size
    if micro is not None and (micro <= 0 or per_device % micro):
        raise ConfigError(
            f"config.microbatch_size={micro} does not divide the per-device batch {per_device} "
            f"(config.batch_size={config.batch_size} over {num_batch_shards} devices); pick a divisor of {per_device}."
        )
    for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "prefetch_batches"):
        if config.get(key, 1) <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be a positive integer.")
    if config.get("loss_dtype") not in (None, "float32", "bfloat16"):
        raise ConfigError(f"config.loss_dtype={config.loss_dtype!r} is unknown; use None, 'float32' or 'bfloat16'.")
    _validate_profile_steps(config.get("profile_steps"))
    EmaConfig.from_config(config.get("ema"))  # one sentence per bad field
    train_objective.validate(config)
    train_naflex.validate(config)  # a pp ending in naflex(...) (issue 22)
    self_distill.validate(config)  # SigLIP 2's SILC / TIPS (train/self_distill.py)


def _validate_profile_steps(steps) -> None:
    if not steps:
        return
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"config.profile_steps={steps!r} must be (N, M) with 1 <= N <= M, e.g. (10, 15).")


def microbatches(config, num_batch_shards: int) -> int:
    """Number of micro-batches per step (1 when gradient caching is off)."""
    if config.microbatch_size is None:
        return 1
    return (config.batch_size // num_batch_shards) // config.microbatch_size


PP_TRAIN_224 = "decode|random_resized_crop(224, scale=(0.4, 1.0))|flip_lr|value_range(-1, 1)"
PP_EVAL_224 = "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"


def use_real_data_defaults(config, *, max_len):
    """224 px preprocessing and byte-level tokens on the demo data, so every paper-scale config
    runs as-is. Point it at your data with overrides, e.g.

      --config.data.sources='{"laion": {"kind": "array_record", "path": "/data/laion/*.array_record"}}'
      --config.data.tokenizer=/data/spm_32k.model
    """
    config.data.pp_train = PP_TRAIN_224
    config.data.pp_eval = PP_EVAL_224
    config.data.tokenizer = "bytes"
    config.data.max_len = max_len
    config.data.batch_size = config.get_ref("batch_size")
    config.data.num_workers = 8
    return config


def split_arg(arg, flags=()):
    """`"softmax,total_steps=50"` -> ({"softmax"}, [("total_steps", 50)]); bare words must be in `flags`."""
    import ast

    words, pairs = set(), []
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        if "=" not in item:
            if item not in flags:
                raise ConfigError(f"Unknown config argument {item!r}; use key=value pairs"
                                 + (f" or one of {sorted(flags)}" if flags else "") + ".")
            words.add(item)
            continue
        key, text = (part.strip() for part in item.split("=", 1))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        pairs.append((key, value))
    return words, pairs


def apply_arg(config, arg, *, flags=()):
    """big_vision-style config argument: `configs/x.py:batch_size=32768,total_steps=1000`.

    Comma-separated `key=value` pairs (dotted keys reach nested fields; values are parsed as
    Python literals, else kept as strings) override the config; bare words must be in `flags`
    (e.g. `configs/demo.py:softmax,noeval`) and are returned as a set. Call it last in
    `get_config`, so the pairs win over the config's own settings.
    """
    words, pairs = split_arg(arg, flags)
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"Config argument {key}={value!r}: the config has no field {key!r}.")
        node[leaf] = value
    return words
