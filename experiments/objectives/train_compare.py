"""Objectives at equal compute on the demo data: each objective of the engine, the EMA as a
momentum teacher, and distillation from a larger demo model, against plain softmax / sigmoid.

    python experiments/objectives/train_compare.py                       # every row, 1,500 steps, 2 seeds
    python experiments/objectives/train_compare.py --steps 300 --seeds 0  # the size run on the shared CPU

Every row trains from scratch with the lean trainer of experiments/demo_recipe/harness.py (the
library's towers, train step, AdamW; dense loss engine, one process) on the demo recipe of
run.py's FINAL, for the same steps and batch, and evaluates on the demo eval split: zero-shot
shape / colour top-1 (caption prompts), recall@1 both ways and the held-out colour-shape pairs.
The step goes through `config.loss_objective`'s path (`LossSpec(objective=...)`); "+ EMA
teacher" rows keep an EMA (decay 0.99) in the state and distil from it (`StepConfig.teacher=
"ema"`); "from large" rows first train a larger model (image width 128, depth 2; text width
64, depth 2) with the plain loss for the same steps, then feed its embeddings of each batch to
the small student as precomputed teacher embeddings (`teacher="data"`; the teacher's forward
runs outside the step, the same numbers as an in-step frozen teacher). Writes
train_results.json / train_results.md next to this file.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo_recipe"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from harness import Batches, Recipe, evaluate, model_config, optimizer_config  # noqa: E402
from run import FINAL  # noqa: E402

from big_contrast import losses, models  # noqa: E402
from big_contrast.train.ema import EmaConfig, ema_init  # noqa: E402
from big_contrast.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from big_contrast.train.step import LossSpec, StepConfig, TrainState, make_train_step  # noqa: E402

LARGE = dict(img_width=128, img_depth=2, txt_width=64, txt_depth=2, heads=4)
KEYS = ("shape_top1@captions", "colour_top1@captions", "i2t_recall@1", "t2i_recall@1",
        "heldout_colour_shape_top1@captions")
# name: (loss of the model / baseline, objective or None, teacher: None | "ema" | "large")
ROWS = {
    "sigmoid (plain)": ("sigmoid", None, None),
    "softmax (plain)": ("softmax", None, None),
    "dcl": ("softmax", "dcl", None),
    "hard_negatives(beta=0.5)": ("softmax", "hard_negatives(beta=0.5)", None),
    "sigmoid + 0.5 * align_uniform": ("sigmoid", "sigmoid + 0.5 * align_uniform", None),
    "sigmoid + distill, EMA teacher": ("sigmoid", "sigmoid + distill", "ema"),
    "large teacher (sigmoid, plain)": ("sigmoid", None, "is_large"),
    "sigmoid + distill, from large": ("sigmoid", "sigmoid + distill", "large"),
    "sigmoid + cwcl(tower=text), from large": ("sigmoid", "sigmoid + cwcl(tower=text)", "large"),
}


def train_row(recipe, objective, teacher, large_model=None):
    """(final model, train seconds) of one row."""
    model = models.create(model_config(recipe), rngs=recipe.seed)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    opt = optimizer_config(recipe)
    tx = make_optimizer(opt, params)
    ema = EmaConfig(decay=0.99) if teacher == "ema" else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       ema=ema_init(params) if ema else None)
    spec = LossSpec(recipe.loss, "dense", objective=None if objective is None else losses.parse_objective(objective))
    step_fn = jax.jit(make_train_step(StepConfig(
        graphdef=graphdef, rest=rest, tx=tx, loss=spec, lr_fn=learning_rate_schedule(opt), ema=ema,
        teacher={"ema": "ema", "large": "data"}.get(teacher))), donate_argnums=(0,))
    embed = None if large_model is None else jax.jit(lambda i, t: (large_model.embed_images(i),
                                                                   large_model.embed_texts(t)))
    batches = Batches(recipe)
    start = time.perf_counter()
    for _ in range(recipe.steps):
        batch = batches.next()
        if embed is not None:
            batch["teacher_image"], batch["teacher_text"] = embed(batch["image"], batch["text"])
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(state)
    return nnx.merge(graphdef, state.params, rest), time.perf_counter() - start, float(metrics["loss"])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds:
        base = Recipe(**FINAL).replace(steps=args.steps, seed=seed)
        large = None
        if any(ROWS[r][2] in ("large", "is_large") for r in args.rows):
            large, large_s, _ = train_row(base.replace(**LARGE), None, None)
        for name in args.rows:
            loss, objective, teacher = ROWS[name]
            recipe = base.replace(loss=loss)
            if teacher == "is_large":
                model, seconds = large, large_s
            else:
                model, seconds, _ = train_row(recipe, objective, teacher, large if teacher == "large" else None)
            row = dict(row=name, seed=seed, train_s=round(seconds, 1),
                       **{k: float(v) for k, v in evaluate(recipe.replace(**(LARGE if teacher == "is_large" else {})),
                                                           model, probe=False).items() if k in KEYS})
            results.append(row)
            print(json.dumps(row), flush=True)
    (HERE / "train_results.json").write_text(json.dumps(dict(steps=args.steps, seeds=args.seeds, rows=results),
                                                         indent=1))
    (HERE / "train_results.md").write_text(table(results, args))
    print(table(results, args))


def table(results, args):
    lines = [f"{args.steps} steps x batch 128, seeds {args.seeds}: mean (min-max over seeds)", "",
             "| objective | " + " | ".join(KEYS) + " | train s |", "|---|" + "---:|" * (len(KEYS) + 1)]
    for name in dict.fromkeys(r["row"] for r in results):
        rows = [r for r in results if r["row"] == name]
        cell = lambda k: (f"{np.mean([r[k] for r in rows]):.3f}" + (  # noqa: E731
            f" ({min(r[k] for r in rows):.2f}-{max(r[k] for r in rows):.2f})" if len(rows) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cell(k) for k in KEYS) + f" | {cell('train_s')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
