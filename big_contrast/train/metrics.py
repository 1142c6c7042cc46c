"""Where training metrics go: the workdir's metrics.jsonl, TensorBoard event files, a progress bar.

Only process 0 writes; every other process gets a writer that drops everything.

In a local workdir `metrics.jsonl` is appended to line by line. An object store cannot append
(gcsfs's append mode silently overwrites), so for a bucket workdir the lines are kept
in memory, starting with those of the earlier runs, and the whole object is rewritten on `flush`:
when a line is written `REMOTE_FLUSH_S` seconds or more after the last upload, before each checkpoint and at
close. A run killed after a checkpoint has every line up to it; it redoes and relogs the rest.
TensorBoard event files of a remote workdir are written to a local temporary folder and uploaded
whole at the same moments (what tensorboardX's own gs:// writer does too, but through `paths`, so
the emulator works, and without its re-upload, and 120 s retry loop, at garbage collection).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import jax

from big_contrast import paths
from big_contrast.workdir import Workdir

REMOTE_FLUSH_S = 30.0


class MetricWriter:
    def __init__(self, workdir, *, total_steps: int, initial_step: int = 0, enabled: bool | None = None,
                 progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        workdir = Workdir.of(workdir)
        self._jsonl = _JsonLines(workdir.metrics)
        self._tb = _TensorBoard(os.fspath(workdir.tensorboard))
        self._remote, self._flushed_at = workdir.remote, time.monotonic()
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        """One JSON line {"step": ..., **metrics}; scalars also to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        for key, value in clean.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        if self._bar is not None and "loss" in clean:
            self._bar.set_postfix(loss=f"{clean['loss']:.4f}", refresh=False)
        if self._remote and time.monotonic() - self._flushed_at >= REMOTE_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Everything written so far is in the workdir (called before each checkpoint)."""
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()
            self._flushed_at = time.monotonic()

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _plain(value):
    """Python scalars for JSON: jax/numpy scalars become float/int."""
    if hasattr(value, "item"):
        value = value.item()
    return value


class _JsonLines:
    """`metrics.jsonl`: appended to when local, rewritten whole from memory when remote."""

    def __init__(self, path):
        self.path, self.remote = path, paths.is_remote(path)
        if not self.remote:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)
            return
        self._lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
        self._dirty = False

    def write(self, line: str) -> None:
        if not self.remote:
            self._file.write(line)
            return
        self._lines.append(line)
        self._dirty = True

    def flush(self) -> None:
        if not self.remote:
            self._file.flush()
        elif self._dirty:
            paths.write_bytes(self.path, "".join(self._lines).encode())
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._file.close()


class _TensorBoard:
    """A tensorboardX `SummaryWriter` on `folder`; for a remote folder, on a local temporary one
    whose event files are uploaded whole on `flush` and `close`."""

    def __init__(self, folder: str):
        from tensorboardX import SummaryWriter

        self.remote = folder if paths.is_remote(folder) else None
        self._local = tempfile.mkdtemp(prefix="big_contrast-tensorboard-") if self.remote else folder
        self._writer = SummaryWriter(self._local)

    def add_scalar(self, key, value, step) -> None:
        self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        self._writer.close()
        try:
            self._upload()
        finally:
            if self.remote:
                shutil.rmtree(self._local, ignore_errors=True)

    def _upload(self) -> None:
        for name in sorted(os.listdir(self._local)) if self.remote else ():
            with open(os.path.join(self._local, name), "rb") as f:
                paths.write_bytes(paths.join(self.remote, name), f.read())


def read_metrics(workdir) -> list[dict]:
    path = Workdir.of(workdir).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Throughput:
    """Examples per second, step time and model FLOPs utilisation over a window of steps
    (the steps since the last `report`)."""

    def __init__(self, batch_size: int, peak_flops_per_device: float | None = None):
        self.batch_size, self.peak_flops_per_device = batch_size, peak_flops_per_device
        self.flops_per_step: float | None = None  # per device, from the compiled step
        self._start, self._steps = time.perf_counter(), 0

    def step(self) -> None:
        self._steps += 1

    def report(self) -> dict:
        """The window's figures; starts the next window."""
        elapsed, steps = time.perf_counter() - self._start, max(self._steps, 1)
        out = {"examples_per_s": steps * self.batch_size / elapsed, "step_time_s": elapsed / steps}
        if self.flops_per_step and self.peak_flops_per_device:
            # cost_analysis counts the per-device program; every device runs one.
            out["mfu"] = self.flops_per_step / out["step_time_s"] / self.peak_flops_per_device
        self._start, self._steps = time.perf_counter(), 0
        return out


class StepProfile:
    """A `jax.profiler` trace of steps N..M (`config.profile_steps = (N, M)`, inclusive, step k
    being the one that makes the state's step k) written under `directory`, as big_vision does;
    open it with TensorBoard's profile plugin or Perfetto (`*.trace.json.gz`). Process 0 only.
    The trace ends once step M's outputs are ready, so it holds the devices' work, not just its
    dispatch."""

    def __init__(self, steps, directory):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (None, None)
        self.directory, self.active = paths.parse(directory), False
        if steps and jax.process_index() != 0:
            self.first = None

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched."""
        if self.first is not None and not self.active and self.first <= step <= self.last:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called after step `step` is dispatched, with its outputs."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()
            self.first = None  # one trace per run

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
