"""Two processes x 4 simulated CPU devices (gloo on 127.0.0.1) against one process x 8 devices:
same losses, same eval metrics, checkpoints that restore across the two layouts, and a bounded
failure when the coordinator cannot be reached."""

import os
import pathlib
import subprocess
import sys

import pytest

from big_contrast.train.metrics import read_metrics
from conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["--config.batch_size=32", "--config.log_every=1", "--config.checkpoint_every=2",
            "--config.data.sources.demo.size=500", "--config.evals.shape.every_steps=2",
            "--config.evals.shape.data.sources.demo.size=96", "--config.evals.shape.batch_size=32", "--noplot"]


def env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def command(workdir, total_steps, *extra):
    # Only the 'shape' zero-shot evaluator: retrieval and colour would only add time here.
    return [sys.executable, "-m", "big_contrast.cli", "train", "--config", str(REPO / "configs/demo.py"),
            "--workdir", str(workdir), f"--config.total_steps={total_steps}", *SETTINGS,
            "--config.evals.colour.every_steps=1000", "--config.evals.retrieval.every_steps=1000", *extra]


def train_one_process(workdir, total_steps):
    result = subprocess.run(command(workdir, total_steps), env=env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def train_two_processes(workdir, total_steps):
    port = free_port()
    procs = [subprocess.Popen(command(workdir, total_steps, f"--coordinator=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}"),
                              env=env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def logged(workdir):
    """{step: row} with the last row written for each step (a resumed run re-logs nothing here)."""
    rows = {}
    for row in read_metrics(workdir):
        rows.setdefault(row["step"], {}).update(row)
    return rows


def assert_same_steps(a, b, steps):
    for step in steps:
        for key in ("loss", "grad_norm", "shape/top1"):
            if key in a[step] or key in b[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_cross_layouts(tmp_path):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    train_one_process(one, 2)
    train_two_processes(two, 2)
    assert_same_steps(logged(one), logged(two), [1, 2])
    assert "shape/top1" in logged(two)[2]
    # Cross-restore: each layout continues from the other's step-2 checkpoint.
    train_two_processes(one, 4)   # written by 1 process, restored by 2
    train_one_process(two, 4)     # written by 2 processes, restored by 1
    assert_same_steps(logged(one), logged(two), [3, 4])


def test_unreachable_coordinator_fails_fast_with_a_sentence(tmp_path):
    """The 5 s --distributed_timeout must fire: the sentence names it (the subprocess timeout
    only stops a hang, it measures nothing)."""
    port = free_port()
    result = subprocess.run(
        command(tmp_path, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
                "--distributed_timeout=5"),
        env=env(4), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"could not join the distributed run: nothing answered at the coordinator 127.0.0.1:{port} for 5 s" \
        in result.stderr, result.stderr[-3000:]


def test_xla_flag_defaults_add_the_gpu_scheduler_unless_set_or_cpu_only():
    from big_contrast.distributed import set_xla_flag_defaults

    on = "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert set_xla_flag_defaults({"XLA_FLAGS": "--a=1"}) == f"--a=1 {on}"
    assert set_xla_flag_defaults({"JAX_PLATFORMS": "cuda"}) == on
    off = "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert set_xla_flag_defaults({"XLA_FLAGS": off}) == off  # the user's setting wins
    assert set_xla_flag_defaults({"XLA_FLAGS": "--a=1", "JAX_PLATFORMS": "cpu"}) == "--a=1"
