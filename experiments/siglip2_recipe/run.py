"""SigLIP 2's terms on the demo data at equal steps: sigmoid alone vs + decoder vs + decoder + SD + MP.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/siglip2_recipe/run.py --steps 600

Each row trains `configs/demo.py:sigmoid`, `configs/demo.py:siglip2` or `configs/demo.py:siglip2,self_distill`
(+ SILC + TIPS for the last 20 % of the steps, README "SigLIP 2") with the real trainer for the
same number of steps and batch (equal examples; the decoder's extra FLOPs are the cost reported
as step time), then runs the demo's evaluators once at the end: zero-shot shape and colour,
the 6 held-out colour-shape pairs, retrieval recall@1, and for the decoder row its captions
(captioning loss, n-gram score, how often a greedy caption names the right colour / shape).
Step time is the trainer's mean `step_time_s` after the first logged window (compilation
excluded); memory is the `plan` activation bytes per example. Results go to results.json and
a markdown table (results.md) that README.md quotes. `--rows NAME ...` reruns only those rows and
keeps the others' results.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "configs"))

import demo  # noqa: E402

import jax  # noqa: E402

from big_contrast import models  # noqa: E402
from big_contrast.checkpoint import Checkpointer  # noqa: E402
from big_contrast.evaluate.dense_probe import dense_probe, demo_probe_set  # noqa: E402
from big_contrast.train import train  # noqa: E402
from big_contrast.train.metrics import read_metrics  # noqa: E402
from big_contrast.train.plan import plan  # noqa: E402

ROWS = {"sigmoid": "sigmoid", "sigmoid + decoder": "siglip2", "+ decoder + SD + MP": "siglip2,self_distill"}
KEYS = ("dense/foreground_accuracy", "dense/miou", "shape/top1", "colour/top1", "heldout/top1", "retrieval/i2t_recall@1", "retrieval/t2i_recall@1", "captions/loss",
        "captions/ngram", "captions/names_colour", "captions/names_shape", "captions/names_all")


def config_of(arg, steps, seed):
    config = demo.get_config(f"{arg},total_steps={steps}")  # self_distill's EMA start follows total_steps
    config.update(total_steps=steps, log_every=max(steps // 6, 1), checkpoint_every=10 * steps, seed=seed)
    config.optimizer.warmup_steps = min(50, steps // 10)
    for evaluator in config.evals.values():
        evaluator.every_steps = 0  # once, at the end
    return config


def run_row(name, arg, steps, seed):
    config = config_of(arg, steps, seed)
    with tempfile.TemporaryDirectory() as workdir:
        train(config, workdir, progress=False)
        rows = read_metrics(workdir)
        dense = dense_features_probe(config, workdir)
    results = {k: v for r in rows for k, v in r.items() if "/" in k and not k.startswith("loss")}
    results.update({f"dense/{k}": v for k, v in dense.items()})
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    memory = plan(config, device_memory_bytes=2**34)["activation_bytes_per_example"]
    return dict(row=name, seed=seed, steps=steps, step_time_s=sum(times) / max(len(times), 1),
                activation_bytes_per_example=memory, **{k: results.get(k) for k in KEYS if k in results},
                all_metrics=results)


def dense_features_probe(config, workdir):
    """Per-patch shape segmentation (background + 6 shapes on the 4 x 4 grid) by a ridge probe on
    the frozen un-pooled patch tokens (`ViT.encode` -> `ViT.patch_tokens`) of the final model."""
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore_arrays()
    finally:
        ckpt.close()
    model = models.create_from_params(config.model, state["params"])
    tokens_fn = jax.jit(lambda images: model.image.patch_tokens(model.image.encode(images)))
    grid = demo.IMAGE_SIZE // 8
    common = dict(image_size=demo.IMAGE_SIZE, pp=demo.PP_EVAL, grid=grid, task="shape")
    train_images, train_labels = demo_probe_set("train", 480, **common)
    test_images, test_labels = demo_probe_set("eval", 240, **common)
    return dense_probe(tokens_fn, train_images, train_labels, test_images, test_labels, batch_size=96)


def table(results):
    head = "| row | seed | steps | " + " | ".join(KEYS) + " | step time (s) | activations / example (KiB) |"
    lines = [head, "|" + "---|" * (len(KEYS) + 5)]
    for r in results:
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in KEYS]
        lines.append(f"| {r['row']} | {r['seed']} | {r['steps']} | " + " | ".join(cells)
                     + f" | {r['step_time_s']:.3f} | {r['activation_bytes_per_example'] / 1024:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="row names to (re)run; the others are kept")
    args = parser.parse_args()
    path = HERE / "results.json"
    kept = json.loads(path.read_text()) if path.exists() else []
    for seed in args.seeds:
        for name in args.rows:
            new = run_row(name, ROWS[name], args.steps, seed)
            kept = [r for r in kept if (r["row"], r["seed"]) != (name, seed)] + [new]
            path.write_text(json.dumps(kept, indent=1))  # after every row: a stopped run keeps what it measured
    order = list(ROWS)
    results = sorted(kept, key=lambda r: (order.index(r["row"]), r["seed"]))
    (HERE / "results.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
