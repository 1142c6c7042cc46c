"""bf16 compute + fused attention vs float32 + materialised einsum attention, one process.

    PYTHONPATH=. .venv/bin/python experiments/attention/run.py            # ~2 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python experiments/attention/run.py --depth 1 --batch 4 --repeats 3

A B/16 image tower (width 768, 12 heads, MLP 3072, MAP head) cut to --depth layers, at 224 px
(196 tokens), float32 parameters, forward + backward of sum(embedding^2) w.r.t. the parameters,
jitted on the default backend. Four settings in the same process: compute dtype float32 or
bfloat16 x attention through the einsum reference (`attention_implementation('einsum')`: the
full float32 logits tensor, the kernel before issue 14) or `jax.nn.dot_product_attention`
('auto': XLA's kernel on CPU, cuDNN flash attention on a GPU for bf16). Reported: median
wall-clock and CPU seconds (all XLA threads) per step over --repeats steps after a warm-up
(rounds interleaved across settings, so load from other users spreads evenly), and the
speed-up over float32 + einsum. On a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast.models import transformer
from big_contrast.models.vit import ViT, ViTConfig

SETTINGS = (("float32", "einsum"), ("float32", "auto"), ("bfloat16", "einsum"), ("bfloat16", "auto"))


def tower(depth: int, dtype) -> ViT:
    return ViT(ViTConfig(patch_size=16, image_size=224, width=768, depth=depth, mlp_dim=3072,
                         num_heads=12, pool="map", dtype=dtype, param_dtype=jnp.float32),
               rngs=nnx.Rngs(0))


def compiled_step(depth: int, dtype_name: str, impl: str, params, images):
    """Compiled (params, images) -> grads, the attention kernel fixed while tracing."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: tower(depth, jnp.dtype(dtype_name))))

    def loss(p, images):
        z = nnx.merge(graphdef, p)(images)
        return jnp.sum(jnp.square(z.astype(jnp.float32)))

    with transformer.attention_implementation(impl):
        return jax.jit(jax.grad(loss)).lower(params, images).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    params = nnx.state(tower(args.depth, jnp.float32), nnx.Param)  # same f32 weights for all
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, 224, 224, 3)),
                         jnp.float32)
    fns = {s: compiled_step(args.depth, *s, params, images) for s in SETTINGS}
    for fn in fns.values():  # compile + warm-up
        jax.block_until_ready(fn(params, images))
    times = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for s, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(params, images))
            times[s].append((time.perf_counter() - wall, time.process_time() - cpu))
    base = {k: statistics.median(t[k] for t in times[SETTINGS[0]]) for k in (0, 1)}
    print(f"backend {jax.default_backend()}, depth {args.depth}, batch {args.batch}, "
          f"{args.repeats} steps each, load {os.getloadavg()[0]:.1f}\n")
    print("| compute dtype | attention | s / step, wall (median) | CPU-s / step (median) "
          "| speed-up vs f32 einsum, wall | CPU |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for (dtype, impl), ts in times.items():
        wall, cpu = (statistics.median(t[k] for t in ts) for k in (0, 1))
        label = "einsum (materialised f32 logits)" if impl == "einsum" else "jax.nn.dot_product_attention"
        print(f"| {dtype} | {label} | {wall:.3f} | {cpu:.3f} | {base[0] / wall:.2f}x | {base[1] / cpu:.2f}x |")
        rows.append(dict(dtype=dtype, attention=impl, seconds=ts, wall=wall, cpu=cpu,
                         speedup_wall=base[0] / wall, speedup_cpu=base[1] / cpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=jax.default_backend(), depth=args.depth, batch=args.batch,
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
