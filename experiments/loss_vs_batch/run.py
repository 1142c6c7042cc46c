"""Sigmoid vs softmax loss across global batch sizes, at a fixed number of examples seen.

    python experiments/loss_vs_batch/run.py                      # 32,768 examples per run (results_32768.*)
    python experiments/loss_vs_batch/run.py --examples 262144 --losses sigmoid softmax "sigmoid, t/b lr x10"
    python experiments/loss_vs_batch/run.py --quick              # two tiny runs (the test suite runs it)

A small-scale version of SigLIP (Zhai et al. 2023) Fig. 2 / Sec. 4: both losses, batch sizes
32 ... 4096, every run sees the same number of examples (so a bigger batch means fewer steps),
several seeds, on the demo generator's coloured shapes at 32 px with tiny towers, trained by
the lean single-process trainer of experiments/demo_recipe/harness.py (the library's model,
dense loss, train step and optimizer). Two caption sets:

* `full`: the five phrasings with size and position (720 distinct descriptions);
* `names`: the class name only ("red circle"): 42 distinct training captions, so most in-batch
  "negatives" share the positive's caption -- the duplicate-caption case. Its runs also record
  the learned scale and bias over training and the alignment / uniformity diagnostics.

Loss variants: `sigmoid`, `softmax`, and `sigmoid, t/b lr x10` (the sigmoid loss with its
learned scale and bias at ten times the learning rate, `config.lr_mults`). Metrics on the demo
eval split: zero-shot colour-shape top-1 (48 classes), image->text and text->image recall@1,
and wall time per run. Results go to `results_<examples>.json` / `.md`, `plot_<examples>.png`
and `scale_bias_<examples>.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo_recipe"))

import numpy as np  # noqa: E402

from harness import Recipe, train_and_eval  # noqa: E402

METRICS = ("colour_shape_top1", "i2t_recall@1", "t2i_recall@1")
DIAGNOSTICS = ("alignment", "uniformity_img", "uniformity_txt")
BASE = Recipe(image_size=32, patch=8, aug="none", warmup=0, train_size=16_384, eval_size=480)
LOSSES = {"sigmoid": dict(loss="sigmoid"), "softmax": dict(loss="softmax"),
          "sigmoid, t/b lr x10": dict(loss="sigmoid", scalar_lr_mult=10.0)}


def recipe_for(loss, batch, captions, seed, examples, base=BASE):
    steps = max(examples // batch, 1)
    return base.replace(**LOSSES[loss], batch=batch, captions=captions, seed=seed, steps=steps,
                        warmup=max(steps // 10, 1))


def run_grid(batches, seeds, examples, caption_sets, out_path, base=BASE, losses=("sigmoid", "softmax")):
    results = json.loads(out_path.read_text()) if out_path.exists() else []
    done = {(r["loss"], r["batch"], r["captions"], r["seed"]) for r in results}
    for captions in caption_sets:
        for batch in batches:
            for seed in seeds:
                for loss in losses:
                    if (loss, batch, captions, seed) in done:
                        continue
                    recipe = recipe_for(loss, batch, captions, seed, examples, base)
                    start = time.perf_counter()
                    trace = max(recipe.steps // 20, 1) if captions == "names" else 0
                    out = train_and_eval(recipe, trace_every=trace, probe=False)
                    out.update(loss=loss, batch=batch, captions=captions, seed=seed, steps=recipe.steps,
                               examples=recipe.steps * batch, wall_s=time.perf_counter() - start)
                    results.append(out)
                    out_path.write_text(json.dumps(results, indent=1))
                    print(f"{captions:5s} {loss:20s} B={batch:5d} seed={seed} steps={recipe.steps:5d} "
                          + " ".join(f"{m}={out[m]:.3f}" for m in METRICS)
                          + f" scale={out['scale']:.2f} bias={out['bias']:.2f} wall={out['wall_s']:.0f}s",
                          flush=True)
    return results


def summarise(results) -> str:
    """Markdown table: mean +- std over seeds per (captions, batch, loss)."""
    keys = sorted({(r["captions"], r["batch"]) for r in results})
    lines = ["| captions | batch | steps | loss | " + " | ".join(METRICS + DIAGNOSTICS) + " | scale | bias | wall s |",
             "|---|---:|---:|---|" + "---:|" * (len(METRICS) + len(DIAGNOSTICS) + 3)]
    for captions, batch in keys:
        for loss in LOSSES:
            rows = [r for r in results if (r["captions"], r["batch"], r["loss"]) == (captions, batch, loss)]
            if not rows:
                continue
            cells = [f"{np.mean([r[m] for r in rows]):.3f} ± {np.std([r[m] for r in rows]):.3f}" for m in METRICS]
            cells += [f"{np.mean([r[m] for r in rows]):.2f}" for m in DIAGNOSTICS]
            bias = np.mean([r["bias"] for r in rows])
            lines.append(f"| {captions} | {batch} | {rows[0]['steps']} | {loss} (n={len(rows)}) | "
                         + " | ".join(cells) + f" | {np.mean([r['scale'] for r in rows]):.1f} | "
                         + ("–" if np.isnan(bias) else f"{bias:.2f}")
                         + f" | {np.mean([r['wall_s'] for r in rows]):.0f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption_sets = sorted({r["captions"] for r in results})
    fig, axes = plt.subplots(len(caption_sets), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(caption_sets)),
                             squeeze=False)
    for row, captions in enumerate(caption_sets):
        for col, metric in enumerate(METRICS):
            ax = axes[row, col]
            for loss in LOSSES:
                rows = [r for r in results if r["captions"] == captions and r["loss"] == loss]
                if not rows:
                    continue
                batches = sorted({r["batch"] for r in rows})
                values = [[r[metric] for r in rows if r["batch"] == b] for b in batches]
                ax.errorbar(batches, [np.mean(v) for v in values], yerr=[np.std(v) for v in values],
                            marker="o", capsize=3, label=loss)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{captions} captions: {metric}")
            ax.set_xlabel("global batch")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_traces(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get("trace")]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    batches = sorted({r["batch"] for r in rows})
    styles = dict(zip(LOSSES, ("-", "--", ":")))  # colour: batch; line style: loss
    for r in rows:
        if r["seed"] != min(x["seed"] for x in rows):
            continue
        steps = [t["step"] / r["steps"] for t in r["trace"]]
        look = dict(label=f"{r['loss']} B={r['batch']}", linestyle=styles[r["loss"]],
                    color=f"C{batches.index(r['batch'])}")
        axes[0].plot(steps, [t["scale"] for t in r["trace"]], **look)
        if r["loss"].startswith("sigmoid"):
            axes[1].plot(steps, [t["bias"] for t in r["trace"]], **look)
    axes[0].set_title("learned scale (names captions)")
    axes[1].set_title("learned bias (sigmoid, names captions)")
    for ax in axes:
        ax.set_xlabel("fraction of training")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny runs into a temporary file")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024, 4096])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=32_768, help="examples seen per run")
    parser.add_argument("--captions", nargs="+", default=["full", "names"])
    parser.add_argument("--losses", nargs="+", default=["sigmoid", "softmax"], choices=list(LOSSES))
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results file (default: results_<examples>.json here; a temporary file with --quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (pathlib.Path(tempfile.mkdtemp()) / "quick.json" if args.quick
                    else HERE / f"results_{args.examples}.json")
    if args.quick:
        base = BASE.replace(train_size=256, eval_size=96)
        results = run_grid([32], [0], 64, ["names"], args.out, base)
    else:
        results = run_grid(args.batches, args.seeds, args.examples, args.captions, args.out,
                           losses=args.losses)
    table = summarise(results)
    print(table)
    if not args.quick:
        (HERE / f"results_{args.examples}.md").write_text(table + "\n")
        plot(results, HERE / f"plot_{args.examples}.png")
        plot_traces(results, HERE / f"scale_bias_{args.examples}.png")
    return results


if __name__ == "__main__":
    main()
