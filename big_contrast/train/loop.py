"""The training loop: build everything from a config, resume, step, log, evaluate, checkpoint.

    result = train(config, workdir)

Resumes from the latest checkpoint in the workdir (`big_contrast.workdir`) when there is one (parameters,
optimizer state, step and the data iterator's position), so a restarted run continues with
exactly the batches an uninterrupted run would have seen. SIGTERM (a preemption notice) and
SIGINT finish the current step, save a checkpoint and return. A NaN or Inf loss stops the
run with an error naming the step, before anything of that step is saved; so does a state
that is not finite when it is about to be saved.

The host and the devices overlap: a background thread (`prefetch.py`) keeps the next batches
on the devices, the state is donated to the step, and the host reads a step's loss only after
dispatching the next one, waiting for the newest step only every `log_every` steps (and to
evaluate or checkpoint). `config.profile_steps = (N, M)` traces steps N..M into
the workdir's `profile/`. A second run started on a workdir that a live run trains in is
refused in one sentence (the workdir's lock); a lock left by a killed run does not block a resume.

When things are wrong it says so before doing harm: a config whose model or optimizer differs
from the one the workdir recorded stops before restoring; a damaged checkpoint is
skipped (with a warning naming its step) for the newest readable one; a failed save stops the
run naming the directory, the previous checkpoint intact. The checkpointer, the prefetching
thread with the data iterator, and the metric writer are closed in that order on every exit
path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast import models, sharding
from big_contrast.checkpoint import Checkpointer
from big_contrast.data import make_pipeline
from big_contrast.data.device_ops import device_normalization
from big_contrast.models import posemb
from big_contrast.models.naflex import NAFLEX_FIELDS
from big_contrast.errors import BigContrastError, ConfigMismatch, DamagedCheckpoint, MissingFileError, short_reason
from big_contrast.train import config as train_config
from big_contrast.train import evals as train_evals
from big_contrast.train import objective as train_objective
from big_contrast.train import resample, staged
from big_contrast.train.metrics import MetricWriter, StepProfile, Throughput
from big_contrast.train.prefetch import Prefetcher
from big_contrast.train.optimizer import learning_rate_schedule, make_optimizer
from big_contrast.train import self_distill, siglip2
from big_contrast.train import teacher as train_teacher  # issue 23: config.teacher=dict(workdir=...)
from big_contrast.train.ema import EmaConfig, ema_init
from big_contrast.train.step import LossSpec, StepConfig, TrainState, train_step
from big_contrast.workdir import Workdir, holds_checkpoints

BATCH_FIELDS = ("image", "text") + NAFLEX_FIELDS  # a NaFlex batch (issue 22): patches, patch_mask, spatial_shapes


def batch_fields(config) -> tuple[str, ...]:
    """The batch fields the step reads: images, texts (+ LocCa's decoder targets, train/siglip2.py;
    + SILC's local crops, train/self_distill.py; + a teacher's stored embeddings, train/teacher.py)."""
    fields = self_distill.batch_fields(config, BATCH_FIELDS + siglip2.batch_fields_of(config))
    return train_teacher.batch_fields(config, fields)


class NonFiniteLoss(BigContrastError, RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class Run:
    """Everything built from a config that the loop and the evaluators share."""

    config: object
    mesh: jax.sharding.Mesh
    graphdef: object
    rest: object
    state: TrainState
    state_shardings: object
    tx: object
    optimizer: object  # config.optimizer with the run's total_steps, resolved once
    jitted: dict = dataclasses.field(default_factory=dict)  # compiled helpers, e.g. tower embedders
    teacher: object = None  # issue 23: (FrozenTeacher, params) of config.teacher=dict(workdir=...), or None

    def model(self, params=None):
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)


def build(config, *, mesh=None, params=None) -> Run:
    """Mesh, validated config, sharded model and a fresh train state (step 0).

    `params` (nested like the model's parameters, e.g. imported weights) replace the random
    initialisation."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    train_config.validate(config, sharding.num_batch_shards(mesh))
    abstract = models.abstract_model(config.model)  # checks the model config, allocates nothing
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    frozen = tuple(abstract.frozen_patterns) + tuple(config.freeze)
    opt = optimizer_config(config)
    tx = make_optimizer(opt, abstract_params, lr_mults=tuple(config.lr_mults), frozen_patterns=frozen)

    if params is None:
        model = models.create_sharded(config.model, mesh, seed=jax.random.key(config.seed))
    else:
        model = models.create_from_params(config.model, params, abstract)
        nnx.update(model, sharding.shard_state(nnx.state(model), mesh))
    for tower, directory in config.init_towers.items():
        tower_params, line = resample.adapt_tower(  # another image size / max_len: tables resampled
            tower, _tower_params_from_checkpoint(directory, tower), resample.saved_model_config(directory),
            config.model)
        if line:
            resample.print_line(f"config.init_towers.{tower}: {line}")
        models.load_tower_params(model, tower, tower_params)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=_on_mesh(jax.jit(tx.init)(params), replicated),
                       ema=ema_init(params) if EmaConfig.from_config(config.get("ema")) else None)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return Run(config, mesh, graphdef, rest, state, state_shardings, tx, opt)


def optimizer_config(config):
    """`config.optimizer` resolved, with `total_steps` (the schedules' length) filled in."""
    opt = config.optimizer.copy_and_resolve_references()
    with opt.unlocked():
        opt.total_steps = config.total_steps
    return opt


def _on_mesh(tree, replicated):
    """Leaves that jit left on a single device (optimizer step counters) replicated over the mesh;
    moments keep the sharding they inherited from their parameters."""

    def place(x):
        on_mesh = isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == replicated.mesh
        return x if on_mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def _tower_params_from_checkpoint(directory, tower):
    """The `tower` parameters of the latest checkpoint under `directory` (a workdir or its checkpoints/)."""
    workdir = Workdir(directory)
    path = workdir.checkpoints if workdir.checkpoints.is_dir() else workdir.path
    if not holds_checkpoints(path):  # before a Checkpointer, which would create the folder
        raise MissingFileError(f"config.init_towers.{tower}: no checkpoint under {directory}.")
    ckpt = Checkpointer(path, async_save=False)
    try:
        state, _ = ckpt.restore_arrays()
    finally:
        ckpt.close()
    return state["params"][tower]


def train_pipeline(config, batch_sharding, *, start_batch: int = 0):
    """The training input pipeline of `config`: global batches of `config.batch_size` placed with
    `batch_sharding`, from global batch `start_batch` of the example order."""
    return make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size,
                         start_batch=start_batch)


def loss_spec(config) -> LossSpec:
    """The loss engine of `config`: loss, impl, tile (`loss_block`) and input dtype (`loss_dtype`)."""
    return LossSpec(config.model.loss, config.loss_impl, config.loss_block, config.get("loss_dtype"),
                    objective=train_objective.objective_of(config))


def make_step_fn(run: Run, batch_sharding, lr_fn=None):
    """The jitted `step(state, batch)`, its fixed arguments bound once; the state is donated
    (the batch is not: no output has its shapes, so XLA could not reuse its buffers). `lr_fn`
    replaces the optimizer config's schedule (`config.stages`' per-stage restarts)."""
    config = run.config
    fixed = StepConfig(
        graphdef=run.graphdef, rest=run.rest, tx=run.tx, loss=loss_spec(config),
        lr_fn=lr_fn or learning_rate_schedule(run.optimizer), mesh=run.mesh,
        axis=sharding.batch_axes(run.mesh),
        microbatches=train_config.microbatches(config, sharding.num_batch_shards(run.mesh)),
        seed=config.seed, image_norm=device_normalization(config.data.pp_train),
        terms=siglip2.terms_from_config(config),  # SigLIP 2's extra terms (None: contrastive alone)
        ema=EmaConfig.from_config(config.get("ema")), teacher=train_objective.teacher_of(config),
        frozen_teacher=None if run.teacher is None else run.teacher[0],
    )
    batch_shardings = batch_sharding  # every field of the batch (image or NaFlex's, text, LocCa's targets, crops) alike

    def jitted(fixed):
        step = functools.partial(train_step, config=fixed)  # `train_step` looked up now (tests patch it)
        if run.teacher is not None:  # issue 23: the frozen teacher's params, an argument of the step
            teacher, teacher_params = run.teacher
            return train_teacher.BoundStep(jax.jit(
                step, in_shardings=(run.state_shardings, batch_shardings, teacher.param_shardings),
                out_shardings=(run.state_shardings, None), donate_argnums=(0,)), teacher_params)
        return jax.jit(step, in_shardings=(run.state_shardings, batch_shardings),
                       out_shardings=(run.state_shardings, None), donate_argnums=(0,))

    return self_distill.phased_step(config, fixed, jitted)  # SILC / TIPS: one compiled step per phase


@contextlib.contextmanager
def preemption_flag():
    """Yields a dict whose 'set' turns True on SIGTERM / SIGINT; restores the old handlers."""
    flag = {"set": False, "signal": None}

    def handler(signum, _frame):
        flag.update(set=True, signal=signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(config, workdir, *, mesh=None, progress=True, stop_after_steps=None) -> dict:
    """Trains `config` in `workdir`; returns the last logged metrics and eval results.

    `stop_after_steps` stops (with a checkpoint, like a preemption) after that many steps of
    this call; tests use it to interrupt a run.
    """
    workdir = Workdir.of(workdir)  # a local folder or a gs:// / s3:// URL, never `./gs:/...`
    ckpt = data = batches = writer = lock = None
    try:
        workdir.check_writable()  # seconds and one sentence, before anything is compiled
        lock = workdir.lock(enabled=jax.process_index() == 0)
        lock.acquire()  # a live run here: refused, before anything is built or written
        # Config: checked against the workdir's record before anything is built or written.
        changes = workdir.check_resumable(config) if workdir.has_checkpoints() else []
        mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
        plan = staged.StagePlan(config, mesh)  # config.stages (issue 22); one stage without
        run = build(plan.begin(staged.newest_step(workdir)), mesh=mesh)
        run.teacher = train_teacher.load_for_run(config, mesh, train_objective.objective_of(config),
                                                 workdir.read_config())  # issue 23: loaded once
        batch_sharding = sharding.batch_sharding(run.mesh)
        evaluators = train_evals.build(config)
        # Load checkpoint: the newest readable one, with the data iterator where it left off.
        ckpt = Checkpointer(workdir.checkpoints, keep=config.keep_checkpoints)
        state, data = _restore_or_start(ckpt, run, batch_sharding,
                                        plan.saved_model(resample.saved_model_config(workdir)), plan)
        _record_config(train_teacher.recorded_config(config, run.teacher), workdir, changes)
        writer = MetricWriter(workdir, total_steps=config.total_steps, initial_step=int(state.step),
                              progress=progress)
        # Input pipeline: a thread keeps batches on the devices ahead of the step.
        batches = Prefetcher(data, depth=config.get("prefetch_batches", 2), fields=batch_fields(config))
        batches = staged.SwitchablePrefetcher(batches) if plan.active else batches
        return _loop(run, state, batches, ckpt, writer, evaluators,
                     make_step_fn(run, batch_sharding, plan.lr_fn()), stop_after_steps, workdir,
                     plan if plan.active else None)
    finally:
        _close_in_order(ckpt, batches or data, writer, lock)


def _loop(run, state, batches, ckpt, writer, evaluators, step_fn, stop_after_steps, workdir, plan=None) -> dict:
    """The steps from the state's step to `config.total_steps`, as a list of named actions.

    The host never waits for the step it has just dispatched: the loss of step k is read after
    step k+1 is queued (`PendingLossCheck`), so the devices always have the next step, and the batches
    come from the prefetching thread. The host waits for the newest step only to log (every
    `log_every` steps), evaluate or checkpoint, and each of those checks that step's loss first:
    no unchecked state is ever saved."""
    config = run.config
    first_step = step = int(state.step)
    throughput = Throughput(config.batch_size, config.peak_flops_per_device)
    profile = StepProfile(config.get("profile_steps"), workdir.profile)
    compiled, last, consumed = None, {}, None
    pending = PendingLossCheck(ckpt)

    def log(step, metrics) -> dict:
        out = {k: float(np.asarray(v)) for k, v in metrics.items()}
        out.update(throughput.report())
        out.update({k: int(v) for k, v in consumed.skip_counts.items()})
        writer.write(step, out)
        return out

    def evaluate(step, state, is_last) -> dict:
        results = {}
        if plan is not None and not plan.evaluates():  # a stage at another image size than pp_eval's
            return results
        for evaluator in evaluators:
            if evaluator.should_run(step) or (is_last and evaluator.every_steps == 0):
                pending.check()
                one = train_evals.run_one(evaluator, run, state, config)
                writer.write(step, one)
                results.update(one)
        return results

    def checkpoint(step, state, wait) -> None:
        # The step itself draws no random numbers (no dropout; augmentation randomness is
        # keyed by example index inside the data state): the seeds are the RNG. The data
        # state is the one after this step's batch, not after the batches prefetched since.
        meta = {"data": batches.checkpoint_state(consumed.data_state), "step": step,
                "process_count": jax.process_count(),
                "seed": config.seed, "data_seed": config.data.seed}
        writer.flush()  # a remote metrics.jsonl is rewritten whole: make it hold this step first
        if not ckpt.save(step, state, meta, wait=wait):
            writer.print(f"Warning: not saving step {step}: {ckpt.directory / str(step)} is the damaged checkpoint "
                         "kept for inspection; move it away to let this step be saved.")

    with preemption_flag() as preempted, contextlib.closing(profile):
        while step < config.total_steps:
            if plan is not None and plan.needs_switch(step):  # config.stages: the next stage begins
                run, state, step_fn = _next_stage(plan, step, run, state, batches, writer, throughput)
                compiled = None
            consumed = next(batches)
            if compiled is None or step in getattr(step_fn, "switch_steps", ()):  # SILC / TIPS phases
                compiled = _compile(step_fn, state, consumed.arrays)
                throughput.flops_per_step = _flops(compiled)
            profile.before(step + 1)
            state, metrics = compiled(state, consumed.arrays)
            consumed.arrays = None  # the batch's buffers go once the step is done with them
            step += 1
            pending.check()  # the previous step's loss, while this one runs
            pending.defer(step, metrics)
            profile.after(step, metrics)
            writer.advance()
            throughput.step()
            is_last = step == config.total_steps
            if step % config.log_every == 0 or is_last:
                pending.check()
                last = log(step, metrics)
            last.update(evaluate(step, state, is_last))
            stop = preempted["set"] or (stop_after_steps is not None and step - first_step >= stop_after_steps)
            if step % config.checkpoint_every == 0 or is_last or stop:
                pending.check()
                _check_state_finite(state, step, ckpt)
                checkpoint(step, state, wait=stop)
            if stop:
                writer.print(f"Stopped at step {step} ({preempted['signal'] or 'requested'}); checkpoint saved.")
                break
        pending.check()
    return last


def _next_stage(plan, step, run, state, batches, writer, throughput):
    """At a stage boundary: the stage's model (tables resampled), data and freshly compiled step."""
    teacher = run.teacher  # issue 23: the frozen teacher stays loaded across stages
    run, state, line = plan.switch(step, run, state, lambda cfg: build(cfg, mesh=run.mesh))
    run.teacher = teacher
    stage, batch_sharding = plan.current, sharding.batch_sharding(run.mesh)
    data = train_pipeline(run.config, batch_sharding, start_batch=plan.start_batch(stage))
    batches.switch(Prefetcher(data, depth=run.config.get("prefetch_batches", 2), fields=batch_fields(run.config)))
    throughput.batch_size = stage.batch_size
    writer.print(plan.describe(stage) + (f" {line}" if line else ""))
    return run, state, make_step_fn(run, batch_sharding, plan.lr_fn())


class PendingLossCheck:
    """The newest step whose loss the host has not read yet. Reading a loss waits for its step,
    so step k's is read after step k+1 is dispatched, and before anything that must not see a
    NaN: a log line, an evaluation, a checkpoint."""

    def __init__(self, ckpt):
        self.ckpt, self.step, self.metrics = ckpt, None, None

    def defer(self, step: int, metrics) -> None:
        self.step, self.metrics = step, metrics

    def check(self) -> None:
        """Raises NonFiniteLoss if the pending step's loss is NaN / Inf."""
        if self.step is not None:
            _check_finite(self.metrics, self.step, self.ckpt)
            self.step = self.metrics = None


def _compile(step_fn, state, batch):
    """The step compiled for these shapes."""
    return step_fn.lower(state, batch).compile()


def _check_finite(metrics, step, ckpt) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"The loss is {loss} at step {step}; stopping. The last good checkpoint "
            f"(step {ckpt.latest_step()}) is intact in {ckpt.directory}; lower the learning "
            "rate or check the data, then resume."
        )


@jax.jit
def _all_finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_state_finite(state, step, ckpt) -> None:
    """A finite loss does not make a finite update (the gradient or a moment can overflow), so the
    state itself is checked before it is saved."""
    if not bool(_all_finite((state.params, state.opt_state))):
        raise NonFiniteLoss(
            f"The parameters or optimizer state after step {step} hold NaN or Inf (the step's loss was "
            f"finite, its update was not); stopping without saving them. The last good checkpoint (step "
            f"{ckpt.latest_step()}) is intact in {ckpt.directory}; lower the learning rate or check the data, "
            "then resume."
        )


def _record_config(config, workdir, changes) -> None:
    """Writes the workdir's config record (process 0) and lists the safe changes a resume brings."""
    if jax.process_index() != 0:
        return
    if changes:
        print("Resuming with config changes: " + "; ".join(changes) + ".", flush=True)
    workdir.write_config(config)


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def _restore_or_start(ckpt, run, batch_sharding, saved_model=None, plan=None):
    """(state, data iterator) of the newest readable checkpoint, or a fresh start. `saved_model`
    (the model config that wrote the checkpoints) lets position tables of another shape be
    restored and resampled (`resample.py`); a function of the step with `config.stages` (`plan`)."""
    config = run.config
    saved_model = saved_model if callable(saved_model) else (lambda step, model=saved_model: model)
    stage = plan.current if plan is not None and plan.active else None
    offset = plan.start_batch(stage) if stage is not None else 0

    def resumed_data(meta, step):
        try:
            if stage is not None and plan.at_boundary(step):  # saved by the stage before: new data
                return train_pipeline(config, batch_sharding, start_batch=offset)
            return _resumed_pipeline(config, batch_sharding, meta, step, offset, stage.start_step if stage else 0)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DamagedCheckpoint(
                step, f"The checkpoint of step {step} in {ckpt.directory} holds a data-iterator state that does "
                f"not parse ({short_reason(error)}).") from error

    if ckpt.all_steps() == [0]:  # an imported model (training never saves step 0)
        state = _with_initial_params(ckpt, run, saved_model(0))
        return state, train_pipeline(config, batch_sharding)
    restored = resample.restore(ckpt, run.state, run.state_shardings, saved_model, config.model,
                                accept=resumed_data, warn=_warn)
    if restored is None:
        return run.state, train_pipeline(config, batch_sharding)
    state, _, step, data = restored
    if plan is not None and plan.needs_switch(step):
        data.close()
        raise DamagedCheckpoint(step, f"The newest readable checkpoint in {ckpt.directory} (step {step}) belongs "
                                "to an earlier stage than the newest one; move the damaged newer steps away "
                                "and resume.")
    return state, data


def _with_initial_params(ckpt, run, saved_model=None) -> TrainState:
    """The run's fresh state with the parameters of a step-0 checkpoint (what `big-contrast
    import` writes). Its optimizer state is the initial one and carries no information, so this
    config's optimizer starts afresh: an imported model fine-tunes with a tower locked or another
    optimizer. The parameters themselves must match the config, but for position tables of
    another image size / text length than `saved_model`'s (resampled, one line on stderr)."""
    saved, _ = ckpt.restore_arrays(0)
    flat = jax.tree_util.tree_flatten_with_path
    saved_params = saved["params"]
    if resample.needs_resampling(saved_model, run.config.model):
        saved_params, changes = posemb.adapt_params(
            saved_params, saved_model, run.config.model,
            on_mismatch=functools.partial(posemb.mismatch_sentence, directory=ckpt.directory))
        _warn(resample.describe(changes))
    stored = {sharding.path_str(p): x for p, x in flat(saved_params)[0]}  # keys "0" where ours are 0
    wanted = {sharding.path_str(p): x.shape for p, x in flat(run.state.params)[0]}
    for path in sorted(set(stored) | set(wanted)):
        shape = stored[path].shape if path in stored else "absent"
        if shape != wanted.get(path, "absent"):
            raise ConfigMismatch(
                f"The step-0 checkpoint in {ckpt.directory} holds parameter {path} with shape {shape}, "
                f"this config {wanted.get(path, 'absent')}: use the model config it was imported with "
                "(its config.py).")
    params = jax.tree_util.tree_map_with_path(
        lambda p, target: jax.device_put(stored[sharding.path_str(p)], target), run.state_shardings.params)
    return dataclasses.replace(run.state, params=params)


def _close_in_order(*resources) -> None:
    """Closes the checkpointer (waiting for its last save), the data iterator, the writer and the
    workdir lock, each even when an earlier one fails; then raises the first failure (a failed
    async save)."""
    error = None
    for resource in resources:
        try:
            if resource is not None:
                resource.close()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are closed
            error = error or e
    if error is not None:
        raise error


def _resumed_pipeline(config, batch_sharding, meta, step, offset=0, stage_start=0):
    """The data iterator where the checkpoint left it. The saved iterator state is exact; a
    random-access pipeline's belongs to one process layout, so on another number of processes
    it starts at global batch `step` of the same example order instead (exact on data without
    skips). A streaming state holds every process's streams and restores on any layout. With
    `config.stages` the stage's pipeline begins at global batch `offset` (its own batch size),
    the stage at step `stage_start`."""
    if _is_streaming_state(meta.get("data")) or meta.get("process_count", 1) == jax.process_count():
        data = train_pipeline(config, batch_sharding, start_batch=offset)
        try:
            data.set_state(meta["data"])
        except BaseException:
            data.close()
            raise
        return data
    return train_pipeline(config, batch_sharding, start_batch=offset + step - stage_start)


def _is_streaming_state(state) -> bool:
    return isinstance(state, dict) and isinstance(state.get("grain"), dict) and state["grain"].get("kind") == "streaming"


def _flops(compiled) -> float | None:
    """Model FLOPs of one step as XLA counts them (None where the backend does not say)."""
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        return float(analysis.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is optional diagnostics
        return None
