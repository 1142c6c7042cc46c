"""Loss-engine scaling study: per-device memory and fwd+bwd time of every impl x loss.

    python experiments/loss_scaling/run.py            # the full table in README.md (~15 min)
    python experiments/loss_scaling/run.py --batches 4096 --time_max_batch 4096   # a quick look

Runs on 8 simulated CPU devices (set below, before jax is imported). For each global batch B
and every impl x loss it compiles `jax.value_and_grad` of the loss w.r.t. (zimg, ztxt, scale
[, bias]) with the batch sharded over the 8 devices, and reads the per-device temporary memory
from XLA's `compiled.memory_analysis()` (nothing is allocated to compile). For B up to
--time_max_batch it also times the compiled function on random unit-norm embeddings (median
of --repeats runs after one warm-up) and divides by the time of one B x B x D float32 matmul
with the same sharding (rows over the 8 devices), measured the same way in the same process.
Writes results.json, results.md (the table) and memory.png next to this file.
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
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from big_contrast.losses import IMPLS, sigmoid_loss, softmax_loss  # noqa: E402

HERE = pathlib.Path(__file__).parent
MB = 2**20


def loss_fn(loss, impl, mesh, block):
    if loss == "softmax":
        return lambda x, y, s: softmax_loss(x, y, s, impl=impl, mesh=mesh, block=block)
    return lambda x, y, s, b: sigmoid_loss(x, y, s, b, impl=impl, mesh=mesh, block=block)


def compile_value_and_grad(loss, impl, mesh, batch, dim, block):
    rows = NamedSharding(mesh, P("data", None))
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    args = (emb, emb, scalar) + ((scalar,) if loss == "sigmoid" else ())
    fn = jax.value_and_grad(loss_fn(loss, impl, mesh, block), argnums=tuple(range(len(args))))
    return jax.jit(fn).lower(*args).compile()


def median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_inputs(mesh, batch, dim, seed=0):
    rows = NamedSharding(mesh, P("data", None))

    def unit(key):
        z = jax.random.normal(key, (batch, dim), jnp.float32)
        return z / jnp.linalg.norm(z, axis=1, keepdims=True)

    keys = jax.random.split(jax.random.key(seed))
    return [jax.jit(unit, out_shardings=rows)(k) for k in keys]


def matmul_seconds(mesh, zimg, ztxt, repeats):
    """One B x B x D float32 matmul, rows sharded over the devices like the loss."""
    replicated = jax.device_put(ztxt, NamedSharding(mesh, P()))
    matmul = jax.jit(lambda x, y: x @ y.T, out_shardings=NamedSharding(mesh, P("data", None)))
    return median_seconds(matmul, (zimg, replicated), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=None, help="ring tile size (default: the engine's)")
    parser.add_argument("--time_max_batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args()

    mesh = Mesh(np.array(jax.devices()), ("data",))
    n = mesh.size
    print(f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices, D = {args.dim}", flush=True)
    results = []
    for batch in args.batches:
        b = batch // n
        target = 5 * b * args.dim * 4 + 16 * MB
        timed = batch <= args.time_max_batch
        if timed:
            zimg, ztxt = random_inputs(mesh, batch, args.dim)
            scale, bias = jnp.float32(10.0), jnp.float32(-10.0)
            matmul_s = matmul_seconds(mesh, zimg, ztxt, args.repeats)
            print(f"B={batch}: one matmul {matmul_s * 1e3:.0f} ms", flush=True)
        for loss in ("sigmoid", "softmax"):
            for impl in IMPLS:
                row = dict(batch=batch, loss=loss, impl=impl, dim=args.dim, devices=n)
                compiled = compile_value_and_grad(loss, impl, mesh, batch, args.dim, args.block)
                row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
                row["ring_target_bytes"] = target
                if timed:
                    call_args = (zimg, ztxt, scale) + ((bias,) if loss == "sigmoid" else ())
                    seconds = median_seconds(compiled, call_args, args.repeats)
                    row.update(seconds=seconds, matmul_seconds=matmul_s, ratio=seconds / matmul_s)
                    del compiled
                results.append(row)
                print(json.dumps(row), flush=True)
        if timed:
            del zimg, ztxt
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown_table(results))
    plot_memory(results, args.out / "memory.png")
    print(markdown_table(results))


def markdown_table(results):
    lines = [
        "| B | loss | impl | temp MB / device | ring target MB | fwd+bwd s | / one matmul |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        timing = (f"{r['seconds']:.2f} | {r['ratio']:.2f}x") if "seconds" in r else "– | –"
        target = f"{r['ring_target_bytes'] / MB:,.0f}" if r["impl"] == "ring" else ""
        lines.append(f"| {r['batch']:,} | {r['loss']} | {r['impl']} | {r['temp_bytes'] / MB:,.1f} | {target} | {timing} |")
    return "\n".join(lines) + "\n"


def plot_memory(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for loss, style in (("sigmoid", "-"), ("softmax", "--")):
        for impl, marker in zip(IMPLS, "osD"):
            pts = [(r["batch"], r["temp_bytes"] / MB) for r in results if r["loss"] == loss and r["impl"] == impl]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{impl} {loss}")
    targets = sorted({(r["batch"], r["ring_target_bytes"] / MB) for r in results})
    ax.plot(*zip(*targets), ":", color="grey", label="ring target")
    ax.set(xscale="log", yscale="log", xlabel="global batch B", ylabel="temporary memory per device (MB)",
           title=f"value_and_grad, D = {results[0]['dim']}, {results[0]['devices']} devices")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
