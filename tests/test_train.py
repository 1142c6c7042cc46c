"""The trainer: resume after kill -9 and onto another mesh, SIGTERM, eval of a checkpoint, config
errors, CLI. (Gradient caching is tested in test_train_step.py, NaN stops in test_train_loop.py.)

Runs the demo towers on the built-in data with tiny batches on the 8 simulated devices."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.checkpoint import Checkpointer
from big_contrast.data import make_pipeline
from big_contrast import sharding
from big_contrast.train import build, train
from big_contrast.train.loop import make_step_fn
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS
from conftest import rel_err

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import demo  # noqa: E402


def tiny_config(loss="sigmoid", **overrides):
    config = demo.get_config(loss)
    config.batch_size = 32
    config.total_steps = 6
    config.log_every = 1
    config.checkpoint_every = 3
    config.evals = {}
    config.data.sources.demo.size = 500
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- subprocess runs


def cli(workdir, *overrides):
    return [sys.executable, "-m", "big_contrast.cli", "train", "--config", str(REPO / "configs/demo.py:sigmoid,noeval"),
            "--workdir", str(workdir), "--noplot", "--config.batch_size=32", "--config.log_every=1",
            "--config.data.sources.demo.size=500", *overrides]


def env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def final_params(workdir):
    ckpt = Checkpointer(pathlib.Path(workdir) / CHECKPOINTS, async_save=False)
    state, step = ckpt.restore_arrays()
    ckpt.close()
    return step, state["params"]


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = ["--config.total_steps=8", "--config.checkpoint_every=3"]
    straight = subprocess.run(cli(tmp_path / "straight", *steps), env=env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed, *steps), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: (killed / CHECKPOINTS / "3").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(cli(killed, *steps), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    step_a, params_a = final_params(tmp_path / "straight")
    step_b, params_b = final_params(killed)
    assert step_a == step_b == 8
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        assert rel_err(b, a) <= 1e-5
    # The last value logged for every step agrees (a resumed run re-logs the steps it redoes).
    by_step = lambda rows: {r["step"]: r for r in rows}  # noqa: E731
    straight_rows, killed_rows = by_step(read_metrics(tmp_path / "straight")), by_step(read_metrics(killed))
    assert sorted(straight_rows) == sorted(killed_rows) == list(range(1, 9))
    for step, row in straight_rows.items():
        assert rel_err(killed_rows[step]["loss"], row["loss"]) <= 1e-5, step


@pytest.mark.slow  # a training subprocess end to end (~30 s): keeps make test under 10 min
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(cli(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=100000"),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(read_metrics(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out and "checkpoint saved" in out
    steps = Checkpointer(tmp_path / CHECKPOINTS, async_save=False).all_steps()
    assert len(steps) == 1 and 2 <= steps[0] < 100000


# ----------------------------------------------------------------------------- in-process runs


def eval_config():
    """What `big-contrast eval --config configs/demo.py:sigmoid` below evaluates with."""
    config = demo.get_config("sigmoid")
    config.batch_size = 32
    config.data.sources.demo.size = 500
    return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 2-step run (no warm-up, so its weights are well away from the initial ones) and
    `big-contrast eval` of its checkpoint: (workdir, stdout, the --json record)."""
    workdir = tmp_path_factory.mktemp("evaluated")
    config = tiny_config(total_steps=2, checkpoint_every=2)
    config.optimizer.warmup_steps = 0
    train(config, workdir, progress=False)
    out = workdir / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "big_contrast.cli", "eval", "--config", str(REPO / "configs/demo.py:sigmoid"),
         "--workdir", str(workdir), "--config.batch_size=32", "--config.data.sources.demo.size=500",
         "--json", str(out)], env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout, json.loads(out.read_text())


def test_eval_command_restores_a_checkpoint_and_reports(evaluated):
    _, stdout, results = evaluated
    assert "step 2" in stdout
    metrics = results.get("results", results)
    for key in ("shape/top1", "colour/top1", "retrieval/i2t_recall@1"):
        assert 0.0 <= metrics[key] <= 1.0


def retrieval_through_the_api(run, params, config) -> dict:
    """The demo config's retrieval evaluator run directly on `params`."""
    from big_contrast import evaluate
    from big_contrast.data.device_ops import device_normalization
    from big_contrast.train import evals as train_evals

    evaluator = evaluate.build_evaluator("retrieval", config.evals.retrieval)
    data_config = train_evals.eval_data_config(config, evaluator)
    encoders = train_evals.make_encoders(run, params, config, device_normalization(data_config.pp_eval))
    return evaluator.run(train_evals.EvalData(data_config, evaluator.batch_size), encoders)


def test_eval_command_reports_the_metrics_of_the_checkpoints_weights(evaluated):
    """The CLI's retrieval numbers equal the evaluator's on the parameters restored from the
    checkpoint, and differ from its numbers on the initial parameters (which an eval that
    ignored the checkpoint would report)."""
    workdir, _, results = evaluated
    config = eval_config()
    run = build(config)
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    saved, step = ckpt.restore_arrays()
    ckpt.close()
    stored = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
    restored = jax.tree_util.tree_map_with_path(
        lambda p, target: jax.device_put(stored[sharding.path_str(p)], target), run.state_shardings.params)
    cli_metrics = results.get("results", results)
    api = retrieval_through_the_api(run, restored, config)
    initial = retrieval_through_the_api(run, run.state.params, config)
    keys = sorted(k for k in api if "recall@" in k)
    assert step == 2 and len(keys) == 6, (step, keys)
    assert {k: cli_metrics[k] for k in keys} == pytest.approx({k: api[k] for k in keys}, abs=1e-9)
    assert [initial[k] for k in keys] != [api[k] for k in keys], (initial, api)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides,message", [
    (dict(batch_size=36), r"config.batch_size=36 does not divide over the 8 data-parallel devices"),
    (dict(microbatch_size=3), r"config.microbatch_size=3 does not divide the per-device batch 4"),
    (dict(loss_impl="flash"), r"config.loss_impl='flash' is unknown"),
    (dict(freeze=("image/does_not_exist/.*",)), r"'image/does_not_exist/\.\*' .* matches no parameter"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_config(**overrides))


def test_unknown_loss_and_model_names_are_config_errors():
    config = tiny_config()
    config.model.loss = "hinge"
    with pytest.raises(ValueError, match=r"config.model.loss='hinge' is unknown"):
        build(config)
    config = tiny_config()
    config.model.image.variant = "Q/16"
    with pytest.raises(ValueError, match=r"Q"):
        build(config)


@pytest.mark.parametrize("name", ["demo", "clip_b16", "siglip_b16", "lit_b16", "siglip_so400m14"])
def test_every_config_is_valid(name):
    """Each shipped config resolves: model fields, image ops, optimizer, batch over 8 devices."""
    import importlib

    from big_contrast.data import parse_image_pp
    from big_contrast.models import resolve_config
    from big_contrast.train import validate
    from big_contrast.train.optimizer import learning_rate_schedule

    module = importlib.import_module(name)
    assert module.__doc__.startswith(f"big-contrast train --config configs/{name}.py")  # the run command first
    config = module.get_config()
    validate(config, num_batch_shards=8)
    resolve_config(config.model)
    parse_image_pp(config.data.pp_train)
    parse_image_pp(config.data.pp_eval)
    opt = config.optimizer.copy_and_resolve_references()
    opt.total_steps = config.total_steps
    assert float(learning_rate_schedule(opt)(config.optimizer.warmup_steps)) == pytest.approx(config.optimizer.lr)


def test_lit_loads_a_tower_from_a_workdir_and_freezes_it(tmp_path):
    """config.init_towers copies the image tower of another run's latest checkpoint; with
    lock_image the optimizer gives it zero updates."""
    source = build(tiny_config(seed=1))  # another initialisation stands in for a trained run
    ckpt = Checkpointer(tmp_path / "image_run" / CHECKPOINTS, async_save=False)
    ckpt.save(5, source.state, {"step": 5})
    ckpt.close()
    _, saved = final_params(tmp_path / "image_run")
    config = tiny_config()
    config.optimizer.warmup_steps = 0  # a non-zero learning rate at step 0
    config.model.lock_image = True
    config.init_towers = {"image": str(tmp_path / "image_run")}
    run = build(config)
    loaded = jax.device_get(run.state.params["image"])
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved["image"])):
        np.testing.assert_array_equal(a, b)
    fresh = jax.device_get(build(tiny_config()).state.params["image"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(loaded)))
    grads = jax.tree.map(jnp.ones_like, run.state.params)
    updates, _ = run.tx.update(grads, run.state.opt_state, run.state.params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["image"]))
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates["text"]))


def test_config_argument_sets_fields_and_flags():
    config = demo.get_config("softmax,total_steps=50,optimizer.lr=0.01,data.max_len=8")
    assert (config.model.loss, config.total_steps, config.optimizer.lr, config.data.max_len) == ("softmax", 50, 0.01, 8)
    assert len(demo.get_config("noeval").evals) == 0
    with pytest.raises(ValueError, match=r"Unknown config argument 'sofmax'"):
        demo.get_config("sofmax")
    with pytest.raises(ValueError, match=r"no field 'optimizer.learning_rate'"):
        demo.get_config("optimizer.learning_rate=1")


def by_path(tree) -> dict:
    return {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_resume_onto_a_different_mesh_shape(tmp_path):
    """A checkpoint written with parameters replicated over 8 data shards resumes with them
    FSDP-sharded over 4 devices (mesh 2 x 4) and continues like the uninterrupted run."""
    from big_contrast.checkpoint import abstract_like

    straight = train(tiny_config(total_steps=3), tmp_path / "straight", progress=False)
    train(tiny_config(total_steps=2, checkpoint_every=2), tmp_path / "moved", progress=False)
    resharded = tiny_config(total_steps=3, mesh=(("data", 2), ("fsdp", 4), ("tensor", 1)))
    # The step-2 state restored onto the 2 x 4 mesh is the saved one, optimizer state included,
    # each array with the sharding the new mesh's run asks for (some of them split over fsdp).
    run = build(resharded)
    ckpt = Checkpointer(tmp_path / "moved" / CHECKPOINTS, async_save=False)
    saved, _ = ckpt.restore_arrays(2)
    state, _, _ = ckpt.restore(abstract_like(run.state, run.state_shardings), 2)
    ckpt.close()
    saved, restored, wanted = by_path(saved), by_path(state), by_path(run.state_shardings)
    assert sorted(saved) == sorted(restored) and any(p.startswith("opt_state/") for p in saved)
    for path, array in restored.items():
        assert np.array_equal(np.asarray(array), saved[path]), path
        assert array.sharding.is_equivalent_to(wanted[path], array.ndim), path
    assert int(state.step) == 2 and any(not a.sharding.is_fully_replicated for a in restored.values())

    resumed = train(resharded, tmp_path / "moved", progress=False)
    assert rel_err(resumed["loss"], straight["loss"]) <= 1e-4
    rows = read_metrics(tmp_path / "moved")
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2: steps 1 and 2 are not redone
    # Step 3's update used the restored optimizer state: its parameters and Adam moments are the
    # uninterrupted run's (the loss above was computed before that update, so it cannot tell).
    ends = [Checkpointer(tmp_path / name / CHECKPOINTS, async_save=False) for name in ("straight", "moved")]
    (want, want_step), (got, got_step) = [c.restore_arrays() for c in ends]
    for c in ends:
        c.close()
    want, got = by_path(want), by_path(got)
    assert want_step == got_step == 3 and sorted(want) == sorted(got)
    for path in want:
        # Attention key biases get no gradient (softmax is shift-invariant): they and their
        # moments hold round-off only (norms ~1e-6 and below), which differs between meshes.
        if not path.endswith("attention/key/bias"):
            assert rel_err(got[path], want[path]) <= 1e-5, path


def test_a_step_on_uint8_images_equals_the_step_on_float_images():
    """data.device_normalize: the pipeline sends uint8 images and the jitted step (and the eval
    embedding) applies the pp string's value_range; loss, updated parameters and image
    embeddings match the float path."""
    from big_contrast.data.device_ops import device_normalization
    from big_contrast.train.evals import make_encoders

    config = tiny_config(loss_impl="dense")  # the image path is the point: the cheapest loss to compile
    run = build(config)
    batch_sharding = sharding.batch_sharding(run.mesh)
    results = {}
    for uint8 in (False, True):
        cfg = config.copy_and_resolve_references()
        cfg.data.device_normalize = uint8
        with make_pipeline(cfg.data, batch_sharding, train=True, global_batch_size=cfg.batch_size) as data:
            batch = {k: v for k, v in next(data).items() if k in ("image", "text")}
        assert batch["image"].dtype == (jnp.uint8 if uint8 else jnp.float32)
        state = jax.tree.map(jnp.copy, run.state)  # the step donates its input state
        step = make_step_fn(dataclasses.replace(run, config=cfg), batch_sharding)
        # XLA:CPU compiles ~3x faster without its expensive passes; both paths compile alike.
        step = step.lower(state, batch).compile(dict(xla_backend_optimization_level=0,
                                                     xla_llvm_disable_expensive_passes=True))
        state, metrics = step(state, batch)
        encoders = make_encoders(run, run.state.params, cfg, device_normalization(cfg.data.pp_train))
        results[uint8] = (float(metrics["loss"]), jax.device_get(state.params),
                          encoders.embed_images(batch["image"]))
    assert rel_err(results[True][0], results[False][0]) <= 1e-6
    assert rel_err(results[True][2], results[False][2]) <= 1e-6
    for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1])):
        assert rel_err(a, b) <= 1e-5


def test_weight_decay_skips_biases_of_every_rank_and_the_scalars():
    """Attention q/k/v biases are 2-D ([heads, head_dim]); rank alone would decay them."""
    from big_contrast import models
    from big_contrast.train.optimizer import decays_weights, param_paths
    from flax import nnx

    model = models.abstract_model(demo.get_config("sigmoid").model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = dict(zip(param_paths(params), jax.tree.leaves(params)))
    decayed = {p for p, leaf in leaves.items() if decays_weights(p, leaf)}
    assert "image/encoder/blocks/0/attention/query/bias" in leaves
    assert not any(p.endswith("bias") for p in decayed)
    assert "log_scale" not in decayed and "image/encoder/norm/scale" not in decayed
    assert {"image/encoder/blocks/0/attention/query/kernel", "text/embedding/embedding",
            "image/embedding/kernel"} <= decayed
