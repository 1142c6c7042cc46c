"""Executing ``config.stages`` in one run: what the loop asks at start, resume and a boundary.

Why: a CLIPA-style schedule (low resolution and short texts for most steps, then full size)
changes the model's position-table shapes, the step's shapes and the preprocessing at given
steps. ``train/stages.py`` is the pure schedule; this module is its execution, kept out of
the loop so the loop only asks three questions: which config to build for a step, which shapes
a checkpoint holds, and what to do when the next step belongs to another stage.

At a boundary (the next step is the first of stage k):

* the state (in stage k-1's shapes) is mapped to stage k's with ``train/resample.py``
  (learned image tables resampled bilinearly with aligned corners, Adam's moments too), under a
  model built for stage k, whose step is compiled afresh;
* the training pipeline is rebuilt with stage k's preprocessing and text length, positioned
  at the example the previous stages consumed (``sum(num_steps * batch_size)``, which must be
  a multiple of stage k's batch);
* one line is printed: ``Stage k (until step N): image 32x32, max_len 16, batch 32, ...``.

A checkpoint at a boundary is written by the stage that ran its last step, so a run killed
before or after a boundary resumes through the same mapping (``stage_that_saved``) and sees
the same batches and losses as an uninterrupted one. Evaluators run only in stages at the base
config's image size (``pp_eval`` is written for it); the switch line says when they are off.
Without ``config.stages`` nothing here changes the run: one stage made of the base config.
"""
from __future__ import annotations

import dataclasses

from big_contrast import sharding
from big_contrast.errors import ConfigError
from big_contrast.train import resample, stages as stages_lib


def newest_step(workdir) -> int:
    """The newest checkpoint step in ``workdir`` (0 when there is none): which stage to build."""
    if not workdir.has_checkpoints():
        return 0
    return max((int(p.name) for p in workdir.checkpoints.iterdir() if p.name.isdigit()), default=0)


class StagePlan:
    """``config.stages`` resolved for one run on ``mesh``."""

    def __init__(self, config, mesh):
        self.config = config
        self.active = bool(config.get("stages"))
        self.current = None  # the stage the live model is built for
        if not self.active:  # nothing resolved: the base config's own checks word its errors
            return
        self.stages = stages_lib.resolve_stages(config, sharding.num_batch_shards(mesh))
        self._check_positions()

    # ------------------------------------------------------------------ configs
    def config_for(self, step: int):
        """The config that builds the model, step and data for the step after ``step``."""
        if not self.active:
            return self.config
        return stages_lib.stage_config(self.config, stages_lib.stage_at(self.stages, step))

    def begin(self, step: int):
        """The config to build at the start of this call (``step``: the newest checkpoint's)."""
        if self.active:
            self.current = stages_lib.stage_at(self.stages, step)
        return self.config_for(step)

    def saved_model(self, recorded_model):
        """``step -> model config`` that wrote checkpoint ``step`` (``recorded_model``, the
        workdir's, without stages)."""
        if not self.active:
            return lambda step: recorded_model
        return lambda step: stages_lib.stage_config(
            self.config, stages_lib.stage_that_saved(self.stages, step)).model

    def lr_fn(self):
        return stages_lib.learning_rate_schedule(self.config, self.stages) if self.active else None

    # ------------------------------------------------------------------ data positions
    def start_batch(self, stage) -> int:
        """The global batch (of ``stage``'s size) at which ``stage``'s data begins."""
        return self._examples_before(stage) // stage.batch_size

    def _examples_before(self, stage) -> int:
        return sum(s.num_steps * s.batch_size for s in self.stages[:stage.index])

    def _check_positions(self) -> None:
        for stage in self.stages[1:]:
            seen = self._examples_before(stage)
            if seen % stage.batch_size:
                raise ConfigError(
                    f"config.stages[{stage.index}].batch_size={stage.batch_size} does not divide the "
                    f"{seen} examples the stages before it consume, so its data cannot start where "
                    "theirs ended; pick until_step / batch sizes that make it divide.")

    def at_boundary(self, step: int) -> bool:
        """Whether a checkpoint of ``step`` was written by the stage before the one that runs next
        (its data iterator then belongs to the old pipeline)."""
        return self.active and step > 0 and (stages_lib.stage_that_saved(self.stages, step).index
                                             != stages_lib.stage_at(self.stages, step).index)

    def needs_switch(self, step: int) -> bool:
        return self.active and stages_lib.stage_at(self.stages, step).index != self.current.index

    # ------------------------------------------------------------------ evaluation
    def evaluates(self) -> bool:
        """Evaluators run in stages at the base image size (``pp_eval`` is written for it)."""
        base = self.config.model.image.image_size
        base = (base, base) if isinstance(base, int) else tuple(base)
        return not self.active or self.current.image_size == base

    def describe(self, stage) -> str:
        h, w = stage.image_size
        evals = "" if self.evaluates() else "; evaluators off (not at the base image size)"
        return (f"Stage {stage.index} (steps {stage.start_step}..{stage.until_step}): image {h}x{w}, "
                f"patch_dropout {stage.patch_dropout}, max_len {stage.max_len}, batch {stage.batch_size}"
                f", microbatch {stage.microbatch_size}{evals}.")

    def switch(self, step: int, run, state, build):
        """(run, state) for the stage after ``step``: a model built for it by ``build(config)``,
        the state's position tables (and moments) resampled to its shapes."""
        old_model = run.config.model
        self.current = stages_lib.stage_at(self.stages, step)
        new_run = build(self.config_for(step))
        state, line = resample.resampled_state(state, new_run.state_shardings, old_model, new_run.config.model) \
            if resample.needs_resampling(old_model, new_run.config.model) else (state, None)
        new_run.state = dataclasses.replace(state)
        return new_run, state, line


class SwitchablePrefetcher:
    """The loop's batch source across stages: the current stage's prefetcher, replaced (and the
    old one closed) at a boundary; the loop and ``train``'s clean-up hold this one object."""

    def __init__(self, inner):
        self.inner = inner

    def switch(self, inner) -> None:
        old, self.inner = self.inner, inner
        old.close()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def checkpoint_state(self, data_state):
        return self.inner.checkpoint_state(data_state)

    def close(self) -> None:
        self.inner.close()


def stage_plans(config, *, device_memory_bytes: int, num_devices: int | None = None) -> list[tuple[str, dict]]:
    """``big-contrast plan`` per stage: (the stage's line, ``train/plan.py``'s dict for it). The
    activations are those of the stage's image size and text length (the text tower is sized at
    the stage's ``max_len`` for this estimate: a few position rows off in the parameter count)."""
    import jax

    from big_contrast.train import plan as plan_lib

    num_devices = num_devices or jax.device_count()
    shape = plan_lib.mesh_shape(config, num_devices)
    shards = 1
    for axis in sharding.BATCH_AXES:
        shards *= shape.get(axis, 1)
    out = []
    for stage in stages_lib.resolve_stages(config, shards):
        cfg = stages_lib.stage_config(config, stage)
        with cfg.unlocked():
            cfg.model.text.max_len = stage.max_len
        h, w = stage.image_size
        line = (f"stage {stage.index} (steps {stage.start_step}..{stage.until_step}): image {h}x{w}, "
                f"patch_dropout {stage.patch_dropout}, max_len {stage.max_len}")
        out.append((line, plan_lib.plan(cfg, device_memory_bytes=device_memory_bytes, num_devices=num_devices)))
    return out
