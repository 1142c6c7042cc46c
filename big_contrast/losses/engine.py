"""The general contrastive engine: any weighted sum of objectives (objectives.py) with the
dense, all-gather or ring scheme, exact gradients in the student inputs, none in the teacher's.

Every objective is "statistics of fields, then a finishing formula": per-row (and per-column)
reductions over the global batch of elementwise functions of the logit tile, and a formula of
those O(B) numbers and the local rows. So one engine serves them all:

* dense: the full B x B fields, reductions with jnp, gradients by autodiff (the reference);
* all_gather: local rows against gathered columns (row statistics) and gathered rows against
  local columns (column statistics), autodiff through the gathers;
* ring: one traversal folds every statistic of every term online tile by tile (column
  statistics travel with their text block, like the log-sum-exps of the plain softmax ring);
  a `jax.custom_vjp` keeps the final statistics (O(b) per statistic) and the inputs
  (O(b * D)) as residuals; the backward pass is one more ring that recomputes each tile, gets
  dloss/dfield from the statistics (statistics.py) and pulls it back through the fields with
  `jax.vjp` of the tile: 4 tile matmuls per objective (plus the teacher's, see below).

A teacher (frozen tower, imported model or the EMA of the student) brings its own image
and/or text embeddings; they travel in the ring beside the student's text block and every
tile recomputes their similarities (one more t x t matmul per teacher similarity per pass),
so soft targets never need a B x B tensor. They get a zero cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from big_contrast.losses import checks, objectives as obj
from big_contrast.losses.dense import _gathered
from big_contrast.losses.ring import Ring, _on_mesh, default_block
from big_contrast.losses.statistics import KINDS
from big_contrast.losses.tiles import F32, Tiling, for_each_tile


class View:
    """One tile of the (row, column) pairs: its positives and, computed only when a field asks,
    the teacher's similarities. `rows`, `cols`: {"image": u, "text": v} teacher embeddings."""

    def __init__(self, positive, rows, cols, teacher_scale):
        self.positive, self._rows, self._cols, self._teacher_scale = positive, rows, cols, teacher_scale

    @functools.cached_property
    def teacher_logits(self):
        return self._teacher_scale * _dot(self._rows["image"], self._cols["text"].T)

    def intra(self, tower):
        return _dot(self._rows[tower], self._cols[tower].T)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32)


def _fields_of(stats):
    """The field keys the statistics read, each once."""
    keys = dict.fromkeys(f for stat in stats for f in stat.fields)
    return tuple(keys)


def _reduce_stats(stats, view, cos, scale, bias):
    """{stat key: value} of full-row (or full-column) reductions over one view."""
    fields = obj.eval_fields(_fields_of(stats), view, cos, scale, bias)
    axis = {"row": 1, "col": 0}
    return {s.key: KINDS[s.kind].reduce([fields[f] for f in s.fields], axis[s.direction]) for s in stats}


def _values(objective, stats, local, psum):
    """The vector of term values from the statistics and the local rows."""
    partials = [term.partials(stats, local) for _, term in objective.terms]
    return jnp.stack([term.combine(psum(p), local.batch) for (_, term), p in zip(objective.terms, partials)])


def _split(stats, direction):
    return tuple(s for s in stats if s.direction == direction)


# ----------------------------------------------------------------------------- dense


def dense_values(objective, zimg, ztxt, teacher, scale, bias, teacher_scale):
    batch = zimg.shape[0]
    x, y = zimg.astype(F32), ztxt.astype(F32)
    cols = {k: _gathered(v) for k, v in teacher.items()}
    view = View(jnp.eye(batch, dtype=bool), teacher, cols, teacher_scale)
    cos = _dot(x, _gathered(y).T)
    stats = _reduce_stats(objective.stats, view, cos, scale, bias)
    return _values(objective, stats, obj.Local(x, y, scale, bias, batch), lambda p: p)


# ----------------------------------------------------------------------------- all-gather


def all_gather_values_shard(zimg, ztxt, teacher, scale, bias, teacher_scale, *, objective, axis, batch):
    """Per-device body (inside shard_map): the term values, replicated."""
    b = zimg.shape[0]
    local_ids = lax.axis_index(axis) * b + jnp.arange(b)
    gather = lambda z: lax.all_gather(z, axis, tiled=True)  # noqa: E731
    teacher_all = {k: gather(v) for k, v in teacher.items()}
    stats = {}
    row_stats, col_stats = _split(objective.stats, "row"), _split(objective.stats, "col")
    if row_stats:  # local images against every text
        view = View(local_ids[:, None] == jnp.arange(batch)[None, :], teacher, teacher_all, teacher_scale)
        stats.update(_reduce_stats(row_stats, view, _dot(zimg, gather(ztxt).T), scale, bias))
    if col_stats:  # every image against the local texts
        view = View(jnp.arange(batch)[:, None] == local_ids[None, :], teacher_all, teacher, teacher_scale)
        stats.update(_reduce_stats(col_stats, view, _dot(gather(zimg), ztxt.T), scale, bias))
    local = obj.Local(zimg.astype(F32), ztxt.astype(F32), scale, bias, batch)
    return _values(objective, stats, local, lambda p: lax.psum(p, axis))


# ----------------------------------------------------------------------------- ring


class _RingTiles:
    """A device's rows cut into tiles, and how to look at one (row tile, column tile) pair."""

    def __init__(self, objective, zimg, ztxt, teacher, block, ring):
        self.objective, self.ring = objective, ring
        self.b, self.dim = zimg.shape
        self.tiling = Tiling(self.b, min(block, self.b))
        self.x = self.tiling.to_tiles(zimg)
        self.rows = {k: self.tiling.to_tiles(v) for k, v in teacher.items()}
        self.travelling = (self.tiling.to_tiles(ztxt), dict(self.rows))
        self.fields = _fields_of(objective.stats)
        self.row_stats, self.col_stats = _split(objective.stats, "row"), _split(objective.stats, "col")

    def view(self, i, j, cols, src, teacher_scale):
        ids = jnp.arange(self.tiling.t)
        positive = (self.ring.me * self.b + i * self.tiling.t + ids)[:, None] == (src * self.b + j * self.tiling.t + ids)[None, :]
        return View(positive, {k: v[i] for k, v in self.rows.items()}, {k: v[j] for k, v in cols.items()}, teacher_scale)

    def empty(self, stats):
        shape = (self.tiling.n_tiles, self.tiling.t)
        return {s.key: KINDS[s.kind].init(shape) for s in stats}

    def to_rows(self, parts):
        return tuple(self.tiling.from_tiles(p) for p in parts)

    def to_tiles(self, parts):
        return tuple(self.tiling.to_tiles(p[:, None])[..., 0] for p in parts)


def _merge_states(stats):
    def merge(a, b):
        return {s.key: KINDS[s.kind].merge(a[s.key], b[s.key]) for s in stats}

    return merge


def _at(state, i):
    return tuple(part[i] for part in state)


def _set(state, i, value):
    return tuple(part.at[i].set(v) for part, v in zip(state, value))


def ring_stats_shard(zimg, ztxt, teacher, scale, bias, teacher_scale, *, objective, axis, n, block, batch, residuals):
    """Per-device forward ring: the term values; with `residuals` also every final statistic."""
    ring = Ring(axis, n)
    rt = _RingTiles(objective, zimg, ztxt, teacher, block, ring)

    def compute(row_state, block_data, col_state, src):
        y_ntd, cols = block_data

        def body(i, j, carry):
            row_state, col_state = carry
            view = rt.view(i, j, cols, src, teacher_scale)
            fields = obj.eval_fields(rt.fields, view, _dot(rt.x[i], y_ntd[j].T), scale, bias)
            valid = rt.tiling.valid_tt(i, j)
            row_state, col_state = dict(row_state), dict(col_state)
            for s in rt.row_stats:
                kind = KINDS[s.kind]
                row_state[s.key] = _set(row_state[s.key], i, kind.fold(_at(row_state[s.key], i), [fields[f] for f in s.fields], 1, valid))
            for s in rt.col_stats:
                kind = KINDS[s.kind]
                col_state[s.key] = _set(col_state[s.key], j, kind.fold(_at(col_state[s.key], j), [fields[f] for f in s.fields], 0, valid))
            return row_state, col_state

        return for_each_tile(rt.tiling, body, (row_state, col_state))

    row_state, col_state = ring.visit_all_blocks(
        compute, rt.empty(rt.row_stats), rt.travelling, rt.empty(rt.col_stats), _merge_states(rt.col_stats))
    col_state = ring.shift(col_state)  # home, next to the text rows they belong to
    states = {**row_state, **col_state}
    final = {s.key: rt.to_rows(KINDS[s.kind].finalize(states[s.key])) for s in objective.stats}
    values = _values(objective, _stat_values(objective, final), _local(zimg, ztxt, scale, bias, batch), ring.psum)
    return (values, final) if residuals else values


def _stat_values(objective, final):
    return {s.key: KINDS[s.kind].value(final[s.key]) for s in objective.stats}


def _local(zimg, ztxt, scale, bias, batch):
    return obj.Local(zimg.astype(F32), ztxt.astype(F32), scale, bias, batch)


def _finish_cotangents(objective, final, zimg, ztxt, scale, bias, ct, ring, batch):
    """Cotangents of the final statistics and of the local inputs, from the values' cotangent.

    The values are combine(psum(partials)): the cotangent of the (replicated) totals comes
    from combine alone, and every device's partials share it."""
    x, y = zimg.astype(F32), ztxt.astype(F32)

    def partials(stat_values, x, y, scale, bias):
        local = obj.Local(x, y, scale, bias, batch)
        return [term.partials(stat_values, local) for _, term in objective.terms]

    # Varying copies of the scalars: their cotangents stay per-device partials (summed once by
    # the caller) instead of an implicit psum in the transpose.
    primal = (_stat_values(objective, final), x, y, ring.per_device(scale), ring.per_device(bias))
    parts, pullback = jax.vjp(partials, *primal)
    totals = [ring.psum(p) for p in parts]
    combine = lambda totals: jnp.stack([t.combine(tot, batch) for (_, t), tot in zip(objective.terms, totals)])  # noqa: E731
    _, combine_pullback = jax.vjp(combine, totals)
    (ct_totals,) = combine_pullback(ct)
    return pullback(ring.per_device(ct_totals))


def _tile_cotangents(rt, fields, row_res, col_res, i, j):
    """dloss/dF_ij of every field of tile (i, j), summed over the statistics that read it;
    zero on padding (where a padded row's residuals are not statistics)."""
    cot = {f: jnp.zeros_like(v) for f, v in fields.items()}
    for stats, res, axis, at in ((rt.row_stats, row_res, 1, i), (rt.col_stats, col_res, 0, j)):
        for s in stats:
            residual, ct_stat = jax.tree.map(lambda a: a[at], res[s.key])
            parts = KINDS[s.kind].field_cotangents(residual, ct_stat, [fields[f] for f in s.fields], axis)
            for f, part in zip(s.fields, parts):
                cot[f] = cot[f] + part
    valid = rt.tiling.valid_tt(i, j)
    if valid is not None:
        cot = {f: jnp.where(valid, v, 0.0) for f, v in cot.items()}
    return cot


def ring_grad_shard(zimg, ztxt, teacher, scale, bias, teacher_scale, final, ct, *, objective, axis, n, block, batch):
    """Per-device backward ring: (dzimg, dztxt, dscale, dbias)."""
    ring = Ring(axis, n)
    rt = _RingTiles(objective, zimg, ztxt, teacher, block, ring)
    ct_stats, dx_local, dy_local, dscale, dbias = _finish_cotangents(
        objective, final, zimg, ztxt, scale, bias, ct, ring, batch)
    as_tiles = lambda tree: jax.tree.map(lambda p: rt.to_tiles((p,))[0], tree)  # noqa: E731
    row_res = {s.key: as_tiles((final[s.key], ct_stats[s.key])) for s in rt.row_stats}
    col_res = {s.key: as_tiles((final[s.key], ct_stats[s.key])) for s in rt.col_stats}
    dtype = zimg.dtype
    scale_var, bias_var = ring.per_device(scale), ring.per_device(bias)  # see _finish_cotangents

    def compute(local, block_data, dy_ntd, src):
        (y_ntd, cols), col_res = block_data

        def body(i, j, carry):
            local, dy_ntd = carry
            view = rt.view(i, j, cols, src, teacher_scale)
            x_td, y_td = rt.x[i], y_ntd[j]
            field_fn = lambda cos, s, bb: obj.eval_fields(rt.fields, view, cos, s, bb)  # noqa: E731
            fields, pullback = jax.vjp(field_fn, _dot(x_td, y_td.T), scale_var, bias_var)
            g_tt, ds, db = pullback(_tile_cotangents(rt, fields, row_res, col_res, i, j))
            g_lo = g_tt.astype(dtype)
            local = dict(dx=local["dx"].at[i].add(_dot(g_lo, y_td)), dscale=local["dscale"] + ds, dbias=local["dbias"] + db)
            return local, dy_ntd.at[j].add(_dot(g_lo.T, x_td))

        return for_each_tile(rt.tiling, body, (local, dy_ntd))

    zeros_ntd = jnp.zeros((rt.tiling.n_tiles, rt.tiling.t, rt.dim), F32)
    local = dict(dx=zeros_ntd, dscale=jnp.zeros((), F32), dbias=jnp.zeros((), F32))
    local, dy_ntd = ring.visit_all_blocks(compute, local, (rt.travelling, col_res), zeros_ntd, lambda a, b: a + b)
    dy_ntd = ring.shift(dy_ntd)
    dzimg = rt.tiling.from_tiles(local["dx"]) + dx_local
    dztxt = rt.tiling.from_tiles(dy_ntd) + dy_local
    dscale = ring.psum(local["dscale"] + dscale)
    dbias = ring.psum(local["dbias"] + dbias)
    return dzimg.astype(zimg.dtype), dztxt.astype(ztxt.dtype), dscale, dbias


@functools.lru_cache(maxsize=None)
def ring_objective(objective, mesh, axis, n, block, batch, towers):
    """A differentiable `(zimg, ztxt, teacher, scale, bias, teacher_scale) -> values`."""
    rows, rep = P(axis, None), P()
    vec = P(axis)
    teacher_spec = {k: rows for k in towers}
    in_specs = (rows, rows, teacher_spec, rep, rep, rep)
    final_spec = {s.key: (vec,) * len(KINDS[s.kind].init((1,))) for s in objective.stats}
    kw = dict(objective=objective, axis=axis, n=n, block=block, batch=batch)
    value = _on_mesh(functools.partial(ring_stats_shard, residuals=False, **kw), mesh, in_specs, rep)
    stats = _on_mesh(functools.partial(ring_stats_shard, residuals=True, **kw), mesh, in_specs, (rep, final_spec))
    grads = _on_mesh(functools.partial(ring_grad_shard, **kw), mesh, in_specs + (final_spec, rep), (rows, rows, rep, rep))

    @jax.custom_vjp
    def values(zimg, ztxt, teacher, scale, bias, teacher_scale):
        return value(zimg, ztxt, teacher, scale, bias, teacher_scale)

    def values_fwd(*args):
        out, final = stats(*args)
        return out, (args, final)

    def values_bwd(residuals, ct):
        args, final = residuals
        dzimg, dztxt, dscale, dbias = grads(*args, final, ct)
        zeros = jax.tree.map(jnp.zeros_like, args[2])  # the teacher is frozen: no gradient
        return dzimg, dztxt, zeros, dscale, dbias, jnp.zeros_like(args[5])

    values.defvjp(values_fwd, values_bwd)
    return values


# ----------------------------------------------------------------------------- entry point


def _teacher_dict(objective, teacher, zimg):
    """{"image": u, "text": v} with exactly the towers the objective uses."""
    if teacher is None:
        teacher = {}
    elif not isinstance(teacher, dict):
        teacher = dict(zip(("image", "text"), teacher))
    out = {}
    for tower in objective.teacher_towers:
        z = teacher.get(tower)
        obj._check(z is not None, f"The objective {objective} needs the teacher's {tower} embeddings; pass "
                                  f"teacher={{'{tower}': [B, D_teacher] array, ...}}.")
        obj._check(jnp.ndim(z) == 2 and z.shape[0] == zimg.shape[0],
                   f"The teacher's {tower} embeddings must be [{zimg.shape[0]}, D_teacher] like the batch, "
                   f"got shape {tuple(jnp.shape(z))}.")
        out[tower] = lax.stop_gradient(z)
    return out


def objective_values(objective, zimg, ztxt, scale, bias=0.0, *, teacher=None, teacher_scale=None,
                     impl="ring", mesh=None, axis="data", block=None):
    """The float32 vector of the (unweighted) term values of `objective`, in its order.

    `objective`: an Objective or anything `parse_objective` reads. `teacher`: {"image": u,
    "text": v} (or a tuple (u, v)) of [B, D_t] teacher embeddings sharded like the batch, for
    the terms that use them; they receive no gradient. `teacher_scale`: the teacher's logit
    scale (default: the student's `scale`, without gradient). Everything else as softmax_loss.
    """
    from big_contrast.losses import _layout, _place_rows  # the package's own placement rules

    objective = obj.parse_objective(objective)
    checks.check_loss_inputs(zimg, ztxt, scale, bias, impl=impl, mesh=mesh, axis=axis, block=block)
    teacher = _teacher_dict(objective, teacher, zimg)
    place = lambda z: _place_rows(z, mesh, axis)  # noqa: E731
    zimg, ztxt, teacher = place(zimg), place(ztxt), {k: place(v) for k, v in teacher.items()}
    scale, bias = jnp.asarray(scale, F32), jnp.asarray(bias, F32)
    teacher_scale = lax.stop_gradient(scale if teacher_scale is None else jnp.asarray(teacher_scale, F32))
    args = (zimg, ztxt, teacher, scale, bias, teacher_scale)
    if impl == "dense":
        return dense_values(objective, *args)
    layout = _layout(zimg, mesh, axis)
    if impl == "all_gather":
        return _all_gather(objective, layout, tuple(teacher))(*args)
    fn = ring_objective(objective, *layout, block or default_block(mesh), zimg.shape[0], tuple(teacher))
    return fn(*args)


def combined_loss(objective, zimg, ztxt, scale, bias=0.0, *, teacher=None, teacher_scale=None,
                  impl="ring", mesh=None, axis="data", block=None, with_terms=False):
    """sum_k weight_k * value_k of `objective` (e.g. "sigmoid + 0.5 * distill"), a float32
    scalar; with `with_terms` also {term name: value} (for logging; an unweighted value each)."""
    objective = obj.parse_objective(objective)
    values = objective_values(objective, zimg, ztxt, scale, bias, teacher=teacher, teacher_scale=teacher_scale,
                              impl=impl, mesh=mesh, axis=axis, block=block)
    loss = jnp.dot(jnp.asarray(objective.weights, F32), values)
    if not with_terms:
        return loss
    names = [f"{name}_{k}" if objective.names.count(name) > 1 else name for k, name in enumerate(objective.names)]
    return loss, dict(zip(names, values))


def _all_gather(objective, layout, towers):
    mesh, axis, n = layout
    if mesh is None:  # one device: gathering is the identity; the same body on a trivial mesh
        mesh, axis = jax.sharding.Mesh(jax.devices()[:1], ("_single",)), "_single"
    body = lambda zimg, *rest: all_gather_values_shard(  # noqa: E731
        zimg, *rest, objective=objective, axis=axis, batch=zimg.shape[0] * n)
    rows = P(axis, None)
    in_specs = (rows, rows, {k: rows for k in towers}, P(), P(), P())
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P())
