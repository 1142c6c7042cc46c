"""The training loop: build everything from a config, resume, step, log, evaluate, checkpoint.

    result = train(config, workdir)

Resumes from the latest checkpoint in `workdir/checkpoints` when there is one (parameters,
optimizer state, step and the data iterator's position), so a restarted run continues with
exactly the batches an uninterrupted run would have seen. SIGTERM (a preemption notice) and
SIGINT finish the current step, save a checkpoint and return. A NaN or Inf loss stops the
run with an error naming the step, before anything of that step is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast import models, sharding
from big_contrast.checkpoint import Checkpointer, abstract_like
from big_contrast.data import make_pipeline
from big_contrast.data.device_ops import device_normalization
from big_contrast.train import config as train_config
from big_contrast.train import evals as train_evals
from big_contrast.train.metrics import MetricWriter
from big_contrast.train.optimizer import learning_rate_schedule, make_optimizer
from big_contrast.train.step import LossSpec, TrainState, train_step

BATCH_FIELDS = ("image", "text")


class NonFiniteLoss(RuntimeError):
    pass


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
    n_shards: int
    jitted: dict = dataclasses.field(default_factory=dict)  # compiled helpers, e.g. tower embedders

    def model(self, params=None):
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)


def build(config, *, mesh=None, params=None) -> Run:
    """Mesh, validated config, sharded model and a fresh train state (step 0).

    `params` (nested like the model's parameters, e.g. imported weights) replace the random
    initialisation."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    n_shards = sharding.num_batch_shards(mesh)
    train_config.validate(config, n_shards)
    abstract = models.abstract_model(config.model)  # checks the model config, allocates nothing
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    frozen = tuple(abstract.frozen_patterns) + tuple(config.freeze)
    opt = config.optimizer.copy_and_resolve_references()
    with opt.unlocked():
        opt.total_steps = config.total_steps
    tx = make_optimizer(opt, abstract_params, lr_mults=tuple(config.lr_mults), frozen_patterns=frozen)

    if params is None:
        model = models.create_sharded(config.model, mesh, seed=jax.random.key(config.seed))
    else:
        model = models.create_from_params(config.model, params, abstract)
        nnx.update(model, sharding.shard_state(nnx.state(model), mesh))
    for tower, directory in config.init_towers.items():
        models.load_tower_params(model, tower, _tower_params_from_checkpoint(directory, tower))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=_on_mesh(jax.jit(tx.init)(params), replicated))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return Run(config, mesh, graphdef, rest, state, state_shardings, tx, n_shards)


def _on_mesh(tree, replicated):
    """Leaves that jit left on a single device (optimizer step counters) replicated over the mesh;
    moments keep the sharding they inherited from their parameters."""

    def place(x):
        on_mesh = isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == replicated.mesh
        return x if on_mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def _tower_params_from_checkpoint(directory, tower):
    """The `tower` parameters of the latest checkpoint under `directory` (a workdir or its checkpoints/)."""
    path = pathlib.Path(directory)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    ckpt = Checkpointer(path, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"config.init_towers.{tower}: no checkpoint under {directory}.")
        state, _ = ckpt.restore_arrays()
    finally:
        ckpt.close()
    return state["params"][tower]


def make_step_fn(run: Run, batch_sharding):
    config = run.config
    loss = LossSpec(config.model.loss, config.loss_impl, config.loss_block)
    opt = config.optimizer.copy_and_resolve_references()
    with opt.unlocked():
        opt.total_steps = config.total_steps
    step = functools.partial(
        train_step, graphdef=run.graphdef, rest=run.rest, tx=run.tx, loss=loss, mesh=run.mesh,
        axis=sharding.batch_axes(run.mesh), n_shards=run.n_shards,
        microbatches=train_config.microbatches(config, run.n_shards), lr_fn=learning_rate_schedule(opt),
        image_norm=device_normalization(config.data.pp_train),
    )
    batch_shardings = {k: batch_sharding for k in BATCH_FIELDS}
    return jax.jit(step, in_shardings=(run.state_shardings, batch_shardings),
                   out_shardings=(run.state_shardings, None), donate_argnums=(0,))


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
    workdir = pathlib.Path(workdir)
    run = build(config, mesh=mesh)
    batch_sharding = sharding.batch_sharding(run.mesh)
    evaluators = train_evals.build(config)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    state, data = run.state, None
    if ckpt.latest_step() is not None:
        state, meta, step = ckpt.restore(abstract_like(state, run.state_shardings))
        data = _resumed_pipeline(config, batch_sharding, meta, step)
    if data is None:
        data = make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size)
    first_step = int(state.step)
    writer = MetricWriter(workdir, total_steps=config.total_steps, initial_step=first_step, progress=progress)
    step_fn = make_step_fn(run, batch_sharding)
    compiled = None
    last = {}
    try:
        with preemption_flag() as preempted:
            step, window_start, window_steps = first_step, time.perf_counter(), 0
            while step < config.total_steps:
                batch = {k: v for k, v in next(data).items() if k in BATCH_FIELDS}
                if compiled is None:
                    compiled = step_fn.lower(state, batch).compile()
                    flops_per_step = _flops(compiled)
                state, metrics = compiled(state, batch)
                step += 1
                window_steps += 1
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"The loss is {loss} at step {step}; stopping. The last good checkpoint "
                        f"(step {ckpt.latest_step()}) is intact in {ckpt.directory}; lower the learning "
                        "rate or check the data, then resume."
                    )
                writer.advance()
                is_last = step == config.total_steps
                if step % config.log_every == 0 or is_last:
                    elapsed = time.perf_counter() - window_start
                    last = _log_metrics(metrics, step, elapsed, window_steps, config, flops_per_step, run, data)
                    writer.write(step, last)
                    window_start, window_steps = time.perf_counter(), 0
                for evaluator in evaluators:
                    if evaluator.should_run(step) or (is_last and evaluator.every_steps == 0):
                        results = train_evals.run_one(evaluator, run, state, config)
                        writer.write(step, results)
                        last.update(results)
                stop = preempted["set"] or (stop_after_steps is not None and step - first_step >= stop_after_steps)
                if step % config.checkpoint_every == 0 or is_last or stop:
                    # The step itself draws no random numbers (no dropout; augmentation randomness
                    # is keyed by example index inside the data state): the seeds are the RNG.
                    meta = {"data": data.get_state(), "step": step, "process_count": jax.process_count(),
                            "seed": config.seed, "data_seed": config.data.seed}
                    ckpt.save(step, state, meta, wait=stop)
                if stop:
                    writer.print(f"Stopped at step {step} ({preempted['signal'] or 'requested'}); checkpoint saved.")
                    break
    finally:
        ckpt.close()
        writer.close()
        data.close()
    return last


def _resumed_pipeline(config, batch_sharding, meta, step):
    """The data iterator where the checkpoint left it. The saved iterator state is exact but
    belongs to one process layout; on another number of processes the pipeline starts at
    global batch `step` of the same example order instead (exact on data without skips)."""
    if meta.get("process_count", 1) == jax.process_count():
        data = make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size)
        data.set_state(meta["data"])
        return data
    return make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size,
                         start_batch=step)


def _flops(compiled) -> float | None:
    """Model FLOPs of one step as XLA counts them (None where the backend does not say)."""
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        return float(analysis.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is optional diagnostics
        return None


def _log_metrics(metrics, step, elapsed, steps, config, flops_per_step, run, data) -> dict:
    out = {k: float(np.asarray(v)) for k, v in metrics.items()}
    out["examples_per_s"] = steps * config.batch_size / elapsed
    out["step_time_s"] = elapsed / steps
    if flops_per_step and config.peak_flops_per_device:
        # cost_analysis counts the per-device program; every device runs one.
        out["mfu"] = flops_per_step / out["step_time_s"] / config.peak_flops_per_device
    out.update({k: int(v) for k, v in data.skip_counts().items()})
    return out
