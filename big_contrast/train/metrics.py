"""Where training metrics go: workdir/metrics.jsonl, TensorBoard event files, a progress bar.

Only process 0 writes; every other process gets a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax


class MetricWriter:
    def __init__(self, workdir, *, total_steps: int, initial_step: int = 0, enabled: bool | None = None,
                 progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
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


def read_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
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
        self.directory, self.active = pathlib.Path(directory), False
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
