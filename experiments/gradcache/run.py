"""Micro-batch gradient caching: time per example and memory with k micro-batches vs one pass.

    python experiments/gradcache/run.py                   # the table in README.md
    python experiments/gradcache/run.py --batch 128 --ks 1 4

Builds the trainer's real step (towers -> ring loss -> grads -> AdamW) for the demo data with
ViT-S/8 and text-S towers cut to 4 layers on 8 simulated CPU devices, and for each number of
micro-batches k (k = 1 is the plain one-pass step) reports the per-device temporary memory of
the compiled step (XLA `memory_analysis`) and the median step time over --repeats steps after
a warm-up, as time per example and as a ratio to k = 1. Gradient caching runs the towers'
forward twice and their backward once, so the ideal ratio is about (2 + 2) / (1 + 2) = 1.33.
Writes results.json and results.md next to this file.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "configs"))

import demo  # noqa: E402

from big_contrast import sharding  # noqa: E402
from big_contrast.data import make_pipeline  # noqa: E402
from big_contrast.train import build  # noqa: E402
from big_contrast.train.loop import make_step_fn  # noqa: E402

HERE = pathlib.Path(__file__).parent


def config_for(batch, loss):
    config = demo.get_config(f"{loss},noeval")
    config.batch_size = batch
    # ViT-S width (384) at 4 layers: a real matmul load per example, compiled in seconds.
    config.model.image.update(variant="S/8", image_size=64, pool="gap", depth=4)
    config.data.pp_train = "decode|resize(64)|value_range(-1, 1)"  # the demo's own pp is 32 px
    config.model.text.update(variant="S", max_len=16, depth=4)
    config.model.embed_dim = 256
    config.optimizer.update(warmup_steps=0, schedule="constant")
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--loss", default="sigmoid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args()

    config = config_for(args.batch, args.loss)
    run = build(config)
    per_device = args.batch // sharding.num_batch_shards(run.mesh)
    batch_sharding = sharding.batch_sharding(run.mesh)
    with make_pipeline(config.data, batch_sharding, train=True, global_batch_size=args.batch) as data:
        batch = {k: v for k, v in next(data).items() if k in ("image", "text")}
    rows = []
    for k in args.ks:
        cfg = config.copy_and_resolve_references()
        cfg.microbatch_size = None if k == 1 else per_device // k
        step_fn = make_step_fn(type(run)(**{**run.__dict__, "config": cfg, "jitted": {}}), batch_sharding)
        state = jax.tree.map(jnp.copy, run.state)
        compiled = step_fn.lower(state, batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        state, _ = compiled(state, batch)  # warm-up
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        row = dict(k=k, microbatch_per_device=per_device // k, batch=args.batch, loss=args.loss,
                   step_s=seconds, us_per_example=seconds / args.batch * 1e6, temp_bytes=temp)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_s"] / base["step_s"]
        row["memory_ratio"] = row["temp_bytes"] / base["temp_bytes"]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| k micro-batches | rows / device / micro-batch | step s | µs / example | time vs k=1 | temp MB / device | memory vs k=1 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['k']} | {r['microbatch_per_device']} | {r['step_s']:.3f} | {r['us_per_example']:.0f} | "
                     f"{r['time_ratio']:.2f}x | {r['temp_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f}x |")
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
