"""The workdir: one place for its layout, its lock and its config record.

A second `train` on a workdir that a live run (a real second process) trains in is refused in
one sentence; once that run is SIGKILLed its lock no longer blocks a resume; the same on a
bucket (the GCS emulator); `eval` of a workdir without a checkpoint creates nothing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from big_contrast import cli, paths, workdir as workdir_module
from big_contrast.checkpoint import Checkpointer
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS, Workdir, WorkdirLocked, is_stale
from test_failures import messages
from test_train import REPO, env, wait_for
from test_train import cli as train_command


def in_process(argv):
    """A subprocess command line of `big-contrast ...` as `cli.main`'s argv."""
    return ["big-contrast", *argv[3:]]


def test_the_layout_is_named_once_and_the_url_parsed_once(tmp_path):
    local = Workdir(tmp_path / "w")
    assert local.checkpoints == tmp_path / "w" / CHECKPOINTS and not local.remote
    assert local.config_record.name == "config.json" and local.metrics.name == "metrics.jsonl"
    assert os.fspath(Workdir("gs://b/run").checkpoints) == "gs://b/run/checkpoints"
    assert Workdir.of(local) is local
    with pytest.raises(paths.StorageError, match="malformed"):
        Workdir("gs:/b/run")
    with pytest.raises(paths.StorageError, match="gs:// only"):
        Workdir("s3://b/run").check_writable()
    assert not local.has_checkpoints() and not (tmp_path / "w").exists()  # asking creates nothing


def test_a_lock_is_stale_when_its_pid_is_dead_here_or_its_heartbeat_is_old():
    now = time.time()
    here = {"host": socket.gethostname(), "machine": workdir_module._machine_id(), "heartbeat": now}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not is_stale({**here, "pid": os.getpid()})
    assert is_stale({**here, "pid": dead.pid})
    elsewhere = {"host": "another-host", "machine": "x", "pid": dead.pid}
    assert not is_stale({**elsewhere, "heartbeat": now - workdir_module.STALE_AFTER_S + 5})
    assert is_stale({**elsewhere, "heartbeat": now - workdir_module.STALE_AFTER_S - 5})
    assert is_stale({}) and is_stale({**here, "pid": os.getpid(), "heartbeat": "garbage"})


@pytest.mark.slow  # a training subprocess end to end (~30 s): keeps make test under 10 min
def test_a_second_train_on_a_live_run_is_refused_and_a_killed_runs_lock_does_not_block_the_resume(
        tmp_path, capfd):
    workdir = tmp_path / "run"
    live = subprocess.Popen(train_command(workdir, "--config.total_steps=100000", "--config.checkpoint_every=2"),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (workdir / CHECKPOINTS / "2").is_dir(), live)
        held = json.loads((workdir / "lock.json").read_text())
        assert held["pid"] == live.pid
        before = sorted(p.name for p in workdir.iterdir())
        code = cli.main(in_process(train_command(workdir, "--config.total_steps=100000")))
        err = capfd.readouterr().err
        assert code == 2 and len(messages(err)) == 1 and "Traceback" not in err, err
        assert f"{workdir} is in use by a live run (host {socket.gethostname()}, pid {live.pid}" in err, err
        assert sorted(p.name for p in workdir.iterdir()) == before
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert (workdir / "lock.json").exists()  # left behind by the killed run
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    saved = max(ckpt.all_steps())
    ckpt.close()
    assert cli.main(in_process(train_command(workdir, f"--config.total_steps={saved + 1}"))) == 0
    capfd.readouterr()
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r][-1] == saved + 1  # resumed, not restarted
    assert not (workdir / "lock.json").exists()  # released at the end


HOLDER = """
import sys, time
from big_contrast.workdir import Workdir
lock = Workdir(sys.argv[1]).lock()
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_on_a_bucket_a_live_lock_refuses_and_a_killed_or_silent_one_is_taken_over(gcs_emulator, capfd):
    url = f"{gcs_emulator}/run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = in_process(train_command(url, "--config.total_steps=2"))
        assert cli.main(argv) == 2
        err = capfd.readouterr().err
        assert len(messages(err)) == 1 and f"{url} is in use by a live run" in err and f"pid {holder.pid}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    workdir = Workdir(url)
    with workdir.lock() as lock:  # the killed holder's pid is gone: taken over at once
        assert json.loads(workdir.lock_file.read_text())["token"] == lock.token
    assert not workdir.lock_file.exists()

    # A run on another machine: live while its heartbeat is fresh, stale once it falls silent.
    other = {"host": "another-host", "machine": "x", "pid": 1, "token": "t"}
    paths.write_bytes(workdir.lock_file, json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(WorkdirLocked, match="host another-host, pid 1"):
        workdir.lock().acquire()
    silent = time.time() - workdir_module.STALE_AFTER_S - 1
    paths.write_bytes(workdir.lock_file, json.dumps({**other, "heartbeat": silent}).encode())
    with workdir.lock() as lock:
        assert json.loads(workdir.lock_file.read_text())["token"] == lock.token


def test_eval_of_a_workdir_without_a_checkpoint_creates_no_checkpoints_folder(tmp_path, capfd):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    code = cli.main(["big-contrast", "eval", "--config", str(REPO / "configs/demo.py"), "--workdir", str(workdir)])
    err = capfd.readouterr().err
    assert code == 2 and "No checkpoint in" in err and "train first" in err, err
    assert list(workdir.iterdir()) == []


def test_a_run_recorded_before_data_streaming_existed_resumes_with_no_change_listed(tmp_path):
    """config.data.streaming (issue 21) came after some runs were recorded: its defaults are what
    those runs used, so they are no change; a value other than the default still is one."""
    import demo

    config = demo.get_config("sigmoid")
    workdir = Workdir(tmp_path)
    workdir.write_config(config)
    record = json.loads(workdir.config_record.read_text())
    del record["data"]["streaming"]
    workdir.config_record.write_text(json.dumps(record))
    assert workdir.check_resumable(config) == []
    config.data.streaming.num_streams = 16
    assert workdir.check_resumable(config) == ['data.streaming.num_streams: "(absent)" in the workdir, 16 now']
