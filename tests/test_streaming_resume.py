"""Streaming (kind='stream') through the CLI: a run SIGKILLed at a random moment after its first
checkpoint and resumed (1 process x 8 devices) logs the losses of an uninterrupted run.

The resume on 2 processes x 4 devices is `experiments/streaming/verify_loop_resume.py` (the
same losses, 1 -> 2 and 2 -> 1 processes), not a test here: a two-process CLI run costs another
~40 CPU-s, and on this machine's 2 shared cores at load 16 its gloo collectives timed out (30 s)
in 2 of 4 tries. The pipeline-level 1 -> 2 / 1 -> 4 / 2 -> 1 restores are in test_data_streaming.py."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS
from conftest import free_port
from test_data_streaming import write_shards

pytestmark = pytest.mark.slow  # `make test-slow` (CI runs it after `make test`)

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
CONFIG = f'''import importlib.util, os
import ml_collections
_spec = importlib.util.spec_from_file_location("demo_config", {str(REPO / "configs" / "demo.py")!r})
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

def get_config(arg=None):
    config = demo.get_config("sigmoid")
    web = {{"kind": "stream", "path": os.environ["STREAM_SHARDS"]}}
    config.data.sources = ml_collections.ConfigDict({{"web": web}})
    config.data.streaming.num_streams, config.data.streaming.shuffle_buffer = 4, 16
    config.evals = {{}}
    return config
'''


def stream_setup(root):
    """Shards (8 x 24 records, one without caption per shard: an epoch is under 6 steps of 32
    rows, so the run crosses an epoch end) and the config file."""
    write_shards(str(root / "shards"), 8, 24, no_caption=(5,))
    (root / "stream_demo.py").write_text(CONFIG)


def run(root, workdir, processes):
    """Starts `big-contrast train` on `processes` processes x 8 / processes devices; each
    process's output goes to a log file next to the workdir (no pipe to fill while waiting)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
               JAX_PLATFORMS="cpu", STREAM_SHARDS=str(root / "shards"))
    port = free_port()
    multihost = lambda i: [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",  # noqa: E731
                           f"--process_id={i}"] if processes > 1 else []
    config = str(root / "stream_demo.py")
    command = lambda i: [sys.executable, "-m", "big_contrast.cli", "train", "--config", config,  # noqa: E731
                         "--workdir", str(workdir), f"--config.total_steps={STEPS}", "--config.batch_size=32",
                         "--config.log_every=1", f"--config.checkpoint_every={EVERY}", "--noplot", *multihost(i)]
    logs = [workdir.parent / f"{workdir.name}-{processes}x-{i}-{time.monotonic_ns()}.log" for i in range(processes)]
    procs = [subprocess.Popen(command(i), env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for i, log in enumerate(logs)]
    return Group(procs, logs)


class Group:
    """The processes of one run, waited on together."""

    def __init__(self, procs, logs):
        self.procs, self.logs = procs, logs

    def output(self, i=0) -> str:
        return self.logs[i].read_text()[-3000:]

    def wait(self, timeout):
        for i, proc in enumerate(self.procs):
            proc.wait(timeout=timeout)
            assert proc.returncode == 0, self.output(i)


def losses(workdir):
    """{step: loss}, the last value logged for each step (a resumed run re-logs what it redoes)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def logged_steps(workdir) -> int:
    try:
        return max(losses(workdir), default=0)
    except ValueError:  # a line being written
        return 0


def kill_at_a_random_moment(root, workdir, rng):
    """Starts a run and SIGKILLs it at a random moment after its first checkpoint (mid-step,
    mid-save or mid-log, wherever it falls); returns what the moment was, for the messages."""
    group = run(root, workdir, processes=1)
    proc, deadline = group.procs[0], time.time() + 300
    target = rng.randint(EVERY, STEPS - 3)  # so that steps are left to redo when it is killed
    while logged_steps(workdir) < target or not (workdir / CHECKPOINTS / str(EVERY)).is_dir():
        assert proc.poll() is None, f"training exited early with {proc.returncode}: {group.output()}"
        assert time.time() < deadline, "timed out waiting for the run to log its steps"
        time.sleep(0.02)
    delay = rng.uniform(0, 0.5)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: draw an earlier moment"
    return f"killed {delay:.2f} s after step {target} was logged"


def assert_resumed_with_the_same_losses(workdir, want, moment):
    """The resume restored a checkpoint (steps up to the first one were logged once, by the
    killed run) and every step's last logged loss is the uninterrupted run's."""
    logged = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert all(logged.count(step) == 1 for step in range(1, EVERY + 1)), (logged, moment)
    got = losses(workdir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), moment
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (step, moment)


def test_sigkill_at_a_random_moment_then_resume_logs_the_losses_of_an_uninterrupted_run(tmp_path):
    # The uninterrupted run goes alongside the one to kill: each is mostly one busy thread.
    stream_setup(tmp_path)
    straight = run(tmp_path, tmp_path / "straight", processes=1)
    killed = tmp_path / "killed"
    moment = kill_at_a_random_moment(tmp_path, killed, random.Random())
    run(tmp_path, killed, processes=1).wait(timeout=600)  # the lock of the dead pid lets it in
    straight.wait(timeout=600)
    assert_resumed_with_the_same_losses(killed, losses(tmp_path / "straight"), moment)
