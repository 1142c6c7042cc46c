"""The ring scheme: image blocks stay, text blocks travel, tiles are recomputed.

With n devices on the batch axis, device r holds image rows and text rows of block r. In
each of n steps it computes its image block against the text block it currently holds and
passes that block one hop along the ring with `lax.ppermute` (r -> r + 1), so after step k
it holds the block of device r - k. Everything that belongs to a text block (softmax column
statistics, the text gradient accumulator) travels with it, double-buffered: in step k a
device computes its contribution to the current block into a fresh buffer and sends on the
accumulator of the *previous* block merged with its previous contribution. Both transfers
of a step (the next block and that accumulator) therefore depend only on the step's inputs,
never on its compute, and XLA overlaps them with it: no hop is serial. The accumulator
trails its block by one hop and takes one last hop home at the end.

Inside a step the block pair is tiled (`tiles.py`), so per device nothing larger than a
`block x block` tile of logits plus O(b * D) buffers is ever live, in the forward or the
backward pass. A `jax.custom_vjp` keeps only O(b * D + b) residuals:

* sigmoid: the gradients are exact partial sums, so the forward pass that runs under
  differentiation forms them directly (3 matmuls per tile, the same as dense autodiff) and
  the backward pass only multiplies by the cotangent;
* softmax: the gradient needs the final row and column log-sum-exps, so the forward pass
  computes them (1 matmul per tile) and the backward pass runs a second ring that
  recomputes each tile (3 matmuls per tile): 4 in total.

Functions ending in `_shard` are per-device bodies: they run under `jax.shard_map`, or
directly with `n == 1` when there is no mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from big_contrast.losses import tiles
from big_contrast.losses.tiles import F32, Tiling

DEFAULT_BLOCK = 512  # CPU: keeps the tests' memory bars and fits its caches
ACCELERATOR_BLOCK = 4096  # GPU/TPU: tiles big enough to fill the chip
TILE_BUDGET_BYTES = 512 << 20  # the f32 temporaries of one tile (~6 of t x t) stay below this


def default_block(mesh=None):
    """The tile size when the caller gives none: 512 on CPU; on GPU/TPU the largest power of two
    up to `ACCELERATOR_BLOCK` whose tile temporaries fit `TILE_BUDGET_BYTES`."""
    concrete = isinstance(mesh, jax.sharding.Mesh)  # an AbstractMesh has no devices
    platform = mesh.devices.flat[0].platform if concrete else jax.default_backend()
    if platform == "cpu":
        return DEFAULT_BLOCK
    block = ACCELERATOR_BLOCK
    while block > DEFAULT_BLOCK and 6 * 4 * block * block > TILE_BUDGET_BYTES:
        block //= 2
    return block


class Ring:
    """The devices of the batch axis seen from one of them (inside shard_map when `axis` is
    set; a plain single-device computation when it is None)."""

    def __init__(self, axis, n):
        self.axis, self.n = axis, n
        self.me = lax.axis_index(axis) if axis is not None else 0

    def shift(self, tree):
        """Sends every leaf one hop forward: device r's value goes to device r + 1."""
        if self.n == 1:
            return tree
        perm = [(k, (k + 1) % self.n) for k in range(self.n)]
        return jax.tree.map(lambda a: lax.ppermute(a, self.axis, perm), tree)

    def psum(self, x):
        return lax.psum(x, self.axis) if self.axis is not None else x

    def per_device(self, tree):
        """Marks freshly created accumulators as per-device values, as loop carries must be."""
        if self.axis is None:
            return tree
        return jax.tree.map(lambda a: lax.pcast(a, self.axis, to="varying"), tree)

    def visit_all_blocks(self, compute, local, block, empty, merge):
        """Runs `local, part = compute(local, block, empty, src)` for every block.

        `block` (read-only data) moves one hop per step; `part` is this device's contribution
        to the block's accumulator, started from `empty`; `merge(acc, part)` folds it in;
        `src` is the device the block came from. The accumulator is double-buffered: step k
        sends (accumulator received, contribution of step k - 1), which trails the block by
        one hop, so neither transfer of a step waits for its compute. Returns the final
        `local` and the block's complete accumulator, which then belongs to device `me + 1`:
        one more `shift` brings it home. (n block hops where a serial ring needs n - 1, and
        n + 1 accumulator hops instead of n: the last block hop is unused and the first
        accumulator hop carries `empty`; every hop overlaps compute.)
        """
        empty = self.per_device(empty)

        def step(k, carry):
            local, block, travelling, part = carry
            next_block, next_travelling = self.shift((block, merge(travelling, part)))
            local, part = compute(local, block, empty, (self.me - k) % self.n)
            return local, next_block, next_travelling, part

        carry = (self.per_device(local), block, empty, empty)
        local, _, travelling, part = lax.fori_loop(0, self.n, step, carry)
        return local, merge(travelling, part)


def _add(acc, part):
    return jax.tree.map(jnp.add, acc, part)


# ----------------------------------------------------------------------------- sigmoid


def sigmoid_shard(zimg, ztxt, scale, bias, *, axis, n, block, batch, with_grads):
    """Per-device sigmoid loss; with `with_grads` also (dzimg, dztxt, dscale, dbias)."""
    ring = Ring(axis, n)
    b, dim = zimg.shape
    tiling = Tiling(b, min(block, b))
    x_ntd, y_ntd = tiling.to_tiles(zimg), tiling.to_tiles(ztxt)
    local = {"loss": tiles.zeros_like_rows(tiling)}
    dy_ntd = None
    if with_grads:
        local.update(
            dbias=tiles.zeros_like_rows(tiling),
            dx=tiles.zeros_like_tiles(tiling, dim),
        )
        dy_ntd = tiles.zeros_like_tiles(tiling, dim)

    def compute(local, y_ntd, dy_ntd, src):
        return tiles.sigmoid_block_pair(
            tiling, x_ntd, y_ntd, scale, bias, local, dy_ntd,
            row0=ring.me * b, col0=src * b, with_grads=with_grads,
        )

    local, dy_ntd = ring.visit_all_blocks(compute, local, y_ntd, dy_ntd, _add)
    loss = ring.psum(local["loss"].sum()) / batch
    if not with_grads:
        return loss
    dy_ntd = ring.shift(dy_ntd)
    dx_bd = tiling.from_tiles(local["dx"])  # sum_j g_ij y_j
    grad_scale = scale / batch
    dzimg = (grad_scale * dx_bd).astype(zimg.dtype)
    dztxt = (grad_scale * tiling.from_tiles(dy_ntd)).astype(ztxt.dtype)
    dscale = ring.psum(_rowwise_dot_sum(zimg, dx_bd)) / batch
    dbias = ring.psum(local["dbias"].sum()) / batch
    return loss, (dzimg, dztxt, dscale, dbias)


# ----------------------------------------------------------------------------- softmax


def _rowwise_dot_sum(a_bd, b_bd):
    """sum_i <a_i, b_i> in float32.

    The scale gradient sum_ij g_ij <x_i, y_j> equals sum_i <x_i, sum_j g_ij y_j>: a rowwise
    dot of the images with their (unscaled) gradient, O(b D) once instead of a reduction
    over every tile.
    """
    return jnp.sum(a_bd.astype(F32) * b_bd.astype(F32))


def softmax_stats_shard(zimg, ztxt, scale, *, axis, n, block, batch, residuals):
    """Per-device softmax loss; with `residuals` also the local row and column log-sum-exps."""
    ring = Ring(axis, n)
    b, _ = zimg.shape
    tiling = Tiling(b, min(block, b))
    x_ntd, y_ntd = tiling.to_tiles(zimg), tiling.to_tiles(ztxt)
    empty = (jnp.full((tiling.n_tiles, tiling.t), -jnp.inf, F32), tiles.zeros_like_rows(tiling))

    def compute(row_stats, y_ntd, col_stats, src):
        del src  # the softmax needs no positions: the diagonal is handled outside the ring
        return tiles.softmax_stats_block_pair(tiling, x_ntd, y_ntd, scale, row_stats, col_stats)

    row_stats, col_stats = ring.visit_all_blocks(compute, empty, y_ntd, empty, tiles.merge_lse)
    if residuals:
        col_stats = ring.shift(col_stats)  # home, next to the text rows they belong to
    row_lse = tuple(tiling.from_tiles(part) for part in tiles.lse_parts(row_stats))
    col_lse = tuple(tiling.from_tiles(part) for part in tiles.lse_parts(col_stats))
    lse_sum = sum(part.sum() for part in row_lse + col_lse)
    loss = ring.psum(lse_sum - 2.0 * scale * _rowwise_dot_sum(zimg, ztxt)) / (2 * batch)
    return (loss, row_lse, col_lse) if residuals else loss


def softmax_grad_shard(zimg, ztxt, scale, row_lse, col_lse, *, axis, n, block, batch):
    """Per-device softmax gradients (dzimg, dztxt, dscale) from the final log-sum-exps.

    `row_lse`, `col_lse` are (max [b], log of the shifted sum [b]) of the local image rows and
    text columns. dL/dlogit_ij = (P_row + P_col)_ij / (2B) - [i == j] / B, so each gradient
    is a ring sum over tiles plus a local diagonal term.
    """
    ring = Ring(axis, n)
    b, dim = zimg.shape
    tiling = Tiling(b, min(block, b))
    x_ntd, y_ntd = tiling.to_tiles(zimg), tiling.to_tiles(ztxt)
    as_tiles = lambda parts: tuple(tiling.to_tiles(part[:, None])[..., 0] for part in parts)  # noqa: E731
    row_lse_nt = as_tiles(row_lse)
    local = {"dx": tiles.zeros_like_tiles(tiling, dim)}

    def compute(local, block, dy_ntd, src):
        del src
        y_ntd, col_lse_nt = block
        return tiles.softmax_grad_block_pair(tiling, x_ntd, y_ntd, scale, row_lse_nt, col_lse_nt, local, dy_ntd)

    block_data = (y_ntd, as_tiles(col_lse))
    local, dy_ntd = ring.visit_all_blocks(compute, local, block_data, tiles.zeros_like_tiles(tiling, dim), _add)
    dy_ntd = ring.shift(dy_ntd)
    x_bd, y_bd = zimg.astype(F32), ztxt.astype(F32)
    dx_bd = tiling.from_tiles(local["dx"])  # sum_j (P_row + P_col)_ij y_j
    dzimg = scale * (dx_bd / (2 * batch) - y_bd / batch)
    dztxt = scale * (tiling.from_tiles(dy_ntd) / (2 * batch) - x_bd / batch)
    dscale_partial = _rowwise_dot_sum(x_bd, dx_bd) / (2 * batch) - _rowwise_dot_sum(x_bd, y_bd) / batch
    return dzimg.astype(zimg.dtype), dztxt.astype(ztxt.dtype), ring.psum(dscale_partial)


# ----------------------------------------------------------------------------- custom_vjp


def _on_mesh(fn, mesh, in_specs, out_specs):
    """`fn` under shard_map over `mesh`, or `fn` itself on a single device."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _scale_cotangent(ct, grads):
    return tuple(g * ct.astype(g.dtype) for g in grads)


@functools.lru_cache(maxsize=None)
def sigmoid_ring_loss(mesh, axis, n, block, batch):
    """A differentiable `(zimg, ztxt, scale, bias) -> loss` for one mesh and batch layout."""
    rows, rep = P(axis, None), P()
    kw = dict(axis=axis, n=n, block=block, batch=batch)
    in_specs = (rows, rows, rep, rep)
    value = _on_mesh(functools.partial(sigmoid_shard, with_grads=False, **kw), mesh, in_specs, rep)
    value_and_grads = _on_mesh(
        functools.partial(sigmoid_shard, with_grads=True, **kw), mesh, in_specs, (rep, (rows, rows, rep, rep))
    )

    @jax.custom_vjp
    def loss(zimg, ztxt, scale, bias):
        return value(zimg, ztxt, scale, bias)

    def loss_fwd(zimg, ztxt, scale, bias):
        return value_and_grads(zimg, ztxt, scale, bias)

    loss.defvjp(loss_fwd, lambda grads, ct: _scale_cotangent(ct, grads))
    return loss


@functools.lru_cache(maxsize=None)
def softmax_ring_loss(mesh, axis, n, block, batch):
    """A differentiable `(zimg, ztxt, scale) -> loss` for one mesh and batch layout."""
    rows, rep = P(axis, None), P()
    lse = (P(axis), P(axis))  # (max, log_sum) per row
    kw = dict(axis=axis, n=n, block=block, batch=batch)
    value = _on_mesh(functools.partial(softmax_stats_shard, residuals=False, **kw), mesh, (rows, rows, rep), rep)
    stats = _on_mesh(
        functools.partial(softmax_stats_shard, residuals=True, **kw), mesh, (rows, rows, rep), (rep, lse, lse)
    )
    grads = _on_mesh(
        functools.partial(softmax_grad_shard, **kw), mesh, (rows, rows, rep, lse, lse), (rows, rows, rep)
    )

    @jax.custom_vjp
    def loss(zimg, ztxt, scale):
        return value(zimg, ztxt, scale)

    def loss_fwd(zimg, ztxt, scale):
        value, row_lse, col_lse = stats(zimg, ztxt, scale)
        return value, (zimg, ztxt, scale, row_lse, col_lse)

    def loss_bwd(residuals, ct):
        return _scale_cotangent(ct, grads(*residuals))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss
