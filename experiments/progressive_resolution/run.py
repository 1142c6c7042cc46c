"""Progressive resolution at a fixed compute budget on the demo data (issue 22).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python experiments/progressive_resolution/run.py --budget_s 60 --seeds 0,1

Three schedules get the same wall time of training steps on this machine:
  full   32 px and 16 text tokens throughout (configs/demo.py);
  clipa  16 px and 8 tokens for 80 % of the budget, then 32 px / full text (config.stages;
         the demo's sin-cos table is recomputed at the boundary);
  flip   patch dropout 0.5 throughout (evaluated unmasked).
Step counts come from a calibration of each setting's step time (median of logged windows).
Prints and writes results.json: zero-shot shape / colour top-1 and recall@1 per schedule and
seed, the per-step speed-up of each low-cost setting, and each schedule's accuracy as a
fraction of the full-resolution run's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "configs")]

import demo  # noqa: E402
from big_contrast.train import train  # noqa: E402
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
    for entry in config.evals.values():
        entry.every_steps = 0  # once, at the end
    return config


def setting(config, name):
    if name == "low":
        config.stages = (dict(until_step=config.total_steps, **LOW),)
    if name == "flip":
        config.model.image.patch_dropout = 0.5
    return config


def step_time(name, steps=40):
    """Median step time of a setting (after compilation), from the logged windows."""
    with tempfile.TemporaryDirectory() as workdir:
        train(setting(base_config(0, steps, evals=False), name), workdir, progress=False)
        times = [r["step_time_s"] for r in read_metrics(workdir) if "step_time_s" in r][1:]
    return statistics.median(times)


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
    parser.add_argument("--budget_s", type=float, default=60.0)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    t = {name: step_time(name) for name in ("full", "low", "flip")}
    print("step time (s):", t, flush=True)
    rows = []
    for name in ("full", "clipa", "flip"):
        for seed in map(int, args.seeds.split(",")):
            config = schedule(name, seed, args.budget_s, t)
            with tempfile.TemporaryDirectory() as workdir:
                result = train(config, workdir, progress=False)
            row = dict(schedule=name, seed=seed, steps=config.total_steps,
                       **{k: result.get(k) for k in KEYS})
            print(json.dumps(row), flush=True)
            rows.append(row)
    mean = {n: {k: statistics.mean(r[k] for r in rows if r["schedule"] == n) for k in KEYS}
            for n in ("full", "clipa", "flip")}
    kept = {n: {k: mean[n][k] / mean["full"][k] if mean["full"][k] else None for k in KEYS} for n in mean}
    out = dict(budget_s=args.budget_s, step_time_s=t,
               speedup_per_step={"low (16 px, 8 tokens)": t["full"] / t["low"], "flip 0.5": t["full"] / t["flip"]},
               rows=rows, mean=mean, fraction_of_full=kept)
    (pathlib.Path(__file__).parent / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
