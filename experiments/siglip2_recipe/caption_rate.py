"""How often the demo SigLIP 2 decoder's greedy captions name the right colour and shape.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 nice -n 19 \
        python experiments/siglip2_recipe/caption_rate.py --steps 6000

Trains `configs/demo.py:siglip2` (sigmoid loss + the one-block captioning decoder, CapPa's parallel
prediction on half the rows) for `--steps` steps of 128 (the config's full budget is 6,000; a
shorter run is a whole run with its cosine schedule over `--steps`), then runs only the
captioning evaluator once, on the demo eval split (480 images, all 48 colour-shape pairs in turn,
so each colour and each shape is equally frequent). Prints, and writes to
caption_rate.json: `names_colour` / `names_shape` / `names_all` (the greedy caption names exactly
the reference's colour / shape / both), the n-gram score and the teacher-forced loss, beside the
rates a blind guesser reaches (1/8, 1/6, 1/48). The README's SigLIP 2 section quotes the result.
`--arg siglip2,locca` trains LocCa's three tasks on the demo's boxes and adds the referring
evaluator's box IoU / accuracy@0.5 (`refer/*`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "configs"))

import demo  # noqa: E402

from big_contrast.train import train  # noqa: E402
from big_contrast.train.metrics import read_metrics  # noqa: E402

CHANCE = {"captions/names_colour": 1 / 8, "captions/names_shape": 1 / 6, "captions/names_all": 1 / 48}


def caption_config(steps: int, seed: int, arg: str = "siglip2"):
    config = demo.get_config(arg)
    config.update(total_steps=steps, log_every=max(steps // 10, 1), checkpoint_every=10 * steps, seed=seed)
    config.optimizer.warmup_steps = min(50, max(steps // 10, 1))
    kept = {name: config.evals[name] for name in ("captions", "refer") if name in config.evals}  # refer: LocCa
    for evaluator in kept.values():
        evaluator.every_steps = 0  # once, at the end
    config.evals = kept
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arg", default="siglip2", help="the configs/demo.py argument")
    parser.add_argument("--workdir", default=None, help="kept (to watch metrics.jsonl); default a temporary one")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        train(caption_config(args.steps, args.seed, args.arg), workdir, progress=False)
        rows = read_metrics(workdir)
    metrics = {k: v for r in rows for k, v in r.items() if k.startswith(("captions/", "refer/"))}
    result = dict(arg=args.arg, steps=args.steps, seed=args.seed, wall_s=round(time.time() - start),
                  chance=CHANCE, **metrics)
    (HERE / f"caption_rate_{args.arg.replace(',', '_')}_{args.steps}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
