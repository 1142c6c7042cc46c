"""Progressive resolution at a fixed compute budget on the demo data (issue 22).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python experiments/progressive_resolution/run.py --budget_s 60 --seeds 0,1

Three schedules get the same compute budget of training steps:
  full   32 px and 16 text tokens throughout (configs/demo.py);
  clipa  16 px and 8 tokens for 80 % of the budget, then 32 px / full text (config.stages;
         the demo's sin-cos table is recomputed at the boundary);
  flip   patch dropout 0.5 throughout (evaluated unmasked).
Step counts come from a calibration of each setting's CPU time per step: a short run whose
logged step times are the process's CPU seconds per step (``CpuThroughput`` stands in for the
loop's wall-clock ``Throughput``; the first window, which holds the compilation, is dropped).
CPU time, not wall time, because this machine is shared: a contended wall clock measures the
neighbours, the CPU seconds the process spent measure the step. Prints and writes results.json (or --out):
zero-shot shape / colour top-1 and recall@1 per schedule and seed, the per-step speed-up of each
low-cost setting, and each schedule's accuracy as a fraction of the full-resolution run's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "configs")]

import demo  # noqa: E402
from big_contrast.train import train  # noqa: E402
from big_contrast.train import loop, metrics  # noqa: E402
from big_contrast.train.metrics import read_metrics  # noqa: E402

LOW = dict(image_size=16, max_len=8, pp_train="decode|random_resized_crop(16, scale=(0.6, 1.0), "
           "ratio=(0.9, 1.1))|value_range(-1, 1)")
KEYS = ("shape/top1", "colour/top1", "retrieval/i2t_recall@1", "retrieval/t2i_recall@1")


def base_config(seed, total_steps, evals=True):
    config = demo.get_config("softmax" if evals else "softmax,noeval")
    config.seed = config.data.seed = seed
    config.total_steps = total_steps
    config.log_every = 10
    config.checkpoint_every = 10 ** 9
    if evals:
        del config.evals["heldout"]  # not in the table: one evaluator less per run
    for entry in config.evals.values():
        entry.every_steps = 0  # once, at the end
    return config


def setting(config, name):
    if name == "low":
        config.stages = (dict(until_step=config.total_steps, **LOW),)
    if name == "flip":
        config.model.image.patch_dropout = 0.5
    return config


class CpuThroughput(metrics.Throughput):
    """The loop's throughput window timed in process CPU seconds instead of wall seconds."""

    def __init__(self, batch_size, peak_flops_per_device=None):
        super().__init__(batch_size, None)  # no MFU: it needs wall time
        self._start = time.process_time()

    def report(self) -> dict:
        elapsed, steps = time.process_time() - self._start, max(self._steps, 1)
        self._start, self._steps = time.process_time(), 0
        return {"examples_per_s": steps * self.batch_size / elapsed, "step_time_s": elapsed / steps}


loop.Throughput = CpuThroughput


def _train_timed(config):
    """Trains in a fresh workdir: (result, process CPU seconds, median CPU step time after the
    first logged window)."""
    with tempfile.TemporaryDirectory() as workdir:
        start = time.process_time()
        result = train(config, workdir, progress=False)
        cpu_s = time.process_time() - start
        times = [r["step_time_s"] for r in read_metrics(workdir) if "step_time_s" in r][1:]
    return result, cpu_s, statistics.median(times) if times else None


def step_time(name, steps):
    """CPU seconds per step of a setting (median of its logged windows after the first)."""
    return _train_timed(setting(base_config(0, steps, evals=False), name))[2]


def schedule(name, seed, budget_s, t):
    if name == "full":
        return base_config(seed, int(budget_s / t["full"]))
    if name == "flip":
        return setting(base_config(seed, int(budget_s / t["flip"])), "flip")
    low_steps, high_steps = int(0.8 * budget_s / t["low"]), int(0.2 * budget_s / t["full"])
    config = base_config(seed, low_steps + high_steps)
    config.stages = (dict(until_step=low_steps, **LOW), dict(until_step=low_steps + high_steps))
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget_s", type=float, default=60.0, help="CPU seconds of steps per run")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--calibration_steps", type=int, default=40)
    parser.add_argument("--step_cpu_s", default=None,
                        help="skip the calibration: full=S,low=S,flip=S CPU seconds per step")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    if args.step_cpu_s:  # e.g. the in-run medians of an earlier run: "full=0.135,low=0.083,flip=0.077"
        t = {k: float(v) for k, v in (item.split("=") for item in args.step_cpu_s.split(","))}
    else:
        t = {name: step_time(name, args.calibration_steps) for name in ("full", "low", "flip")}
    print("CPU s per step:", t, flush=True)
    rows = []
    for name in ("full", "clipa", "flip"):
        for seed in map(int, args.seeds.split(",")):
            config = schedule(name, seed, args.budget_s, t)
            result, cpu_s, step_cpu_s = _train_timed(config)
            row = dict(schedule=name, seed=seed, steps=config.total_steps, cpu_s_with_compile_and_eval=cpu_s,
                       median_cpu_s_per_step=step_cpu_s,
                       **{k: result.get(k) for k in KEYS})
            print(json.dumps(row), flush=True)
            rows.append(row)
    mean = {n: {k: statistics.mean(r[k] for r in rows if r["schedule"] == n) for k in KEYS}
            for n in ("full", "clipa", "flip")}
    kept = {n: {k: mean[n][k] / mean["full"][k] if mean["full"][k] else None for k in KEYS} for n in mean}
    out = dict(budget_cpu_s=args.budget_s, cpu_s_per_step=t,
               speedup_per_step={"low (16 px, 8 tokens)": t["full"] / t["low"], "flip 0.5": t["full"] / t["flip"]},
               rows=rows, mean=mean, fraction_of_full=kept)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()
