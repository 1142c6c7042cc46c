"""The train step: towers -> embeddings -> loss engine -> gradients -> optax.

Two ways to get the same gradient:

* one pass: `jax.value_and_grad` through towers and loss together;
* micro-batch gradient caching (GradCache, Gao et al. 2021; BASIC, Pham et al. 2021), when
  `config.microbatch_size` is smaller than the per-device batch:
  1. embed the global batch micro-batch by micro-batch without keeping activations;
  2. compute the loss over the whole global batch (the sharded loss engine) and its
     gradients w.r.t. the embeddings, the scale and the bias;
  3. re-run each micro-batch under `jax.vjp` with its slice of the embedding gradients as
     cotangent and accumulate the parameter gradients; add the scale/bias path once.
  The encoders' memory is bounded by one micro-batch; the result is the one-pass gradient
  up to float round-off. The towers are deterministic functions of (params, batch, step):
  patch dropout draws its masks from the step and each example's global row index
  (`patch_keys`), so both passes, and a resumed run, see the same computation.

Steps 1 and 3 run on each device's own rows under `jax.shard_map` (`_OwnRows`): micro-batch
`c` holds rows `c*m ... (c+1)*m` of every device's `b` local rows, slicing never moves data,
the loops contain no collective over `data`, and the parameter gradients are all-reduced
once per step, after the loop (GSPMD would all-reduce them inside the loop body, once per
micro-batch). FSDP-sharded parameters are gathered once per pass and their gradients
reduce-scattered over `fsdp` per micro-batch, so accumulators stay sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from big_contrast import losses, sharding
from big_contrast.data.device_ops import normalize_on_device
from big_contrast.models.naflex import image_input
from big_contrast.train.ema import EmaConfig, ema_update


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any = None  # the EMA of the parameters (train/ema.py), sharded like them; None: config.ema off


def _state_children(state: TrainState):
    """The state's pytree children; without an EMA the tree is (step, params, opt_state) as
    before EMA existed, so orbax reads and writes checkpoints of runs without EMA unchanged
    (a None child would be saved as a key those checkpoints lack)."""
    names = ("step", "params", "opt_state") + (("ema",) if state.ema is not None else ())
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], state.ema is not None


jax.tree_util.register_pytree_with_keys(
    TrainState, _state_children, lambda has_ema, children: TrainState(*children),
    flatten_func=lambda state: ([c for _, c in _state_children(state)[0]], state.ema is not None))


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss and how the engine computes it."""

    name: str  # "softmax" | "sigmoid"
    impl: str = "ring"
    block: int | None = None
    dtype: str | None = None  # e.g. "bfloat16": embeddings enter the loss in it (f32 accumulation)
    objective: Any = None  # a losses.Objective (config.loss_objective) instead of `name` alone

    def __call__(self, zimg, ztxt, scale, bias, mesh, axis, teacher=None, teacher_scale=None):
        """(loss, {term: unweighted value}); no terms for the plain softmax / sigmoid."""
        if self.dtype is not None:
            zimg, ztxt = zimg.astype(self.dtype), ztxt.astype(self.dtype)
        engine = dict(impl=self.impl, mesh=mesh, axis=axis, block=self.block)
        if self.objective is not None:
            return losses.combined_loss(self.objective, zimg, ztxt, scale, bias, teacher=teacher,
                                        teacher_scale=teacher_scale, with_terms=True, **engine)
        if self.name == "softmax":
            return losses.softmax_loss(zimg, ztxt, scale, **engine), {}
        return losses.sigmoid_loss(zimg, ztxt, scale, bias, **engine), {}


def _scale_and_bias(model):
    bias = model.bias[...] if model.bias is not None else jnp.zeros((), jnp.float32)
    return model.scale(), bias


def _microbatches(x, k):
    """[b, ...] -> [k, b/k, ...]: a device's own rows, cut into k micro-batches (each leaf of a tree)."""
    return jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), x)


def _from_microbatches(x):
    """Inverse of `_microbatches`."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def patch_keys(step, rows, seed=0):
    """Per-example PRNG keys for patch dropout, from the step and each row's global index, so
    both passes of gradient caching and a resumed run draw the same masks."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(rows)


def loss_and_grads(graphdef, params, rest, batch, *, loss: LossSpec, mesh, axis, microbatches,
                   step=None, seed=0, teacher_params=None, teacher_embeddings=None, terms=None,
                   self_distill_teacher=None, frozen_teacher=None):
    """(loss, aux, grads) for one global batch, in one pass or with gradient caching.

    `step` (the train step) seeds the image tower's patch dropout; None turns it off.
    Micro-batches are cut on each device's own rows, so the mesh implies the shard count.
    `teacher_params` (the EMA of `params`: a momentum teacher) are embedded without gradient
    and without patch dropout, and their embeddings and scale feed the objective's teacher
    terms. `teacher_embeddings` ({"image": [B, D_t], "text": ...}, e.g. a frozen model's,
    computed outside the step or stored beside the data) feed them as they are, with the
    student's scale as the teacher's. `terms` (a `siglip2.Terms`, or None): SigLIP 2's
    per-example terms, added to the loss. `aux["terms"]` holds the extra metrics by name
    (`loss/<objective term>`, `loss/caption`, `loss/contrastive`). `self_distill_teacher` (the
    EMA's parameters, with `terms` a `self_distill.SelfDistillTerms`): SILC / TIPS's teacher.
    `frozen_teacher` (a `train.teacher.Bound`: another workdir's model and its parameters) embeds
    the batch without gradient, micro-batch by micro-batch under gradient caching; its own scale
    is the teacher's.
    """
    n_out = 2 if terms is None else 3  # embed's outputs: zimg, ztxt (+ the terms' per-example sums)

    def embed(p, images, texts, rows, *extras, teacher=False):  # extras: LocCa's targets, SILC / TIPS row inputs
        model = nnx.merge(graphdef, p, rest)
        keys = None if step is None or teacher else patch_keys(step, rows, seed)
        if terms is not None and not teacher:  # SigLIP 2 (train/siglip2.py): + per-example sums
            return terms.embed(model, images, texts, keys, *extras)
        return model.embed_images(images, keys), model.embed_texts(texts)

    def teacher_inputs(embedded):  # the teacher's embeddings and scale, no gradient to anything
        if teacher_params is None:
            if frozen is not None:  # issue 23: a frozen teacher of another workdir (train/teacher.py)
                return dict(teacher=frozen[0], teacher_scale=frozen[1])
            return {} if teacher_embeddings is None else dict(teacher=jax.lax.stop_gradient(teacher_embeddings))
        zimg_t, ztxt_t = jax.lax.stop_gradient(embedded)
        return dict(teacher={"image": zimg_t, "text": ztxt_t},
                    teacher_scale=jax.lax.stop_gradient(scalars(teacher_params)[0]))

    def with_terms(value, objective_terms, sums):
        """The loss plus SigLIP 2's weighted extra terms, and every extra metric by name."""
        metrics = {f"loss/{name}": v for name, v in objective_terms.items()}
        if terms is None:
            return value, metrics
        extra, term_metrics = terms.total(sums, step)
        return value + extra, {**metrics, **term_metrics, "loss/contrastive": value}

    def scalars(p):
        return _scale_and_bias(nnx.merge(graphdef, p, rest))

    images = image_input(batch)  # batch["image"], or a NaFlex batch's NaflexImages (issue 22)
    inputs = (images, batch["text"], jnp.arange(batch["text"].shape[0], dtype=jnp.int32))
    inputs += () if terms is None else terms.batch_fields(batch)  # LocCa: the decoder's target fields
    if self_distill_teacher is not None:  # SILC / TIPS (train/self_distill.py): the teacher's targets per row
        inputs += (_self_distill_inputs(graphdef, rest, terms, self_distill_teacher, batch, mesh, axis, microbatches),)
    frozen = None if frozen_teacher is None else frozen_teacher.embeddings(  # issue 23: train/teacher.py
        batch["image"], batch["text"], mesh=mesh, axis=axis, microbatches=microbatches)
    if microbatches <= 1:
        teacher = teacher_inputs(None if teacher_params is None else embed(teacher_params, *inputs, teacher=True))

        def full_loss(p):
            zimg, ztxt, *sums = embed(p, *inputs)
            scale, bias = scalars(p)
            value, metrics = with_terms(*loss(zimg, ztxt, scale, bias, mesh, axis, **teacher), *sums or (None,))
            return value, (scale, bias, metrics)

        (value, (scale, bias, metrics)), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        return value, dict(scale=scale, bias=bias, terms=metrics), grads

    on_devices = _OwnRows(mesh, axis, None if mesh is None else _param_specs(graphdef, params, rest, mesh))

    # 1. embeddings, micro-batch by micro-batch, no activations kept
    def embed_all(params, *rows, teacher=False):
        _, z_k = jax.lax.scan(lambda _, rows_c: (None, embed(params, *rows_c, teacher=teacher)), None,
                              tuple(_microbatches(x, microbatches) for x in rows))
        return jax.tree.map(_from_microbatches, z_k)

    zimg, ztxt, *sums = on_devices(embed_all, params, inputs, reduce=False)
    teacher = teacher_inputs(None if teacher_params is None else on_devices(
        functools.partial(embed_all, teacher=True), teacher_params, inputs, reduce=False))

    # 2. the loss over the whole global batch and its embedding / scalar gradients
    (scale, bias), scalars_vjp = jax.vjp(scalars, params)
    (value, objective_terms), (dzimg, dztxt, dscale, dbias) = jax.value_and_grad(
        lambda zi, zt, s, b: loss(zi, zt, s, b, mesh, axis, **teacher), argnums=(0, 1, 2, 3), has_aux=True
    )(zimg, ztxt, scale, bias)
    (grads,) = scalars_vjp((dscale, dbias))
    value, metrics = with_terms(value, objective_terms, *sums or (None,))
    # SigLIP 2: each row's cotangent of its per-example sums (weight / the global denominator)
    dsums = [] if terms is None else [jax.grad(lambda s: terms.total(s, step)[0])(sums[0])]

    # 3. parameter gradients, micro-batch by micro-batch, reduced over the devices once
    def backprop_all(params, *rows):
        def backprop_one(grads, rows_c):
            _, embed_vjp = jax.vjp(lambda p: embed(p, *rows_c[:-n_out]), params)
            (grads_c,) = embed_vjp(tuple(rows_c[-n_out:]))
            return jax.tree.map(jnp.add, grads, on_devices.scatter(grads_c)), None

        zeros = on_devices.scattered_zeros(params)
        grads, _ = jax.lax.scan(backprop_one, zeros, tuple(_microbatches(x, microbatches) for x in rows))
        return grads

    grads_embed = on_devices(backprop_all, params, (*inputs, dzimg, dztxt, *dsums), reduce=True)
    return value, dict(scale=scale, bias=bias, terms=metrics), jax.tree.map(jnp.add, grads, grads_embed)


def _self_distill_inputs(graphdef, rest, terms, teacher, batch, mesh, axis, microbatches):
    """SILC / TIPS: the EMA teacher's head scores of every row (a micro-batch at a time on each
    device's own rows under gradient caching), then its targets over the global batch."""
    def scores(p, images):
        return terms.teacher_scores(nnx.merge(graphdef, p, rest), images)

    if microbatches > 1:
        def scores_all(p, images):
            _, s_k = jax.lax.scan(lambda _, x: (None, scores(p, x)), None, _microbatches(images, microbatches))
            return jax.tree.map(_from_microbatches, s_k)

        on_devices = _OwnRows(mesh, axis, None if mesh is None else _param_specs(graphdef, teacher, rest, mesh))
        teacher_scores = on_devices(scores_all, teacher, (batch["image"],), reduce=False)
    else:
        teacher_scores = scores(teacher, batch["image"])
    return terms.row_inputs(batch, teacher_scores)


def _param_specs(graphdef, params, rest, mesh):
    """Each parameter's PartitionSpec on `mesh`, from its logical axis names (sharding rules)."""
    state = nnx.state(nnx.merge(graphdef, params, rest), nnx.Param)
    return jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(sharding.state_shardings(state, mesh)))


class _OwnRows:
    """Runs `fn(params, *rows)` on every device's own rows: `jax.shard_map` over the batch axes.

    Left to GSPMD, a micro-batch scan all-reduces every parameter gradient inside the loop
    body, once per micro-batch, and under FSDP it may all-reduce activations there too. Here
    each device gets its own copy of the parameters (gathered once when they are FSDP-sharded;
    a per-device value, so its vjp has no implicit psum) and loops over its own rows. The
    gradient accumulator keeps each parameter's sharding over the batch axes: a parameter
    sharded over `fsdp` is reduce-scattered over `fsdp` in each micro-batch (`scatter`), so its
    accumulator stays sharded; with `reduce=True` one `psum` after the loop sums the rest
    (over `data`: the only all-reduce of the gradients in the step). Other mesh axes (tensor)
    stay automatic. Without a mesh, `fn` runs as it is.
    """

    def __init__(self, mesh, axis, param_specs):
        self.mesh = mesh
        self.axes = () if mesh is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        # Per parameter: {dimension: batch axes it is sharded over}. On Explicit meshes every
        # accumulator is kept whole (psum_scatter fails to trace under sharding-in-types in
        # jax 0.10), so FSDP gradients are reduced once after the loop at full size there.
        explicit = mesh is not None and _is_explicit(mesh, self.axes)
        self.dims = None if mesh is None else jax.tree.map(
            lambda spec: {} if explicit else self._batch_dims(spec), param_specs,
            is_leaf=lambda x: isinstance(x, P))

    def _batch_dims(self, spec):
        dims = {}
        for d, entry in enumerate(spec):
            names = tuple(n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if n in self.axes)
            if names:
                dims[d] = names
        return dims

    def _map(self, fn, tree):
        return jax.tree.map(fn, tree, self.dims)  # `dims` has `tree`'s structure as a prefix

    def scatter(self, grads):
        """Inside the loop: reduce-scatter each gradient over the batch axes its parameter is
        sharded over (FSDP); the identity for replicated parameters and without a mesh."""
        if self.mesh is None:
            return grads

        def one(g, dims):
            for d, names in dims.items():
                g = jax.lax.psum_scatter(g, names, scatter_dimension=d, tiled=True)
            return g

        return self._map(one, grads)

    def scattered_zeros(self, params):
        if self.mesh is None:
            return jax.tree.map(jnp.zeros_like, params)

        def one(x, dims):  # x: the per-device parameter; its zeros keep its type (and sharding)
            shard = {d: x.shape[d] // math.prod(self.mesh.shape[n] for n in names) for d, names in dims.items()}
            return jnp.zeros_like(x)[tuple(slice(0, shard.get(d)) for d in range(x.ndim))]

        return self._map(one, params)

    def __call__(self, fn, params, rows, *, reduce):
        if self.mesh is None:
            return fn(params, *rows)
        mesh, axes, rows_spec = self.mesh, self.axes, P(self.axes)

        def sum_rest(g, dims):
            scattered = {n for names in dims.values() for n in names}
            rest = tuple(a for a in axes if a not in scattered)
            return jax.lax.psum(g, rest) if rest else g

        def body(params, *rows):
            params = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), params)
            out = fn(params, *rows)
            return self._map(sum_rest, out) if reduce else out

        if _is_explicit(mesh, axes):  # shard_map wants its inputs laid out as its in_specs
            place = lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec))  # noqa: E731
            params = jax.tree.map(lambda x: place(x, _without_axes(jax.typeof(x).sharding.spec, axes)),
                                  params)
            rows = jax.tree.map(lambda x: place(x, rows_spec), rows)  # a row may be a tree (NaflexImages)
        grad_specs = self._map(lambda x, dims: P(*(dims.get(d) for d in range(x.ndim))), params)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(),) + (rows_spec,) * len(rows),
                             out_specs=grad_specs if reduce else rows_spec, axis_names=set(axes))(params, *rows)


def _is_explicit(mesh, axes):
    return any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in axes)


def _without_axes(spec, axes):
    """`spec` with the mesh axes `axes` removed (those dimensions become replicated over them)."""

    def keep(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n not in axes)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(entry) for entry in spec))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a train step holds fixed over a run, bound once (`make_train_step`) so the jitted
    step is `step(state, batch)`. `axis`: the mesh's batch axes (`sharding.batch_axes`).
    `image_norm` (a `device_ops.DeviceNormalization`) turns uint8 images into the model's float
    input on the device; float images pass through. `seed` and the step number seed patch
    dropout."""

    graphdef: Any
    rest: Any
    tx: optax.GradientTransformation
    loss: LossSpec
    lr_fn: Any  # step -> learning rate, for the metrics
    mesh: jax.sharding.Mesh | None = None
    axis: Any = None
    microbatches: int = 1
    seed: int = 0
    image_norm: Any = None
    terms: Any = None  # SigLIP 2's extra terms (train/siglip2.py `Terms`), or None
    ema: EmaConfig | None = None  # config.ema: the state's EMA is updated after each optimizer update
    teacher: str | None = None  # "ema": the state's EMA is the objective's (momentum) teacher;
    # "data": the batch's `teacher_image` / `teacher_text` fields are the teacher's embeddings
    frozen_teacher: Any = None  # issue 23: a big_contrast.teacher.FrozenTeacher (its params: the step's 3rd argument)


def make_train_step(config: StepConfig):
    """`step(state, batch) -> (state, metrics)` with `config` bound (jit it)."""
    return functools.partial(train_step, config=config)


def train_step(state: TrainState, batch, teacher_params=None, *, config: StepConfig):
    """One optimizer step; returns the new state and scalar metrics. `teacher_params`: the
    frozen teacher's parameters (`config.frozen_teacher`), passed in, never updated."""
    c = config
    if "image" in batch:  # a NaFlex batch (issue 22) holds normalised patches instead
        batch = {**batch, "image": normalize_on_device(batch["image"], c.image_norm)}
    if "local_images" in batch:  # SILC's local crops (train/self_distill.py), normalised like the images
        batch["local_images"] = normalize_on_device(batch["local_images"], c.image_norm)
    value, aux, grads = loss_and_grads(
        c.graphdef, state.params, c.rest, batch, loss=c.loss, mesh=c.mesh, axis=c.axis,
        microbatches=c.microbatches, step=state.step, seed=c.seed, terms=c.terms,
        teacher_params=state.ema if c.teacher == "ema" else None,
        teacher_embeddings=({"image": batch["teacher_image"], "text": batch["teacher_text"]}
                            if c.teacher == "data" else None),
        self_distill_teacher=state.ema if hasattr(c.terms, "teacher_scores") else None,  # SILC / TIPS
        frozen_teacher=None if c.frozen_teacher is None else _bound_teacher(c.frozen_teacher, teacher_params),
    )
    updates, opt_state = c.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema if c.ema is None else ema_update(state.ema, params, state.step + 1, c.ema)
    metrics = dict(
        loss=value,
        scale=aux["scale"],
        bias=aux["bias"],
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        learning_rate=c.lr_fn(state.step),
        **aux["terms"],  # loss/<objective term>; SigLIP 2: loss/caption, loss/contrastive
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def _bound_teacher(teacher, params):
    """Issue 23: the frozen teacher with its parameters (imported here: the step alone needs no
    checkpoint or data stack, experiments/step_throughput)."""
    from big_contrast.train.teacher import Bound

    return Bound(teacher, params)
