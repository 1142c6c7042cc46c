"""Training stages: a run that changes image size, text length and batch at given steps.

Why: the cheapest large-batch recipes train most steps on short sequences and pay for full
resolution only at the end (CLIPA / CLIPA-v2: 64-112 px and 8-32 text tokens, then a short
224 px fine-tune; FLIP: patch dropout, then a short unmasked tune). One ``big-contrast
train`` run executes such a schedule; this module is the pure logic of it: the config
field, its validation (one sentence per mistake, before anything compiles), which stage a
step belongs to, each stage's config, and the learning rate over the stages.

    config.stages = (
        dict(until_step=9_000, image_size=112, max_len=16, pp_train="decode|resize(112)|value_range(-1, 1)"),
        dict(until_step=10_000),             # the rest at the base config's settings
    )
    config.stage_lr_schedule = "run"         # or "per_stage": warm-up and decay again in each

Each stage is a dict with ``until_step`` (the number of steps done when it ends; strictly
increasing, the last one ``config.total_steps``) and optional overrides of the base
config; a missing or None key keeps the base value:

    image_size       model.image.image_size (int or (h, w), a multiple of the patch size)
    patch_dropout    model.image.patch_dropout (FLIP), in [0, 1)
    max_len          data.max_len: tokens per caption; at most model.text.max_len, because the
                     text position table keeps its rows and a shorter text uses the first ones
                     (what CLIPA does; exact, nothing is resampled for text)
    batch_size       the global batch (data.batch_size follows); divides over the devices
    microbatch_size  gradient caching's per-device micro-batch (None: the base config's)
    pp_train         the training preprocessing; required where image_size differs from the
                     base, since an op string's sizes are literals

``stage_at(stages, step)`` is the stage that runs the step taking the state from ``step``
to ``step + 1`` steps done (the last stage once the run is finished). Without
``config.stages`` a run is one stage made of the base config. The learning rate
(``learning_rate_schedule``) is a function of the global step either way, so the
optimizer's own step count needs no reset at a boundary.
"""
from __future__ import annotations

import dataclasses

import optax

from big_contrast.errors import ConfigError
from big_contrast.models import variants
from big_contrast.train import optimizer

STAGE_KEYS = ("until_step", "image_size", "patch_dropout", "max_len", "batch_size",
              "microbatch_size", "pp_train")
LR_SCHEDULES = ("run", "per_stage")


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start_step: int  # steps done when the stage begins
    until_step: int  # steps done when it ends
    image_size: tuple[int, int]
    patch_dropout: float
    max_len: int
    batch_size: int
    microbatch_size: int | None
    pp_train: str

    @property
    def num_steps(self) -> int:
        return self.until_step - self.start_step


def resolve_stages(config, num_batch_shards: int) -> tuple[Stage, ...]:
    """The validated stages of ``config`` (one made of the base config when it has none)."""
    given = tuple(config.get("stages") or ()) or (dict(until_step=config.total_steps),)
    _check_lr_option(config)
    stages, start = [], 0
    for index, entry in enumerate(given):
        entry = _as_dict(entry, index)
        stage = _stage(config, index, start, entry)
        _check_stage(config, stage, entry, num_batch_shards, last=index == len(given) - 1)
        stages.append(stage)
        start = stage.until_step
    _check_warmup(config, stages)
    return tuple(stages)


def stage_at(stages: tuple[Stage, ...], step: int) -> Stage:
    """The stage that runs the step after ``step`` steps done (the last one at the end)."""
    return next((s for s in stages if step < s.until_step), stages[-1])


def stage_that_saved(stages: tuple[Stage, ...], step: int) -> Stage:
    """The stage whose shapes a checkpoint of ``step`` steps holds: the one that ran its last
    step (a checkpoint at a boundary was written before the next stage began)."""
    return stage_at(stages, max(step - 1, 0))


def boundaries(stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """The steps done at which a new stage begins (its step compiles, its data starts)."""
    return tuple(s.until_step for s in stages[:-1])


def stage_config(config, stage: Stage):
    """``config`` (resolved) with ``stage``'s settings in place: what builds its step and data."""
    out = config.copy_and_resolve_references()
    h, w = stage.image_size
    with out.unlocked(), out.ignore_type():  # an int size may become an (h, w) pair
        out.model.image.image_size = h if h == w else (h, w)
        out.model.image.patch_dropout = stage.patch_dropout
        out.data.max_len = stage.max_len
        out.batch_size = out.data.batch_size = stage.batch_size
        out.microbatch_size = stage.microbatch_size
        out.data.pp_train = stage.pp_train
    return out


def learning_rate_schedule(config, stages: tuple[Stage, ...]) -> optax.Schedule:
    """The learning rate at a global step: ``config.optimizer``'s schedule over the whole run
    (``stage_lr_schedule='run'``), or over each stage's own steps, warm-up included
    (``'per_stage'``, a restart at every boundary)."""
    if config.get("stage_lr_schedule", "run") == "run":
        return optimizer.learning_rate_schedule(_with_total_steps(config.optimizer, config.total_steps))
    per_stage = [optimizer.learning_rate_schedule(_with_total_steps(config.optimizer, s.num_steps))
                 for s in stages]
    return optax.join_schedules(per_stage, list(boundaries(stages)))


def _with_total_steps(opt, total_steps: int):
    opt = opt.copy_and_resolve_references()
    with opt.unlocked():
        opt.total_steps = total_steps
    return opt


def _as_dict(entry, index: int) -> dict:
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    if not isinstance(entry, dict):
        raise ConfigError(f"config.stages[{index}]={entry!r} must be a dict such as "
                          "dict(until_step=1000, image_size=112).")
    unknown = sorted(set(entry) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"config.stages[{index}] has unknown key {unknown[0]!r}; a stage takes "
                          f"{STAGE_KEYS}.")
    if "until_step" not in entry:
        raise ConfigError(f"config.stages[{index}] has no until_step; give each stage the number "
                          "of steps done when it ends.")
    return entry


def _stage(config, index: int, start: int, entry: dict) -> Stage:
    def pick(key, base):
        return base if entry.get(key) is None else entry[key]

    size = pick("image_size", config.model.image.image_size)
    return Stage(index=index, start_step=start, until_step=entry["until_step"],
                 image_size=(size, size) if isinstance(size, int) else tuple(size),
                 patch_dropout=float(pick("patch_dropout", config.model.image.patch_dropout)),
                 max_len=pick("max_len", config.data.max_len),
                 batch_size=pick("batch_size", config.batch_size),
                 microbatch_size=pick("microbatch_size", config.microbatch_size),
                 pp_train=pick("pp_train", config.data.pp_train))


def _check_stage(config, stage: Stage, entry: dict, num_batch_shards: int, last: bool) -> None:
    where = f"config.stages[{stage.index}]"
    _check_steps(config, stage, where, last)
    _check_image(config, stage, entry, where)
    table = config.model.text.max_len
    if not isinstance(stage.max_len, int) or not 2 <= stage.max_len <= table:
        raise ConfigError(f"{where}.max_len={stage.max_len!r} must be an int in [2, "
                          f"config.model.text.max_len={table}]: a stage feeds shorter texts to the "
                          "same position table, so raise model.text.max_len for longer ones.")
    _check_batch(stage, where, num_batch_shards)


def _check_steps(config, stage: Stage, where: str, last: bool) -> None:
    until = stage.until_step
    if not isinstance(until, int) or until <= stage.start_step:
        raise ConfigError(f"{where}.until_step={until!r} must be an int above the previous stage's "
                          f"{stage.start_step}: stages end at strictly increasing steps.")
    if last and until != config.total_steps:
        raise ConfigError(f"{where}.until_step={until} is the last stage's end and must equal "
                          f"config.total_steps={config.total_steps}; set one of them to the other.")
    if not last and until >= config.total_steps:
        raise ConfigError(f"{where}.until_step={until} is not below config.total_steps="
                          f"{config.total_steps}, so the stages after it would never run.")


def _check_image(config, stage: Stage, entry: dict, where: str) -> None:
    _, patch = variants.decode_image_variant(config.model.image.variant)
    h, w = stage.image_size
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise ConfigError(f"{where}.image_size={entry.get('image_size')!r} is not a positive "
                          f"multiple of the patch size {patch}; pick one that is (e.g. {4 * patch}).")
    if not 0.0 <= stage.patch_dropout < 1.0:
        raise ConfigError(f"{where}.patch_dropout={stage.patch_dropout} must be in [0, 1): it is "
                          "the fraction of patch tokens dropped in training.")
    base = config.model.image.image_size
    base = (base, base) if isinstance(base, int) else tuple(base)
    if stage.image_size != base and entry.get("pp_train") is None:
        size = f"{h}" if h == w else f"{h}, {w}"
        raise ConfigError(f"{where} trains at image_size={stage.image_size} but the base config at "
                          f"{base}; give the stage its pp_train, e.g. "
                          f"'decode|resize({size})|value_range(-1, 1)'.")


def _check_batch(stage: Stage, where: str, num_batch_shards: int) -> None:
    batch, micro = stage.batch_size, stage.microbatch_size
    if not isinstance(batch, int) or batch <= 0 or batch % num_batch_shards:
        raise ConfigError(f"{where}.batch_size={batch!r} does not divide over the {num_batch_shards} "
                          f"data-parallel devices; use a multiple of {num_batch_shards}.")
    per_device = batch // num_batch_shards
    if micro is not None and (micro <= 0 or per_device % micro):
        raise ConfigError(f"{where}.microbatch_size={micro} does not divide the per-device batch "
                          f"{per_device} (batch {batch} over {num_batch_shards} devices); pick a "
                          f"divisor of {per_device}.")


def _check_lr_option(config) -> None:
    option = config.get("stage_lr_schedule", "run")
    if option not in LR_SCHEDULES:
        raise ConfigError(f"config.stage_lr_schedule={option!r} is unknown; use 'run' (one schedule "
                          "over the whole run) or 'per_stage' (restarted at every stage).")


def _check_warmup(config, stages) -> None:
    if config.get("stage_lr_schedule", "run") != "per_stage":
        return
    warmup = int(config.optimizer.warmup_steps)
    short = next((s for s in stages if warmup >= s.num_steps), None)
    if short is not None:
        raise ConfigError(f"config.optimizer.warmup_steps={warmup} is not shorter than stage "
                          f"{short.index} ({short.num_steps} steps), and stage_lr_schedule="
                          "'per_stage' warms up again in every stage; lower warmup_steps or use 'run'.")
