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
64, depth 2) with the plain loss for the same steps (or `--teacher_steps`), save it as a workdir (a checkpoint and a
config record, as `big-contrast train` leaves one) and distil from it through the frozen-teacher
path of `config.teacher = dict(workdir=...)`: `big_contrast.teacher.load_teacher` restores its
parameters, the step embeds each batch with it inside the jitted step (its parameters the
step's third argument, `StepConfig.frozen_teacher`). `--precomputed` feeds its embeddings as
batch fields instead (`teacher="data"`, the forward outside the step). Writes
train_results.json / train_results.md next to this file (`--out` another name).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo_recipe"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from harness import Batches, Recipe, evaluate, model_config, optimizer_config, pp_strings  # noqa: E402
from run import FINAL  # noqa: E402

from big_contrast import losses, models, sharding  # noqa: E402
from big_contrast import teacher as frozen  # noqa: E402
from big_contrast.checkpoint import Checkpointer  # noqa: E402
from big_contrast.train import default_config  # noqa: E402
from big_contrast.workdir import Workdir  # noqa: E402
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


def save_teacher_workdir(recipe, model, directory) -> Workdir:
    """`model` as a workdir `config.teacher = dict(workdir=...)` reads: checkpoint + config record."""
    workdir = Workdir(directory)
    config = default_config()
    config.model = model_config(recipe)
    config.data.pp_train, config.data.pp_eval = pp_strings(recipe)
    config.data.tokenizer, config.data.max_len = "demo", config.model.text.max_len
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt = Checkpointer(workdir.checkpoints, async_save=False)
    try:
        ckpt.save(recipe.steps, {"step": jnp.int32(recipe.steps), "params": params}, {"step": recipe.steps}, wait=True)
    finally:
        ckpt.close()
    workdir.write_config(config)
    return workdir


def load_frozen_teacher(workdir, objective, student_recipe):
    """(FrozenTeacher, params) on a one-device mesh, as train/teacher.py's `load_for_run` loads it."""
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])
    return frozen.load_teacher(frozen.read_record(workdir), mesh, towers=losses.parse_objective(objective).teacher_towers,
                               student_pp=pp_strings(student_recipe)[0])


def train_row(recipe, objective, teacher, large_model=None, teacher_dir=None):
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
    loaded = None if teacher_dir is None else load_frozen_teacher(teacher_dir, objective, recipe)
    step_fn = jax.jit(make_train_step(StepConfig(
        graphdef=graphdef, rest=rest, tx=tx, loss=spec, lr_fn=learning_rate_schedule(opt), ema=ema,
        teacher={"ema": "ema", "large": "data"}.get(teacher) if loaded is None else None,
        frozen_teacher=None if loaded is None else loaded[0])), donate_argnums=(0,))
    if loaded is not None:  # the frozen teacher's parameters: the step's third argument
        step_fn = functools.partial(step_fn, teacher_params=loaded[1])
    embed = None if large_model is None or loaded is not None else jax.jit(
        lambda i, t: (large_model.embed_images(i), large_model.embed_texts(t)))
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
    parser.add_argument("--precomputed", action="store_true", help="'from large' rows: teacher embeddings as "
                        "batch fields (teacher='data') instead of the frozen teacher in the step")
    parser.add_argument("--out", default="train_results", help="name of the .json / .md written here")
    parser.add_argument("--teacher_steps", type=int, default=None,
                        help="steps of the large model (default: --steps); a teacher trained longer than "
                        "its students, as a released one is")
    parser.add_argument("--teacher_dir", default="/tmp/big_contrast_objectives_teacher",
                        help="where the large model's workdir is written (one per seed)")
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds:
        base = Recipe(**FINAL).replace(steps=args.steps, seed=seed)
        large = None
        teacher_dir = None
        if any(ROWS[r][2] in ("large", "is_large") for r in args.rows):
            large_recipe = base.replace(**LARGE, steps=args.teacher_steps or args.steps)
            large, large_s, _ = train_row(large_recipe, None, None)
            if not args.precomputed:
                directory = pathlib.Path(args.teacher_dir) / f"seed{seed}"
                shutil.rmtree(directory, ignore_errors=True)
                teacher_dir = save_teacher_workdir(large_recipe, large, directory)
        for name in args.rows:
            loss, objective, teacher = ROWS[name]
            recipe = base.replace(loss=loss)
            if teacher == "is_large":
                model, seconds = large, large_s
            else:
                from_large = teacher == "large"
                model, seconds, _ = train_row(recipe, objective, teacher, large if from_large else None,
                                              teacher_dir if from_large else None)
            row = dict(row=name, seed=seed, train_s=round(seconds, 1),
                       **{k: float(v) for k, v in evaluate(recipe.replace(**(LARGE if teacher == "is_large" else {})),
                                                           model, probe=False).items() if k in KEYS})
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(HERE / f"{args.out}.jsonl", "a") as f:  # so far, should the run be cut short
                f.write(json.dumps(row) + "\n")
    (HERE / f"{args.out}.json").write_text(json.dumps(dict(steps=args.steps, teacher_steps=args.teacher_steps,
                                                           seeds=args.seeds, rows=results),
                                                       indent=1))
    (HERE / f"{args.out}.md").write_text(table(results, args))
    print(table(results, args))


def table(results, args):
    teacher = f" (the large teacher: {args.teacher_steps} steps)" if args.teacher_steps else ""
    lines = [f"{args.steps} steps x batch 128{teacher}, seeds {args.seeds}: mean (min-max over seeds)", "",
             "| objective | " + " | ".join(KEYS) + " | train s |", "|---|" + "---:|" * (len(KEYS) + 1)]
    for name in dict.fromkeys(r["row"] for r in results):
        rows = [r for r in results if r["row"] == name]
        cell = lambda k: (f"{np.mean([r[k] for r in rows]):.3f}" + (  # noqa: E731
            f" ({min(r[k] for r in rows):.2f}-{max(r[k] for r in rows):.2f})" if len(rows) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cell(k) for k in KEYS) + f" | {cell('train_s')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
