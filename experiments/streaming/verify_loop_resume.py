"""Trains on streamed shards through the CLI and resumes on another process count, on the
repository as it is (the loop gathers the streaming state over processes at a checkpoint,
`Prefetcher.checkpoint_state`, and restores it on any process count, `_resumed_pipeline`).

    PYTHONPATH=. .venv/bin/python experiments/streaming/verify_loop_resume.py   # ~14 min on 2 cores at load 5-13

Runs, each `big-contrast train` on 8 local tar shards (kind='stream', 4 virtual streams, batch 32,
checkpoints every 2 steps): 1 process x 8 devices for 4 steps; 1 process for 2 steps, then 2
processes x 4 devices resume to 4; 2 processes for 2 steps, then 1 process resumes to 4.
Prints each run's logged losses: equal losses mean the same batches on every layout.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = '''import importlib.util, os
import ml_collections
_spec = importlib.util.spec_from_file_location("demo_config", os.environ["DEMO_CONFIG"])
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

def get_config(arg=None):
    config = demo.get_config(arg)
    config.data.sources = ml_collections.ConfigDict({"web": {"kind": "stream", "path": os.environ["STREAM_SHARDS"]}})
    config.data.streaming.num_streams, config.data.streaming.shuffle_buffer = 4, 16
    config.evals = {}
    return config
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    root = pathlib.Path(tempfile.mkdtemp(prefix="stream-loop-"))
    config = root / "stream_demo.py"
    config.write_text(CONFIG)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_data_streaming import write_shards

    from big_contrast.train.metrics import read_metrics

    shards = root / "shards"
    write_shards(str(shards), 8, 24, no_caption=(5,))

    def command(workdir, steps, *extra):
        return [sys.executable, "-m", "big_contrast.cli", "train", "--config", str(config),
                "--workdir", str(workdir), f"--config.total_steps={steps}", "--config.batch_size=32",
                "--config.log_every=1", "--config.checkpoint_every=2", "--noplot", *extra]

    def run(workdir, steps, processes):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
                   JAX_PLATFORMS="cpu", STREAM_SHARDS=str(shards), PYTHONPATH=str(REPO),
                   DEMO_CONFIG=str(REPO / "configs" / "demo.py"))
        port = free_port()
        extra = lambda i: [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"] \
            if processes > 1 else []
        procs = [subprocess.Popen(command(workdir, steps, *extra(i)), cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(processes)]
        for proc in procs:
            out = proc.communicate(timeout=900)[0]
            if proc.returncode:
                raise RuntimeError(out[-3000:])

    def losses(workdir):
        return {r["step"]: round(r["loss"], 6) for r in read_metrics(workdir) if "loss" in r}

    run(root / "straight", 4, 1)
    print("1 process, 4 steps:          ", losses(root / "straight"), flush=True)
    run(root / "a", 2, 1)
    run(root / "a", 4, 2)
    print("1 process 2 steps -> 2 procs:", losses(root / "a"), flush=True)
    run(root / "b", 2, 2)
    run(root / "b", 4, 1)
    print("2 procs 2 steps -> 1 process:", losses(root / "b"), flush=True)


if __name__ == "__main__":
    main()
