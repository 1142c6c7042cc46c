"""Why the demo learnt colour but not shape: each recipe change alone and combined, at 600 steps.

    python experiments/demo_recipe/run.py              # every row of README.md (results.json / .md)
    python experiments/demo_recipe/run.py --rows base final

Every row trains from scratch with the lean trainer of `harness.py` (the library's towers, dense
loss, train step and AdamW; one process, no mesh) for the same number of steps and batch size
as the demo, and evaluates on the demo eval split (480 images): zero-shot shape and colour
top-1 with the caption-phrased prompts (`demo.demo_templates`) and with the old single prompt
"a photo of a {}.", retrieval recall@1, the 6 held-out colour-shape pairs, and a ridge probe of
shape on the image embeddings (does the image tower encode shape at all?). The `supervised`
rows train the image tower alone on the shape label: what the tower can learn from a direct
signal. Wall times are on the shared 2-core machine, under load from other jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Recipe, supervised_shape, train_and_eval  # noqa: E402

# The demo as shipped: 64 px, patch 8, width 32, one layer, gap, sigmoid, and the text tower's
# old position-embedding init (1/sqrt(width); the library now uses CLIP's 0.01).
BASE = Recipe(txt_posemb_std=32 ** -0.5)
FINAL = dict(image_size=32, patch=8, img_width=64, heads=4, txt_posemb_std=None)  # rounds 1-2
# Round 3, configs/demo.py: hard-negative groups of 5, a two-layer image tower, the softmax loss,
# 6,000 steps (what `make demo` trains in about 230 s).
DEMO = {**FINAL, "shape_groups": 5, "img_depth": 2, "loss": "softmax", "steps": 6000}
ROWS = {
    # each change alone, from the shipped recipe
    "base (shipped demo)": {},
    "patch 16 (object-sized patches)": dict(patch=16),
    "width 64, depth 3 / 2 (both towers)": dict(img_width=64, txt_width=64, img_depth=3, txt_depth=2, heads=4),
    "pool map": dict(pool="map"),
    "learned posemb": dict(posemb="learn"),
    "lr 1e-2": dict(lr=1e-2),
    "batch 256": dict(batch=256),
    "no augmentation": dict(aug="none"),
    "softmax loss": dict(loss="softmax"),
    "bias init 0": dict(bias_init=0.0),
    "text posemb init 0.01 (fix)": dict(txt_posemb_std=None),
    "text pool mean": dict(txt_pool="mean"),
    # combined: the new demo recipe, and variations of it
    "final: 32 px, patch 8, image width 64, text fix": FINAL,
    "final, seed 1": {**FINAL, "seed": 1},
    "final, seed 2": {**FINAL, "seed": 2},
    "final, old text posemb init": {**FINAL, "txt_posemb_std": 32 ** -0.5},
    "final + text pool mean": {**FINAL, "txt_pool": "mean"},
    "final + softmax loss": {**FINAL, "loss": "softmax"},
    "final, 3000 steps (the demo's budget)": {**FINAL, "steps": 3000},
    "final + name-only captions": {**FINAL, "captions": "names"},
    "final + name-only captions + softmax": {**FINAL, "captions": "names", "loss": "softmax"},
    # round 2 (after the demo missed its targets): hard negatives for shape
    "final + mixed captions": {**FINAL, "captions": "mixed"},
    "final + shape groups of 4": {**FINAL, "shape_groups": 4},
    "final + shape groups of 4 + mixed captions": {**FINAL, "shape_groups": 4, "captions": "mixed"},
    "final + image depth 2": {**FINAL, "img_depth": 2},
    "final + scale/bias lr x10 + shape groups of 4": {**FINAL, "scalar_lr_mult": 10.0, "shape_groups": 4},
    "final + scale/bias lr x10": {**FINAL, "scalar_lr_mult": 10.0},
    "final + shape groups of 4, 3000 steps": {**FINAL, "shape_groups": 4, "steps": 3000},
    "final + shape groups of 4 + image depth 2, 3000 steps": {**FINAL, "shape_groups": 4, "img_depth": 2, "steps": 3000},
    # round 3: the demo's recipe (groups of 5 from the demo source, depth 2, softmax, 6,000
    # steps) and each of its three changes taken away alone
    "demo: groups of 5 + image depth 2 + softmax, 6000 steps": DEMO,
    "demo, seed 1": {**DEMO, "seed": 1},
    "demo without groups": {**DEMO, "shape_groups": 1},
    "demo with image depth 1": {**DEMO, "img_depth": 1},
    "demo with the sigmoid loss": {**DEMO, "loss": "sigmoid"},
}
SUPERVISED = {"supervised: base tower": {}, "supervised: base tower, patch 16, width 64":
              dict(patch=16, img_width=64, heads=4), "supervised: final tower": FINAL,
              "supervised: final tower, depth 2": {**FINAL, "img_depth": 2},
              "supervised: final tower, patch 4": {**FINAL, "patch": 4},
              "supervised: final tower, lr 1e-2": {**FINAL, "lr": 1e-2},
              "supervised: final tower, 3000 steps": {**FINAL, "steps": 3000},
              "supervised: final tower, depth 2, 3000 steps": {**FINAL, "img_depth": 2, "steps": 3000}}
COLUMNS = ("shape_top1@captions", "shape_top1", "shape_top1@photo", "colour_top1@captions", "colour_top1", "i2t_recall@1", "t2i_recall@1",
           "heldout_colour_shape_top1@captions", "heldout_colour_shape_top1", "probe_shape_top1", "scale", "bias", "train_s")


def table(results: dict) -> str:
    lines = ["| recipe | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, out in results.items():
        cells = [f"{out[c]:.3f}" if isinstance(out.get(c), float) else "" for c in COLUMNS]
        if "supervised_shape_top1" in out:
            cells = [f"{out['supervised_shape_top1']:.3f}"] + [""] * (len(COLUMNS) - 2) + [f"{out['train_s']:.0f}"]
        else:
            cells[-1] = f"{out['train_s']:.0f}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", help="run only rows whose name starts with one of these")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name, changes in {**ROWS, **SUPERVISED}.items():
        if name in results or (args.rows and not name.startswith(tuple(args.rows))):
            continue
        recipe = BASE.replace(**changes)
        results[name] = supervised_shape(recipe) if name in SUPERVISED else train_and_eval(recipe)
        args.out.write_text(json.dumps(results, indent=1))
        print(name, {k: round(v, 3) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    ordered = {n: results[n] for n in {**ROWS, **SUPERVISED} if n in results}
    (HERE / "results.md").write_text(table(ordered) + "\n")
    print(table(ordered))


if __name__ == "__main__":
    main()
