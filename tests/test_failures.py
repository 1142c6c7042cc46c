"""What `big-contrast train | eval` do when things are wrong: a damaged checkpoint, a changed
config, a failed save. Each prints a short sentence (no traceback without --debug), exits
with status 2 where it cannot go on, and loses nothing.

The runs go through `cli.main` in this process (one compile of the demo step, shared); one
test starts the CLI in a subprocess for the real exit status and stderr at interpreter exit."""

import json
import os
import re
import pathlib
import resource
import shutil
import subprocess
import sys

import pytest

from big_contrast import cli
from big_contrast.checkpoint import Checkpointer
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL_EVALS = [f"--config.evals.{name}.data.sources.demo.size=48" for name in ("shape", "colour", "retrieval")]


def train_argv(workdir, *overrides):
    return ["big-contrast", "train", "--config", str(REPO / "configs/demo.py:sigmoid"), "--workdir", str(workdir),
            "--noplot", "--config.batch_size=32", "--config.log_every=1", "--config.data.sources.demo.size=500",
            "--config.total_steps=4", "--config.checkpoint_every=2", *SMALL_EVALS, *overrides]


def run_cli(argv, capfd):
    code = cli.main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def messages(err):
    """stderr's lines without the progress bar (which redraws itself with carriage returns)."""
    return [line for line in err.replace("\r", "\n").split("\n") if line.strip() and "%|" not in line]


def losses(workdir):
    """The last logged loss of every step (a resumed run re-logs the steps it redoes)."""
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def snapshot(workdir):
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(workdir).rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 4 steps with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    assert cli.main(train_argv(workdir)) == 0
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    return workdir


def copy_of(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def truncate_arrays(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # tensorstore's array data files
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_largest_files(step_dir):
    """What a crash mid-write on a full disk leaves: the biggest files cut to 100 bytes."""
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for path in files[-3:]:
        path.write_bytes(path.read_bytes()[:100])


def delete_meta(step_dir):
    shutil.rmtree(step_dir / "meta")


def garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{\x00garbage")


def bad_data_state(step_dir):
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["data"] = {"grain": "not a state"}
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [truncate_arrays, delete_meta, garbage_meta, bad_data_state])
def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous_one(
        trained, tmp_path, capfd, damage):
    workdir = copy_of(trained, tmp_path)
    damage(workdir / CHECKPOINTS / "4")
    damaged = snapshot(workdir / CHECKPOINTS / "4")
    code, out, err = run_cli(train_argv(workdir), capfd)
    assert code == 0, err
    assert len(messages(err)) == 1, err
    warning = messages(err)[0]
    assert warning.startswith("Warning: The checkpoint of step 4") and "trying step 2" in warning, err
    assert "Traceback" not in err + out
    # Resumed from step 2: steps 3 and 4 logged again, with the losses of the uninterrupted run.
    assert losses(workdir) == pytest.approx(losses(trained), rel=1e-5)
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r][-2:] == [3, 4]
    # The damaged checkpoint is left as it was, for inspection.
    assert snapshot(workdir / CHECKPOINTS / "4") == damaged
    assert "not saving step 4" in out


def test_largest_files_cut_to_100_bytes_fall_back_with_one_warning_line(trained, tmp_path):
    """In a subprocess (pytest takes over the hook that reports what the garbage collector
    finds): the reads the failed restore abandoned must not reach stderr."""
    workdir = copy_of(trained, tmp_path)
    truncate_largest_files(workdir / CHECKPOINTS / "4")
    result = subprocess.run([sys.executable, "-m", "big_contrast.cli", *train_argv(workdir)[1:]],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("Warning: The checkpoint of step 4") and "trying step 2" in lines[0], lines[0]
    assert "is not valid for value of size 100" in lines[0], lines[0]  # tensorstore's cause, not orbax's wrapper
    assert losses(workdir) == pytest.approx(losses(trained), rel=1e-5)
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r][-2:] == [3, 4]


@pytest.mark.parametrize("override,key", [
    ("--config.model.embed_dim=48", "model.embed_dim: 64 in the workdir, 48 now"),
    ("--config.model.image.variant=mu/16", 'model.image.variant: "mu/8" in the workdir, "mu/16" now'),
    ("--config.optimizer.name=sgd", 'optimizer.name: "adamw" in the workdir, "sgd" now'),
])
def test_resuming_with_a_changed_model_or_optimizer_names_the_key_and_changes_nothing(
        trained, capfd, override, key):
    before = snapshot(trained)
    code, out, err = run_cli(train_argv(trained, override), capfd)
    assert code == 2
    assert len(messages(err)) == 1 and key in err and "new --workdir" in err, err
    assert "Traceback" not in err + out
    assert snapshot(trained) == before


def test_without_a_recorded_config_the_stored_shapes_are_checked_before_restoring(trained, tmp_path, capfd):
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").unlink()  # a workdir from before configs were recorded
    before = snapshot(workdir)
    code, out, err = run_cli(train_argv(workdir, "--config.model.embed_dim=48"), capfd)
    assert code == 2 and len(messages(err)) == 1 and "Traceback" not in err + out, err
    assert re.search(r"step 4 .* another model or optimizer config: params/\S+ has shape \([\d, ]*64,?\) there "
                     r"and \([\d, ]*48,?\) in this config", err), err
    assert snapshot(workdir) == before


def test_structural_keys_are_those_that_change_the_train_state():
    from big_contrast.workdir import is_structural

    assert is_structural("model.text.max_len", 16, 32)
    assert is_structural("optimizer.name", "adamw", "sgd")
    assert is_structural("optimizer.grad_clip_norm", 1.0, 0.0)  # clipping's state appears / goes
    assert not is_structural("optimizer.grad_clip_norm", 1.0, 0.5)
    for key in ("optimizer.lr", "optimizer.warmup_steps", "total_steps", "log_every", "evals.shape.every_steps",
                "mesh", "batch_size", "data.sources.demo.size"):
        assert not is_structural(key, 1, 2), key


def test_safe_config_changes_are_listed_and_debug_shows_the_traceback(trained, tmp_path, capfd):
    workdir = copy_of(trained, tmp_path)
    recorded = json.loads((workdir / "config.json").read_text())["evals"]["shape"]["every_steps"]
    code, out, err = run_cli(train_argv(workdir, "--config.log_every=2", "--config.evals.shape.every_steps=100"), capfd)
    assert code == 0, err
    assert (f"Resuming with config changes: evals.shape.every_steps: {recorded} in the workdir, 100 now; "
            "log_every: 1 in the workdir, 2 now.") in out
    assert json.loads((workdir / "config.json").read_text())["log_every"] == 2
    code, _, err = run_cli(train_argv(workdir, "--config.model.embed_dim=48", "--debug"), capfd)
    assert code == 2 and "Traceback" in err and "ConfigMismatch" in err


def test_eval_without_config_uses_the_config_recorded_in_the_workdir(trained, capfd):
    code, out, err = run_cli(["big-contrast", "eval", "--workdir", str(trained)], capfd)
    assert code == 0, err
    assert out.startswith("step 4\n") and re.search(r"^shape +top1 ", out, re.M), out


def test_a_failed_save_stops_with_a_sentence_and_keeps_the_previous_checkpoint(trained, tmp_path):
    """In a subprocess whose files may not exceed 48 KiB (as a quota would have it): metrics and
    config fit, the checkpoint's array files do not. Nothing of orbax's background threads'
    tracebacks reaches stderr."""
    workdir = copy_of(trained, tmp_path)
    shutil.rmtree(workdir / CHECKPOINTS / "4")  # resume from step 2; the save at step 4 fails

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    # The persistent compilation cache is read but not written: its entries would hit the same
    # limit (and warn) whenever the cache is cold, as on a fresh clone.
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9")
    result = subprocess.run([sys.executable, "-m", "big_contrast.cli", *train_argv(workdir)[1:]],
                            capture_output=True, text=True, preexec_fn=limit_file_size, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert lines[0].startswith(f"big-contrast train: Saving the checkpoint of step 4 in {workdir / CHECKPOINTS} "
                               "failed (") and "File too large" in lines[0], lines[0]
    assert "the checkpoint of step 2 is intact" in lines[0]
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    assert ckpt.all_steps() == [2]
    _, step = ckpt.restore_arrays()
    ckpt.close()
    assert step == 2


def test_no_readable_checkpoint_exits_2_with_short_stderr(trained, tmp_path):
    """In a subprocess: the exit status and everything printed up to interpreter exit."""
    workdir = copy_of(trained, tmp_path)
    for step in ("2", "4"):
        truncate_arrays(workdir / CHECKPOINTS / step)
    result = subprocess.run([sys.executable, "-m", "big_contrast.cli", *train_argv(workdir)[1:]],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert len(lines) == 3, result.stderr[-3000:]  # a warning per step, then the sentence
    assert "step 4" in lines[0] and "step 2" in lines[1]
    assert lines[2].startswith("big-contrast train: No checkpoint in ") and "can be restored" in lines[2]
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "--config", "nope.py", "--workdir", "W"], "--config: [Errno 2] No such file or directory: 'nope.py'"),
    (["train", "--config", str(REPO / "configs/demo.py:sofmax"), "--workdir", "W"], "Unknown config argument 'sofmax'"),
    (["train", "--config", str(REPO / "configs/demo.py"), "--workdir", "W", "--bogus"], "Unknown command line flag 'bogus'"),
    (["train", "--config", str(REPO / "configs/demo.py")], "--workdir is required"),
    (["eval", "--workdir", "W"], "--config is required: W/config.json does not exist"),
    (["train", "--config", str(REPO / "configs/demo.py"), "--workdir", "W", "--config.batch_size=36"],
     "config.batch_size=36 does not divide over the 8 data-parallel devices"),
])
def test_command_line_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capfd, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["big-contrast", *args], capfd)
    assert code == 2 and len(messages(err)) == 1 and message in err and "Traceback" not in err + out, err


def run_cli_raising(tmp_path, raising):
    """`big-contrast train` in a subprocess whose `train` runs `raising` (source lines) instead:
    the real exit status and stderr, without a compile."""
    script = (
        "import sys\n"
        "import big_contrast.train as train\n"
        "def fake(config, workdir):\n"
        + "".join(f"    {line}\n" for line in raising) +
        "train.train = fake\n"
        "from big_contrast import cli\n"
        "sys.exit(cli.main(sys.argv))\n")
    argv = ["big-contrast", "train", "--config", str(REPO / "configs/demo.py"), "--workdir", str(tmp_path / "w")]
    return subprocess.run([sys.executable, "-c", script, *argv[1:]], capture_output=True, text=True, cwd=tmp_path)


def test_an_internal_bug_shows_its_traceback_and_is_not_reported_as_a_user_error(tmp_path):
    result = run_cli_raising(tmp_path, ["raise ValueError('an invariant of the package broke')"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: an invariant of the package broke" in result.stderr
    assert "big-contrast train:" not in result.stderr  # not the one-line report of a user error


def test_too_many_skipped_records_exit_2_with_one_sentence(tmp_path):
    result = run_cli_raising(tmp_path, [
        "from big_contrast.data.errors import SKIP_REASONS, SkipCounter",
        "skipped = [[5] + [0] * (len(SKIP_REASONS) - 1)]",
        "SkipCounter(['web'], max_skip_fraction=0.1, min_seen=1).add([10], skipped)"])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("big-contrast train: data source 'web' skipped 5 of 10 records"), lines[0]
    assert "raise data.max_skip_fraction" in lines[0]
