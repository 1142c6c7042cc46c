"""Position tables at another resolution wherever parameters are loaded (issue 22): resume with
another image_size, eval at another resolution, a step-0 import and config.init_towers.

A learned-posemb variant of the demo towers, 2 steps at 32 px on the 8 simulated devices."""

import pathlib
import sys

import jax
import numpy as np
import pytest

from big_contrast.checkpoint import Checkpointer
from big_contrast.errors import ConfigMismatch
from big_contrast.models import posemb
from big_contrast.train import build, resample, train
from big_contrast.workdir import CHECKPOINTS

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import demo  # noqa: E402

pytestmark = pytest.mark.slow  # `make test-slow` (CI runs it after `make test`)


def learned_config(image_size=32, total_steps=2, evals=False):
    config = demo.get_config("sigmoid" if evals else "sigmoid,noeval")
    config.batch_size = 32
    config.total_steps = total_steps
    config.log_every = 1
    config.checkpoint_every = 2
    config.data.sources.demo.size = 500
    config.optimizer.warmup_steps = 0
    config.model.image.posemb = "learn"
    config.model.image.image_size = image_size
    config.data.pp_train = f"decode|resize({image_size})|value_range(-1, 1)"
    config.data.pp_eval = f"decode|resize({image_size})|value_range(-1, 1)"
    return config


@pytest.fixture(scope="module")
def trained_at_32(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("at32")
    train(learned_config(), workdir, progress=False)
    return workdir


def saved_arrays(workdir, step=None):
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    try:
        return ckpt.restore_arrays(step)[0]
    finally:
        ckpt.close()


def test_restore_at_another_image_size_resamples_params_and_moments_as_the_reference(trained_at_32):
    saved = saved_arrays(trained_at_32, 2)
    config = learned_config(image_size=16)
    run = build(config)
    lines = []
    ckpt = Checkpointer(trained_at_32 / CHECKPOINTS, async_save=False)
    try:
        state, _, step, _ = resample.restore(ckpt, run.state, run.state_shardings,
                                             resample.saved_model_config(trained_at_32), config.model,
                                             warn=lines.append)
    finally:
        ckpt.close()
    assert step == 2 and len(lines) == 1 and "4x4 -> 2x2" in lines[0], lines
    table = saved["params"]["image"]["posemb"]
    want = posemb.resample_image_posemb(table, (4, 4), (2, 2), class_token=False)
    np.testing.assert_allclose(np.asarray(state.params["image"]["posemb"]), want, rtol=1e-6)
    # The corners of an aligned-corner resampling are the old corners exactly.
    np.testing.assert_array_equal(np.asarray(state.params["image"]["posemb"])[0, 0], table[0, 0])
    flat = {resample.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    saved_flat = {resample.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved["opt_state"])[0]}
    moments = [k for k in flat if k.endswith("image/posemb")]
    assert moments, sorted(flat)[:5]
    for key in moments:
        ref = posemb.resample_image_posemb(saved_flat[key], (4, 4), (2, 2), class_token=False)
        np.testing.assert_allclose(np.asarray(flat[key]), ref, rtol=1e-6, atol=1e-12)
    others = [k for k in flat if not k.endswith("posemb") and np.ndim(flat[k])]
    for key in others[:10]:
        np.testing.assert_array_equal(np.asarray(flat[key]), saved_flat[key])


def test_resume_at_another_image_size_trains_through_resampling_and_says_so_once(
        trained_at_32, tmp_path, capfd, monkeypatch):
    import shutil

    workdir = tmp_path / "resumed"
    shutil.copytree(trained_at_32, workdir)
    config = learned_config(image_size=16, total_steps=3)
    capfd.readouterr()
    result = train(config, workdir, progress=False)
    err = capfd.readouterr().err
    assert err.count("Resampled the position embeddings") == 1, err
    assert np.isfinite(result["loss"])
    assert np.shape(saved_arrays(workdir, 3)["params"]["image"]["posemb"]) == (1, 4, 64)
    # Without the resampling path the same resume fails on the table's shape.
    again = tmp_path / "without"
    shutil.copytree(trained_at_32, again)
    monkeypatch.setattr(resample, "needs_resampling", lambda *a: False)
    with pytest.raises(ConfigMismatch, match="image/posemb"):
        train(config, again, progress=False)


def test_a_model_trained_at_32_px_evaluates_at_64_px(trained_at_32, capfd):
    from big_contrast.commands.eval import evaluate_checkpoint

    config = learned_config(image_size=64, evals=True)
    capfd.readouterr()
    results, step = evaluate_checkpoint(config, trained_at_32)
    err = capfd.readouterr().err
    assert step == 2 and "4x4 -> 8x8" in err, err
    for key in ("shape/top1", "colour/top1", "retrieval/i2t_recall@1"):
        assert 0.0 <= results[key] <= 1.0, results
    print({k: round(v, 3) for k, v in results.items() if "top1" in k or "recall@1" in k})


def test_init_towers_resamples_the_image_table_of_a_run_at_another_size(trained_at_32, capfd):
    config = learned_config(image_size=16)
    config.init_towers = {"image": str(trained_at_32)}
    capfd.readouterr()
    run = build(config)
    assert "config.init_towers.image: Resampled" in capfd.readouterr().err
    table = saved_arrays(trained_at_32, 2)["params"]["image"]["posemb"]
    want = posemb.resample_image_posemb(table, (4, 4), (2, 2), class_token=False)
    np.testing.assert_allclose(np.asarray(run.state.params["image"]["posemb"]), want, rtol=1e-6)


def test_a_step_0_checkpoint_at_another_image_size_is_resampled(trained_at_32, tmp_path, capfd):
    """What `big-contrast import` writes (step 0, interop.json's model) fine-tunes at another size."""
    import json

    from big_contrast.commands.import_ import save_initial_checkpoint
    from big_contrast.workdir import Workdir

    params = saved_arrays(trained_at_32, 2)["params"]
    source = learned_config()

    def imported_workdir(name):
        imported = Workdir(tmp_path / name)
        save_initial_checkpoint(source, imported, params)
        imported.interop.write_text(json.dumps({"model": source.model.to_dict()}))
        return imported

    imported = imported_workdir("imported")
    config = learned_config(image_size=16, total_steps=1)
    capfd.readouterr()
    train(config, imported.path, progress=False)
    assert capfd.readouterr().err.count("2x2 patch grid") >= 1
    bad = learned_config(image_size=16, total_steps=1)
    bad.model.image.width = 32
    bad.model.image.mlp_dim = 128
    with pytest.raises(ConfigMismatch, match="The step-0 checkpoint in .* holds parameter image/"):
        train(bad, imported_workdir("width").path, progress=False)


# ----------------------------------------------------------------------------- config.stages


def two_stage_config():
    """CLIPA-style: 16 px and 8 tokens for 2 steps, then 32 px and the full 16 for 2 more."""
    config = learned_config(total_steps=4)
    config.checkpoint_every = 1
    config.stages = (dict(until_step=2, image_size=16, max_len=8,
                          pp_train="decode|resize(16)|value_range(-1, 1)"),
                     dict(until_step=4))
    return config


def losses(workdir):
    from big_contrast.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight_two_stages(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stages")
    train(two_stage_config(), workdir, progress=False)
    return workdir


def test_two_stages_switch_resolution_and_text_length_and_train(straight_two_stages, capfd):
    rows = losses(straight_two_stages)
    assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(list(rows.values())))
    assert np.shape(saved_arrays(straight_two_stages, 2)["params"]["image"]["posemb"]) == (1, 4, 64)
    assert np.shape(saved_arrays(straight_two_stages, 4)["params"]["image"]["posemb"]) == (1, 16, 64)


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_two_stages_resume_exactly_before_at_and_after_the_boundary(straight_two_stages, tmp_path, stop_after,
                                                                     capfd):
    workdir = tmp_path / "stopped"
    train(two_stage_config(), workdir, progress=False, stop_after_steps=stop_after)
    capfd.readouterr()
    train(two_stage_config(), workdir, progress=False)
    out = capfd.readouterr().out
    assert ("Stage 1 (steps 2..4): image 32x32" in out) == (stop_after < 2), out
    want, got = losses(straight_two_stages), losses(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)
    a, b = saved_arrays(straight_two_stages, 4)["params"], saved_arrays(workdir, 4)["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


# A real SIGKILL of a staged `big-contrast train` (the tests above stop cleanly in-process).

KILL_BOUNDARY, KILL_TOTAL = 4, 16
SWITCH_LINE = f"Stage 1 (steps {KILL_BOUNDARY}..{KILL_TOTAL}): image 32x32"


def killable_two_stage_config(arg=None):
    """16 px + 8 tokens to step 4, then 32 px + 16 tokens to step 16, a checkpoint every 2 steps:
    long enough after a checkpoint that a kill lands before the end (the CLI's config file)."""
    del arg
    config = learned_config(total_steps=KILL_TOTAL)
    config.checkpoint_every = 2
    config.stages = (dict(until_step=KILL_BOUNDARY, image_size=16, max_len=8,
                          pp_train="decode|resize(16)|value_range(-1, 1)"),
                     dict(until_step=KILL_TOTAL))
    return config


def staged_cli(workdir, config_file):
    import os

    command = [sys.executable, "-m", "big_contrast.cli", "train", "--config", str(config_file),
               "--workdir", str(workdir), "--noplot"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return command, env


@pytest.fixture(scope="module")
def killable_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("killable") / "two_stages.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                    "from test_train_resample import killable_two_stage_config as get_config  # noqa: F401\n")
    return path


@pytest.fixture(scope="module")
def straight_killable(killable_config_file, tmp_path_factory):
    import subprocess

    workdir = tmp_path_factory.mktemp("straight_killable")
    command, env = staged_cli(workdir, killable_config_file)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SWITCH_LINE in done.stdout, done.stdout[-3000:]
    return workdir


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / CHECKPOINTS).iterdir() if p.name.isdigit())


def last_logged_losses(workdir):
    """The last loss logged for each step (a resumed run re-logs the steps it redoes)."""
    from big_contrast.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.parametrize("kill_after", [2, 6], ids=["before_the_boundary", "after_the_boundary"])
def test_sigkill_of_a_staged_run_resumes_with_the_uninterrupted_losses(straight_killable, killable_config_file,
                                                                       tmp_path, kill_after):
    import signal
    import subprocess
    import time

    workdir = tmp_path / "killed"
    command, env = staged_cli(workdir, killable_config_file)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (workdir / CHECKPOINTS / str(kill_after)).is_dir():
        assert proc.poll() is None, f"training exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint to kill after"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    killed_out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    restored = saved_steps(workdir)[-1]  # what the resume starts from (the newest checkpoint)
    assert kill_after <= restored < KILL_TOTAL, (restored, killed_out[-2000:])
    if kill_after > KILL_BOUNDARY:  # killed in stage 1: the killed run had switched and said so
        assert SWITCH_LINE in killed_out, killed_out[-3000:]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # A resume in stage 0 crosses the boundary itself and logs the switch; one in stage 1 does not.
    assert (SWITCH_LINE in resumed.stdout) == (restored < KILL_BOUNDARY), resumed.stdout[-3000:]
    want, got = last_logged_losses(straight_killable), last_logged_losses(workdir)
    assert sorted(want) == sorted(got) == list(range(1, KILL_TOTAL + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    a, b = saved_arrays(straight_killable, KILL_TOTAL)["params"], saved_arrays(workdir, KILL_TOTAL)["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def test_plan_reports_memory_per_stage():
    from big_contrast.train.staged import stage_plans

    plans = stage_plans(two_stage_config(), device_memory_bytes=2**30)
    assert [line.split(":")[0] for line, _ in plans] == ["stage 0 (steps 0..2)", "stage 1 (steps 2..4)"]
    low, full = plans[0][1], plans[1][1]
    assert 0 < low["activation_bytes_per_example"] < full["activation_bytes_per_example"]
