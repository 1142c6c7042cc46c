"""A lean single-process trainer for recipe studies on the demo data (no mesh, no grain, no files).

It runs the library's own pieces -- `models.create`, `train.step.make_train_step` with the dense loss
(the reference every ring / all-gather impl matches), `train.optimizer.make_optimizer`, the demo
generator and image ops, and the zero-shot / retrieval metric functions -- in a plain Python
loop, so dozens of recipes fit in minutes on a 2-core CPU. `configs/demo.py` trains the chosen
recipe with the real trainer (8 simulated devices, ring loss, grain pipeline).

    from harness import Recipe, train_and_eval
    result = train_and_eval(Recipe(steps=300, pool="map"))
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from big_contrast import models
from big_contrast.data import demo
from big_contrast.data.preprocess import ProcessExample
from big_contrast.data.tokenizer import encode_fixed, make_tokenizer
from big_contrast.evaluate.diagnostics import alignment, uniformity
from big_contrast.evaluate.retrieval import recall_at_k
from big_contrast.evaluate.zero_shot import classifier_from_prompt_embeddings, topk_accuracy
from big_contrast.train import default_config
from big_contrast.train.optimizer import learning_rate_schedule, make_optimizer
from big_contrast.train.step import LossSpec, StepConfig, TrainState, make_train_step

MAX_LEN = 16
CURVE_KEYS = ("shape_top1", "shape_top1@photo", "colour_top1", "i2t_recall@1", "t2i_recall@1")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every knob of the demo recipe. The defaults are the demo as it shipped before this study,
    except the text position-embedding init, which follows the library (`run.BASE` sets the
    old one); `configs/demo.py` is `run.FINAL`."""

    image_size: int = 64
    patch: int = 8
    img_width: int = 32
    img_depth: int = 1
    txt_width: int = 32
    txt_depth: int = 1
    heads: int = 2
    pool: str = "gap"
    posemb: str = "sincos2d"
    embed_dim: int = 64
    loss: str = "sigmoid"
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    batch: int = 128
    steps: int = 600
    microbatch: int | None = None   # gradient caching: rows per micro-batch
    aug: str = "crop"               # "crop" (the shipped random_resized_crop) | "none"
    log_scale_init: float | None = None
    bias_init: float | None = None
    scalar_lr_mult: float = 1.0     # lr multiplier of log_scale and bias
    captions: str = "full"          # "full": the five templates; "mixed": plus shape-led partial ones; "names": class names only
    train_size: int = 10_000
    eval_size: int = 480
    seed: int = 0
    txt_pool: str | None = None     # None: the tower's default ('last' bidirectional, 'eos' causal)
    txt_posemb_std: float | None = None  # rescale the text tower's initial position embedding
    shape_groups: int = 1           # >1: batches of groups that share colour, size and position

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def pp_strings(recipe: Recipe) -> tuple[str, str]:
    s = recipe.image_size
    train = {"crop": f"decode|random_resized_crop({s}, scale=(0.6, 1.0), ratio=(0.9, 1.1))|value_range(-1, 1)",
             "none": f"decode|resize({s})|value_range(-1, 1)"}[recipe.aug]
    return train, f"decode|resize({s})|value_range(-1, 1)"


@functools.lru_cache(maxsize=8)
def raw_examples(split: str, size: int, image_size: int, group_size: int = 1) -> tuple[dict, ...]:
    source = demo.DemoSource(split, size, image_size, group_size=group_size)
    return tuple({**source[i], "_source": 0} for i in range(size))


# "mixed" captions: the generator's five plus three that name the shape with at most one other
# attribute and never the colour, so that for these captions shape is what tells the positive
# from the in-batch negatives (with full captions colour, size and position already do).
PARTIAL_TEMPLATES = ("a {shape}", "a {size} {shape}", "a {shape} at the {position}")


def mixed_captions(raw: dict) -> list[str]:
    names = {task: demo.demo_class_names(task)[raw[f"label/{task}"]] for task in ("shape", "size", "position")}
    return list(raw["captions"]) + [t.format(**names) for t in PARTIAL_TEMPLATES]


def class_name_captions(raw: dict) -> list[str]:
    """The duplicate-caption variant: only 'colour shape' (48 distinct captions in all)."""
    return [demo.demo_class_names("colour_shape")[raw["label/colour_shape"]]]


def model_config(recipe: Recipe) -> ml_collections.ConfigDict:
    m = default_config().model
    mlp = lambda w: 4 * w  # noqa: E731
    m.image.update(variant=f"mu/{recipe.patch}", image_size=recipe.image_size, pool=recipe.pool,
                   posemb=recipe.posemb, width=recipe.img_width, depth=recipe.img_depth,
                   mlp_dim=mlp(recipe.img_width), num_heads=recipe.heads)
    m.text.update(variant="mu", vocab_size=128, max_len=MAX_LEN, causal=recipe.loss == "softmax", pool=recipe.txt_pool,
                  width=recipe.txt_width, depth=recipe.txt_depth, mlp_dim=mlp(recipe.txt_width),
                  num_heads=recipe.heads)
    m.embed_dim, m.loss = recipe.embed_dim, recipe.loss
    m.log_scale_init, m.bias_init = recipe.log_scale_init, recipe.bias_init
    return m


def optimizer_config(recipe: Recipe) -> ml_collections.ConfigDict:
    opt = default_config().optimizer
    opt.update(lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup,
               schedule="cosine", total_steps=recipe.steps)
    return opt


class Batches:
    """Training batches: a seeded permutation per epoch, one caption drawn per example and step.

    With augmentation the train pp runs per example and step (as in the trainer); without it
    the images are preprocessed once and only the caption draw changes (much faster)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.raws = raw_examples("train", recipe.train_size, recipe.image_size, recipe.shape_groups)
        self.process = ProcessExample(pp_strings(recipe)[0], make_tokenizer("demo"), MAX_LEN)
        self.rng = np.random.default_rng([recipe.seed, 12345])
        self.order = self.rng.permutation(len(self.raws) // recipe.shape_groups)
        self.cursor = 0
        self.arrays = None if recipe.aug != "none" else fixed_arrays(
            recipe.train_size, recipe.image_size, recipe.captions, recipe.shape_groups)

    def indices(self) -> np.ndarray:
        if self.recipe.shape_groups > 1:
            return self.grouped_indices()
        out = []
        while len(out) < self.recipe.batch:
            if self.cursor == len(self.order):
                self.order, self.cursor = self.rng.permutation(len(self.raws)), 0
            take = self.order[self.cursor:self.cursor + self.recipe.batch - len(out)]
            self.cursor += len(take)
            out.extend(take)
        return np.asarray(out)

    def grouped_indices(self) -> np.ndarray:
        """Hard negatives for shape: the demo's own groups (`group_size`: examples that share
        colour, size and position and differ in shape), whole groups in a seeded order per epoch,
        as the pipeline's `GroupShuffle` reads them."""
        g, out = self.recipe.shape_groups, []
        while len(out) < self.recipe.batch:
            if self.cursor == len(self.order):
                self.order, self.cursor = self.rng.permutation(len(self.raws) // g), 0
            group = self.order[self.cursor]
            self.cursor += 1
            out.extend(range(group * g, group * g + g))
        return np.asarray(out[:self.recipe.batch])

    def next(self) -> dict:
        if self.arrays is None:
            rows = self.next_rows()
            return {"image": np.stack([r["image"] for r in rows]), "text": np.stack([r["text"] for r in rows])}
        images_u8, tokens_ncl = self.arrays
        index = self.indices()
        caption = self.rng.integers(tokens_ncl.shape[1], size=len(index))
        images = images_u8[index].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        return {"image": images, "text": tokens_ncl[index, caption]}

    def next_rows(self) -> list[dict]:
        rows = []
        for i in self.indices():
            raw = self.raws[i]
            if self.recipe.captions == "names":
                raw = {**raw, "captions": class_name_captions(raw)}
            elif self.recipe.captions == "mixed":
                raw = {**raw, "captions": mixed_captions(raw)}
            rows.append({**self.process.random_map(raw, self.rng), "label/shape": raw["label/shape"]})
        return rows


@functools.lru_cache(maxsize=4)
def fixed_arrays(size: int, image_size: int, captions: str, group_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, 3] (decoded once, no augmentation) and every caption's tokens [N, C, L]."""
    from big_contrast.data.image_ops import parse_image_pp

    pp, tok = parse_image_pp(f"decode|resize({image_size})"), make_tokenizer("demo")
    raws = raw_examples("train", size, image_size, group_size)
    images = np.stack([pp(r["image"], None) for r in raws])
    texts = [class_name_captions(r) if captions == "names" else r["captions"] for r in raws]
    tokens = np.stack([[encode_fixed(tok, t, MAX_LEN) for t in ts] for ts in texts])
    return images, tokens


def templates_for(task: str, style: str) -> tuple[str, ...]:
    """"photo": the single prompt the demo shipped with; "attr": `demo.demo_templates(task,
    'short')` ("red {}", ...); "captions": `demo.demo_templates(task)`, every caption."""
    if style == "photo":
        return ("a photo of a {}.",)
    return demo.demo_templates(task, "short" if style == "attr" else "captions")


def evaluate(recipe: Recipe, model, probe: bool = True) -> dict:
    raws = raw_examples("eval", recipe.eval_size, recipe.image_size)
    process = ProcessExample(pp_strings(recipe)[1], make_tokenizer("demo"), MAX_LEN)
    rows = [process.random_map(raw, np.random.default_rng([7, i])) for i, raw in enumerate(raws)]
    if recipe.captions == "names":
        tok = make_tokenizer("demo")
        for row, raw in zip(rows, raws):
            row["text"] = encode_fixed(tok, class_name_captions(raw)[0], MAX_LEN)
    images = np.stack([r["image"] for r in rows])
    texts = np.stack([r["text"] for r in rows])
    embed_i, embed_t = jax.jit(model.embed_images), jax.jit(model.embed_texts)
    zimg, ztxt = np.asarray(embed_i(images)), np.asarray(embed_t(texts))
    out = {k: v for k, v in recall_at_k(zimg, ztxt, np.arange(len(zimg)), ks=(1,)).items()}
    tok = make_tokenizer("demo")
    held = np.array([(demo.demo_class_names("colour")[r["label/colour"]], demo.SHAPES[r["label/shape"]])
                     in set(demo.HELD_OUT) for r in raws])
    for style, suffix in (("attr", ""), ("photo", "@photo"), ("captions", "@captions")):
        for task in ("shape", "colour", "colour_shape"):
            names, temps = demo.demo_class_names(task), templates_for(task, style)
            prompts = [t.format(n) for n in names for t in temps]
            zp = np.asarray(embed_t(np.stack([encode_fixed(tok, p, MAX_LEN) for p in prompts])))
            classifier = classifier_from_prompt_embeddings(zp.reshape(len(names), len(temps), -1))
            labels = np.array([r[f"label/{task}"] for r in raws])
            out[f"{task}_top1{suffix}"] = topk_accuracy(zimg, classifier, labels, ks=(1,))["top1"]
            if task != "colour":
                out[f"heldout_{task}_top1{suffix}"] = topk_accuracy(
                    zimg[held], classifier, labels[held], ks=(1,))["top1"]
    if probe:
        out["probe_shape_top1"] = linear_probe(recipe, embed_i, zimg, np.array([r["label/shape"] for r in raws]))
    out["alignment"] = alignment(zimg, ztxt)
    out["uniformity_img"], out["uniformity_txt"] = uniformity(zimg), uniformity(ztxt)
    out["scale"] = float(model.scale())
    out["bias"] = float(model.bias[...]) if model.bias is not None else float("nan")
    return out


def linear_probe(recipe: Recipe, embed_images, zimg_eval, labels_eval, n_train: int = 2000) -> float:
    """Shape top-1 of a ridge-regression probe on the image embeddings (fit on train images):
    whether the image tower encodes shape at all, whatever the text side does."""
    raws = raw_examples("train", recipe.train_size, recipe.image_size)[:n_train]
    n_train = len(raws)
    process = ProcessExample(pp_strings(recipe)[1], make_tokenizer("demo"), MAX_LEN)
    images = np.stack([process.random_map(r, np.random.default_rng(0))["image"] for r in raws])
    z = np.concatenate([np.asarray(embed_images(images[i:i + 500])) for i in range(0, n_train, 500)])
    onehot = np.eye(len(demo.SHAPES))[[r["label/shape"] for r in raws]]
    x = np.concatenate([z, np.ones((n_train, 1))], 1)
    w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ onehot)
    pred = np.concatenate([zimg_eval, np.ones((len(zimg_eval), 1))], 1) @ w
    return float(np.mean(pred.argmax(1) == labels_eval))


def train_and_eval(recipe: Recipe, *, trace_every: int = 0, eval_every: int = 0, probe: bool = True) -> dict:
    """Trains `recipe` from scratch and returns the eval metrics, wall time and (optionally)
    the learned scale / bias every `trace_every` steps."""
    model = models.create(model_config(recipe), rngs=recipe.seed)
    if recipe.txt_posemb_std is not None:
        pe = model.text.posemb[...]
        model.text.posemb[...] = pe * (recipe.txt_posemb_std / float(jnp.std(pe)))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    opt = optimizer_config(recipe)
    mults = ((r"log_scale|bias", recipe.scalar_lr_mult),) if recipe.scalar_lr_mult != 1.0 else ()
    tx = make_optimizer(opt, params, lr_mults=mults)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    micro = 1 if recipe.microbatch is None else recipe.batch // recipe.microbatch
    step_fn = jax.jit(make_train_step(StepConfig(
        graphdef=graphdef, rest=rest, tx=tx, loss=LossSpec(recipe.loss, "dense"),
        lr_fn=learning_rate_schedule(opt), microbatches=micro)), donate_argnums=(0,))
    batches, trace, curve = Batches(recipe), [], []
    start = time.perf_counter()
    for step in range(recipe.steps):
        state, metrics = step_fn(state, batches.next())
        if trace_every and (step % trace_every == 0 or step == recipe.steps - 1):
            trace.append(dict(step=step + 1, loss=float(metrics["loss"]), scale=float(metrics["scale"]),
                              bias=float(metrics["bias"])))
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < recipe.steps:
            curve.append(dict(step=step + 1, **evaluate(recipe, nnx.merge(graphdef, state.params, rest), probe=False)))
            print(f"  step {step + 1}: " + " ".join(f"{k}={curve[-1][k]:.3f}" for k in CURVE_KEYS), flush=True)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - start
    result = evaluate(recipe, nnx.merge(graphdef, state.params, rest), probe=probe)
    result.update(train_s=train_s, final_loss=float(metrics["loss"]))
    if trace_every:
        result["trace"] = trace
    if eval_every:
        result["curve"] = curve
    return result


def supervised_shape(recipe: Recipe) -> dict:
    """The same image tower trained *supervised* on the shape label (a linear head, cross-entropy,
    the same optimizer, pp and steps): what the tower can learn when the signal is direct."""
    tower = models.create_image_tower(models.resolve_config(model_config(recipe)), nnx.Rngs(recipe.seed))
    head = nnx.Linear(recipe.img_width, len(demo.SHAPES), rngs=nnx.Rngs(recipe.seed + 1))
    graphdef, params = nnx.split((tower, head), nnx.Param)
    opt = optimizer_config(recipe)
    tx = make_optimizer(opt, nnx.to_pure_dict(params))
    params = nnx.to_pure_dict(params)
    opt_state = tx.init(params)

    def loss_fn(p, images, labels):
        tower, head = nnx.merge(graphdef, p)
        logits = head(tower(images))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    @jax.jit
    def step(p, opt_state, images, labels):
        grads = jax.grad(loss_fn)(p, images, labels)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax_apply(p, updates), opt_state

    batches = Batches(recipe)
    start = time.perf_counter()
    for _ in range(recipe.steps):
        rows = batches.next_rows()
        params, opt_state = step(params, opt_state, np.stack([r["image"] for r in rows]),
                                 np.array([r["label/shape"] for r in rows]))
    train_s = time.perf_counter() - start
    raws = raw_examples("eval", recipe.eval_size, recipe.image_size)
    process = ProcessExample(pp_strings(recipe)[1], make_tokenizer("demo"), MAX_LEN)
    images = np.stack([process.random_map(r, np.random.default_rng(0))["image"] for r in raws])
    tower, head = nnx.merge(graphdef, params)
    pred = np.asarray(jax.jit(lambda x: head(tower(x)))(images)).argmax(1)
    return dict(supervised_shape_top1=float(np.mean(pred == [r["label/shape"] for r in raws])), train_s=train_s)


def optax_apply(params, updates):
    import optax
    return optax.apply_updates(params, updates)
