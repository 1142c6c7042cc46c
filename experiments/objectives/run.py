"""Objectives study: per-device memory and fwd+bwd time of every objective of the general
contrastive engine, ring vs the plain ring vs its dense form.

    python experiments/objectives/run.py                 # the table in README.md (~6 min)
    python experiments/objectives/run.py --batches 4096 --time_max_batch 4096   # a quick look

8 simulated CPU devices (set below, before jax is imported), the batch sharded over them,
teacher embeddings (for cwcl / distill) of the same width. For each global batch B and each
objective it compiles `jax.value_and_grad` w.r.t. (zimg, ztxt, scale, bias) and reads the
per-device temporary memory from XLA's `compiled.memory_analysis()` (compiling allocates
nothing). Ring runs are timed for B <= --time_max_batch, dense ones for B <=
--dense_time_max_batch (one run each after compiling, or with --repeats N the median of N
runs after a warm-up run).
"plain" rows are the two specialised kernels (`softmax_loss`, `sigmoid_loss`); every other
row goes through `combined_loss`. Writes results.json and results.md next to this file.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from big_contrast.losses import combined_loss, sigmoid_loss, softmax_loss  # noqa: E402

HERE = pathlib.Path(__file__).parent
MB = 2**20
OBJECTIVES = ["plain softmax", "plain sigmoid", "softmax", "dcl", "hard_negatives", "cwcl", "distill",
              "align_uniform", "sigmoid + 0.5 * distill"]


def loss_fn(objective, impl, mesh, block):
    if objective == "plain softmax":
        return lambda x, y, u, v, s, b: softmax_loss(x, y, s, impl=impl, mesh=mesh, block=block)
    if objective == "plain sigmoid":
        return lambda x, y, u, v, s, b: sigmoid_loss(x, y, s, b, impl=impl, mesh=mesh, block=block)
    return lambda x, y, u, v, s, b: combined_loss(objective, x, y, s, b, teacher=(u, v), impl=impl,
                                                  mesh=mesh, block=block)


def compile_value_and_grad(objective, impl, mesh, batch, dim, block):
    rows = NamedSharding(mesh, P("data", None))
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    fn = jax.value_and_grad(loss_fn(objective, impl, mesh, block), argnums=(0, 1, 4, 5))
    return jax.jit(fn).lower(emb, emb, emb, emb, scalar, scalar).compile()


def random_inputs(mesh, batch, dim, seed=0):
    rows = NamedSharding(mesh, P("data", None))

    def unit(key):
        z = jax.random.normal(key, (batch, dim), jnp.float32)
        return z / jnp.linalg.norm(z, axis=1, keepdims=True)

    return [jax.jit(unit, out_shardings=rows)(k) for k in jax.random.split(jax.random.key(seed), 4)]


def seconds(fn, args, repeats):
    """One run (repeats=1, the compile excluded), or the median of `repeats` after a warm-up."""
    if repeats > 1:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def host_memory_bytes():
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def measure(objective, impl, mesh, batch, dim, block, inputs, timed, repeats=1):
    compiled = compile_value_and_grad(objective, impl, mesh, batch, dim, block)
    row = dict(batch=batch, objective=objective, impl=impl, dim=dim, devices=mesh.size,
               temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    if timed:
        row["seconds"] = seconds(compiled, inputs + [jnp.float32(10.0), jnp.float32(-10.0)], repeats)
        row["repeats"] = repeats
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 65536])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block", type=int, default=None, help="ring tile size (default: the engine's)")
    parser.add_argument("--time_max_batch", type=int, default=8192)
    parser.add_argument("--dense_time_max_batch", type=int, default=4096)
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--impls", nargs="+", default=["ring", "dense"], choices=["ring", "dense"],
                        help="ring only: skip compiling the dense forms (their memory is in the main table)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per row: 1 = one run after compiling; more = their median after a warm-up")
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 (one timed run) or more (their median after a warm-up)")

    mesh = Mesh(np.array(jax.devices()), ("data",))
    print(f"jax {jax.__version__}, {mesh.size} {jax.devices()[0].platform} devices, D = {args.dim}", flush=True)
    results = []
    for batch in args.batches:
        inputs = random_inputs(mesh, batch, args.dim) if batch <= args.time_max_batch else None
        for objective in args.objectives:
            impls = [i for i in args.impls if i == "ring" or not objective.startswith("plain")]
            for impl in impls:
                timed = batch <= (args.time_max_batch if impl == "ring" else args.dense_time_max_batch)
                results.append(measure(objective, impl, mesh, batch, args.dim, args.block, inputs, timed,
                                       args.repeats))
                # so far, row by row: a 65k ring step takes minutes here, a cut-short run keeps its rows
                (args.out / "results.json").write_text(json.dumps(dict(rows=results), indent=1) + "\n")
        del inputs
    summary = dense_limit(results, host_memory_bytes())
    (args.out / "results.json").write_text(json.dumps(dict(rows=results, dense_limit=summary), indent=1) + "\n")
    (args.out / "results.md").write_text(markdown_table(results, summary))
    print(markdown_table(results, summary))


def dense_limit(results, host_bytes):
    """For each objective's dense form, the largest B whose temporaries (all 8 devices share
    this host's memory) fit it, from the quadratic growth of the largest measured B."""
    out = {}
    for r in results:
        if r["impl"] == "dense":
            per_pair = 8 * r["temp_bytes"] / r["batch"] ** 2
            out[r["objective"]] = dict(bytes_per_pair=per_pair, max_batch=int((host_bytes / per_pair) ** 0.5),
                                       host_gib=host_bytes / 2**30)
    return out


def markdown_table(results, summary):
    plain = {(r["batch"], r["objective"]): r for r in results if r["objective"].startswith("plain")}
    lines = ["| B | objective | impl | temp MB / device | vs plain softmax ring | fwd+bwd s | vs plain softmax ring |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        ref = plain.get((r["batch"], "plain softmax"))
        mem_ratio = f"{r['temp_bytes'] / ref['temp_bytes']:.2f}x" if ref else ""
        time_s = f"{r['seconds']:.2f}" if "seconds" in r else "–"
        time_ratio = f"{r['seconds'] / ref['seconds']:.2f}x" if ref and "seconds" in r and "seconds" in ref else ""
        lines.append(f"| {r['batch']:,} | {r['objective']} | {r['impl']} | {r['temp_bytes'] / MB:,.1f} | "
                     f"{mem_ratio} | {time_s} | {time_ratio} |")
    if summary:  # no dense rows (--impls ring): no dense-limit table
        lines += ["", "| objective | dense bytes per B² (8 devices) | largest dense B in this host's "
                  f"{next(iter(summary.values()))['host_gib']:.0f} GiB |", "|---|---:|---:|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['bytes_per_pair']:.1f} | {s['max_batch']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
