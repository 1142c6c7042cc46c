"""Train-step throughput: examples/s per device, MFU, memory and the loss engine's share.

    python experiments/step_throughput/run.py                    # SigLIP B/16 at 224 px, every variant
    python experiments/step_throughput/run.py --quick            # tiny towers: a few minutes on a CPU
    python experiments/step_throughput/run.py --study tower      # image tower fwd+bwd, patch dropout 0 vs 0.5
    python experiments/step_throughput/run.py --variants base,gc --batch_per_device 512 --microbatch 128

Each variant compiles the full train step (towers -> embeddings -> loss engine -> grads ->
AdamW) on all local devices (one `data` mesh axis) and times `--steps` steps after one warm-up:

* examples/s per device = global batch / median step time / devices;
* MFU = model FLOPs per device per second / the device's peak (`PEAK_FLOPS`, bf16 dense, or
  `--peak_flops`). Model FLOPs come from XLA's cost analysis of the same step lowered in one
  pass with the dense loss: cost analysis counts a loop body once, so the ring's and gradient
  caching's loops would be undercounted, and recomputation is not model work anyway;
* memory = the compiled step's arguments + outputs - aliased (donated) + temporaries, per device;
* loss share = 1 - time(same towers, trivial loss) / time(full loss), the cost of the loss
  engine, for the one-pass step (base vs trivial_loss) and under gradient caching (gc vs
  gc_trivial_loss).

It imports only the models, the losses and the train step (no data pipeline, grain, TFDS,
ml_collections or tensorboardX) and draws the batch on the devices, so it runs unchanged on an
accelerator image that has jax, flax and optax.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from a checkout

from big_contrast import distributed  # noqa: E402

distributed.set_xla_flag_defaults()  # the GPU latency-hiding scheduler, before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from big_contrast import models, sharding  # noqa: E402
from big_contrast.train.step import (  # noqa: E402
    LossSpec, StepConfig, TrainState, loss_and_grads, make_train_step)

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5": 197e12, "TPU v4": 275e12,
    "cpu": 170e9,  # this project's 2-core machine, float32 matmul (shared by its simulated devices)
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    impl: str = "ring"
    microbatches: int = 1
    patch_dropout: float = 0.0
    dtype: str = "bfloat16"  # tower compute dtype (parameters stay float32)
    loss_dtype: str | None = None  # None: float32 embeddings into the loss
    block: int | None = None
    trivial_loss: bool = False


def variants(args) -> list[Variant]:
    k = args.batch_per_device // args.microbatch if args.microbatch else 4
    table = [
        Variant("base"),
        Variant("f32", dtype="float32"),
        Variant("bf16_loss", loss_dtype="bfloat16"),
        Variant("all_gather", impl="all_gather"),
        Variant("dense", impl="dense"),
        Variant("gc", microbatches=k),
        Variant("patch_dropout", patch_dropout=0.5),
        Variant("gc_patch_dropout", microbatches=k, patch_dropout=0.5),
        Variant("trivial_loss", trivial_loss=True),
        Variant("gc_trivial_loss", microbatches=k, trivial_loss=True),
    ]
    table += [Variant(f"block{b}", block=b) for b in args.blocks]
    wanted = args.variants.split(",") if args.variants else [v.name for v in table]
    unknown = set(wanted) - {v.name for v in table}
    if unknown:
        raise SystemExit(f"--variants {sorted(unknown)} unknown; pick from {[v.name for v in table]}.")
    return [v for v in table if v.name in wanted]


def model_config(args, variant: Variant) -> dict:
    image = dict(variant=args.image, image_size=args.image_size, pool="map", posemb="learn",
                 patch_dropout=variant.patch_dropout, depth=args.depth)
    text = dict(variant=args.text, vocab_size=args.vocab, max_len=args.max_len, depth=args.depth)
    return dict(image=image, text=text, embed_dim=args.embed_dim, loss="sigmoid", dtype=variant.dtype)


def trivial_loss(zimg, ztxt, scale, bias, mesh, axis):
    """Same inputs and gradient paths as the loss engine, no cross-example work."""
    del mesh, axis
    return -scale * jnp.mean(jnp.sum(zimg * ztxt, axis=-1)) + bias


def loss_spec(variant: Variant):
    if variant.trivial_loss:
        return trivial_loss
    return LossSpec("sigmoid", variant.impl, variant.block, variant.loss_dtype)


def make_batch(args, mesh, global_batch):
    """A random global batch drawn on the devices, already sharded over the batch axes."""

    def draw(key):
        k1, k2 = jax.random.split(key)
        images = jax.random.uniform(k1, (global_batch, args.image_size, args.image_size, 3), minval=-1.0)
        texts = jax.random.randint(k2, (global_batch, args.max_len), 2, args.vocab)
        return dict(image=images, text=texts)

    return jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(0))


def fresh_state(params, tx, mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    opt_state = jax.jit(tx.init)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, params=params, opt_state=opt_state)


@functools.lru_cache(maxsize=None)
def _model(config_json):
    return nnx.split(models.abstract_model(json.loads(config_json)), nnx.Param, ...)


def step_fn(args, variant, mesh):
    graphdef, _, rest = _model(json.dumps(model_config(args, variant)))
    tx = optax.adamw(1e-4, weight_decay=1e-4)
    step = make_train_step(StepConfig(
        graphdef=graphdef, rest=rest, tx=tx, loss=loss_spec(variant), lr_fn=lambda step: 1e-4,
        mesh=mesh, axis=sharding.batch_axes(mesh), microbatches=variant.microbatches))
    return jax.jit(step, donate_argnums=(0,)), tx


def model_flops(args, variant, mesh, params, batch) -> float:
    """Global FLOPs of one step's model work: the step lowered in one pass with the dense loss."""
    one_pass = dataclasses.replace(variant, impl="dense", microbatches=1, block=None)
    graphdef, _, rest = _model(json.dumps(model_config(args, one_pass)))
    fn = functools.partial(loss_and_grads, graphdef, rest=rest, loss=loss_spec(one_pass), mesh=mesh,
                           axis=sharding.batch_axes(mesh), microbatches=1, step=jnp.int32(0))
    return float(jax.jit(lambda p, b: fn(p, batch=b)).lower(params, batch).cost_analysis()["flops"])


def memory_bytes(compiled) -> float | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def median_seconds(run, steps):
    """Median wall time of `steps` calls of `run()` (which blocks), after one warm-up call."""
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(compiled, state, batch, steps):
    box = {"state": state}

    def run():
        box["state"], box["metrics"] = compiled(box["state"], batch)
        jax.block_until_ready(box["metrics"])

    return median_seconds(run, steps), float(box["metrics"]["loss"])


def peak_flops(args) -> float:
    if args.peak_flops:
        return args.peak_flops
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak / (jax.device_count() if name == "cpu" else 1)
    raise SystemExit(f"no peak FLOP/s known for device kind {kind!r}; pass --peak_flops.")


def run_variant(args, variant, mesh, params, batch, peak):
    n = jax.device_count()
    jitted, tx = step_fn(args, variant, mesh)
    state = fresh_state(params, tx, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    seconds, loss = time_steps(compiled, state, batch, args.steps)
    flops = model_flops(args, variant, mesh, params, batch) / n
    memory = memory_bytes(compiled)
    global_batch = batch["image"].shape[0]
    return dict(variant=variant.name, impl=variant.impl, microbatches=variant.microbatches,
                patch_dropout=variant.patch_dropout, dtype=variant.dtype, loss_dtype=variant.loss_dtype or "float32",
                block=variant.block, step_ms=1e3 * seconds, examples_per_s_per_device=global_batch / seconds / n,
                model_tflops_per_device=flops / 1e12, mfu=flops / seconds / peak,
                memory_gib_per_device=None if memory is None else memory / 2**30, compile_s=compile_s, loss=loss)


def study_steps(args):
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
    global_batch = args.batch_per_device * jax.device_count()
    batch = make_batch(args, mesh, global_batch)
    params = nnx.to_pure_dict(nnx.state(models.create_sharded(
        model_config(args, Variant("init")), mesh, seed=jax.random.key(0, impl="rbg")), nnx.Param))
    peak = peak_flops(args)
    rows = []
    for variant in variants(args):
        rows.append(run_variant(args, variant, mesh, params, batch, peak))
        print(json.dumps(rows[-1]), flush=True)
    by_name = {r["variant"]: r for r in rows}
    for full, trivial in (("base", "trivial_loss"), ("gc", "gc_trivial_loss")):
        if full in by_name and trivial in by_name:
            share = 1 - by_name[trivial]["step_ms"] / by_name[full]["step_ms"]
            print(f"loss engine share of the {full} step: {share:.1%}")
    return rows


def study_tower(args):
    """Image tower forward+backward with patch dropout 0 and 0.5 (FLIP's speed-up), one device."""
    rows = []
    for rate in (0.0, 0.5):
        cfg = model_config(args, Variant("tower", patch_dropout=rate, dtype=args.tower_dtype))
        tower = models.create_image_tower(models.resolve_config(cfg), nnx.Rngs(0))
        graphdef, state = nnx.split(tower)
        images = jax.random.uniform(jax.random.key(1), (args.batch_per_device, args.image_size, args.image_size, 3))
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(images.shape[0]))

        def loss(state, images, keys):
            return jnp.sum(nnx.merge(graphdef, state)(images, keys).astype(jnp.float32) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(state, images, keys).compile()
        seconds = median_seconds(lambda: jax.block_until_ready(compiled(state, images, keys)), args.steps)
        rows.append(dict(patch_dropout=rate, kept_tokens=tower.num_kept_patches, step_ms=1e3 * seconds,
                         images_per_s=images.shape[0] / seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(f"patch dropout 0.5 speed-up of image-tower fwd+bwd: {rows[0]['step_ms'] / rows[1]['step_ms']:.2f}x")
    return rows


def markdown(rows) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=("steps", "tower"), default="steps")
    p.add_argument("--quick", action="store_true", help="tiny towers at 64 px (CPU minutes)")
    p.add_argument("--image", default="B/16")
    p.add_argument("--text", default="B")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="override both towers' depth")
    p.add_argument("--embed_dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--batch_per_device", type=int, default=128)
    p.add_argument("--microbatch", type=int, default=None, help="gradient caching micro-batch (default: b/4)")
    p.add_argument("--blocks", type=int, nargs="*", default=(), help="extra ring variants with these blocks")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak_flops", type=float, default=None, help="per-device peak FLOP/s (default: table)")
    p.add_argument("--tower_dtype", default="float32", help="--study tower compute dtype")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.image, args.text, args.image_size, args.depth = "Ti/16", "Ti", 64, 2
        args.embed_dim, args.vocab, args.max_len = 192, 1000, 16
        args.batch_per_device, args.steps = min(args.batch_per_device, 16), min(args.steps, 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    rows = study_tower(args) if args.study == "tower" else study_steps(args)
    print(markdown(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
