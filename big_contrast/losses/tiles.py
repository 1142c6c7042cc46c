"""Tiled kernels for one image block against one text block (the inside of a ring step).

A device's `b` local rows are cut into `n_tiles` tiles of `t` rows (the last one zero-padded
and masked when `t` does not divide `b`). The kernels visit every (row tile, column tile)
pair with two nested `lax.fori_loop`s, so the largest live tensor is one `t x t` tile of
logits; running statistics and gradient accumulators are updated in place with dynamic
slices and are O(b) or O(b * D).

Shape suffixes: `_td` a tile of embeddings, `_tt` a tile of logits, `_nt` per-row statistics
laid out as [n_tiles, t], `_ntd` embeddings laid out as tiles.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How `b` local rows are cut into tiles of `t` rows."""

    b: int
    t: int

    @property
    def n_tiles(self) -> int:
        return -(-self.b // self.t)

    @property
    def padded(self) -> bool:
        return self.n_tiles * self.t != self.b

    def to_tiles(self, z_bd):
        pad = self.n_tiles * self.t - self.b
        if pad:
            z_bd = jnp.pad(z_bd, ((0, pad), (0, 0)))
        return z_bd.reshape(self.n_tiles, self.t, z_bd.shape[-1])

    def from_tiles(self, z_ntd):
        return z_ntd.reshape(self.n_tiles * self.t, *z_ntd.shape[2:])[: self.b]

    def valid(self, i):
        """[t] mask of the rows of tile `i` that are real (not padding)."""
        return i * self.t + jnp.arange(self.t) < self.b

    def valid_tt(self, i, j):
        """[t, t] mask of real (row, column) pairs, or None when nothing is padded."""
        if not self.padded:
            return None
        return self.valid(i)[:, None] & self.valid(j)[None, :]


def for_each_tile(tiling: Tiling, body, carry):
    """Runs `carry = body(i, j, carry)` for every row tile i and column tile j."""

    def over_columns(i, carry):
        return lax.fori_loop(0, tiling.n_tiles, lambda j, c: body(i, j, c), carry)

    return lax.fori_loop(0, tiling.n_tiles, over_columns, carry)


def _dot_f32(a, b):
    return jnp.dot(a, b, preferred_element_type=F32)


def _add_at(acc, i, value):
    return acc.at[i].add(value)


# ----------------------------------------------------------------------------- sigmoid


def _sigmoid_tile(x_td, y_td, scale, bias, positive_tt, valid_tt):
    """Loss terms and dloss/dlogit of one tile.

    With u = scale * <x, y> + bias and sign s (+1 on positives), the term is
    -log sigmoid(s u) = softplus(m) with m = -s u, written with a single exp so that it is
    exact for |m| up to float32 range; dterm/du = -s * sigmoid(m).
    """
    cos_tt = _dot_f32(x_td, y_td.T)
    u_tt = scale * cos_tt + bias
    m_tt = jnp.where(positive_tt, -u_tt, u_tt)
    e_tt = jnp.exp(-jnp.abs(m_tt))
    term_tt = jnp.maximum(m_tt, 0.0) + jnp.log1p(e_tt)
    sigmoid_m_tt = jnp.where(m_tt >= 0, 1.0, e_tt) / (1.0 + e_tt)
    g_tt = jnp.where(positive_tt, -sigmoid_m_tt, sigmoid_m_tt)
    if valid_tt is not None:
        term_tt = jnp.where(valid_tt, term_tt, 0.0)
        g_tt = jnp.where(valid_tt, g_tt, 0.0)
    return term_tt, g_tt


def sigmoid_block_pair(tiling, x_ntd, y_ntd, scale, bias, local, dy_ntd, *, row0, col0, with_grads):
    """Adds the sigmoid terms of (local image block) x (one text block) to the accumulators.

    `local` holds per-row sums [n_tiles, t] of the loss terms (`loss`) and, with gradients,
    of dl/du (`dbias`), plus the image gradient `dx` [n, t, D] (whose row-wise dot with the
    images gives the scale gradient, see ring.py);
    `dy_ntd` is the gradient accumulator of the text block (it travels with the block).
    `row0`, `col0` are the global indices of the first image row and the first text row,
    which locate the positive pairs. Gradients are unscaled partial sums: the caller
    multiplies by scale / B.
    """
    ids_t = jnp.arange(tiling.t)
    dtype = x_ntd.dtype

    def body(i, j, carry):
        local, dy_ntd = carry
        x_td, y_td = x_ntd[i], y_ntd[j]
        positive_tt = (row0 + i * tiling.t + ids_t)[:, None] == (col0 + j * tiling.t + ids_t)[None, :]
        term_tt, g_tt = _sigmoid_tile(x_td, y_td, scale, bias, positive_tt, tiling.valid_tt(i, j))
        local = dict(local, loss=_add_at(local["loss"], i, term_tt.sum(1)))
        if with_grads:
            g_lo = g_tt.astype(dtype)
            local = dict(
                local,
                dbias=_add_at(local["dbias"], i, g_tt.sum(1)),
                dx=_add_at(local["dx"], i, _dot_f32(g_lo, y_td)),
            )
            dy_ntd = _add_at(dy_ntd, j, _dot_f32(g_lo.T, x_td))
        return local, dy_ntd

    return for_each_tile(tiling, body, (local, dy_ntd))


# ----------------------------------------------------------------------------- softmax


def _masked_logits(x_td, y_td, scale, valid_tt):
    logits_tt = scale * _dot_f32(x_td, y_td.T)
    if valid_tt is not None:
        logits_tt = jnp.where(valid_tt, logits_tt, -jnp.inf)
    return logits_tt


def _fold_lse(max_t, sum_t, logits_tt, axis):
    """Online log-sum-exp: folds `logits_tt` reduced over `axis` into a running (max, sum)."""
    new_max_t = jnp.maximum(max_t, logits_tt.max(axis))
    # A row that has seen only padding keeps max = -inf; shift it by 0 to avoid inf - inf.
    shift_t = jnp.where(jnp.isneginf(new_max_t), 0.0, new_max_t)
    new_sum_t = sum_t * jnp.exp(max_t - shift_t) + jnp.exp(logits_tt - jnp.expand_dims(shift_t, axis)).sum(axis)
    return new_max_t, new_sum_t


def merge_lse(a, b):
    """Merges two running (max, sum) statistics of disjoint sets of logits into one."""
    (max_a, sum_a), (max_b, sum_b) = a, b
    new_max = jnp.maximum(max_a, max_b)
    shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)  # both empty: no inf - inf
    return new_max, sum_a * jnp.exp(max_a - shift) + sum_b * jnp.exp(max_b - shift)


def softmax_stats_block_pair(tiling, x_ntd, y_ntd, scale, row_stats, col_stats):
    """Folds the logits of (local image block) x (one text block) into log-sum-exp statistics.

    `row_stats` = (max, sum) [n_tiles, t] of the local image rows; `col_stats` the same for
    the columns of the text block (they travel with the block).
    """

    def body(i, j, carry):
        (row_max, row_sum), (col_max, col_sum) = carry
        logits_tt = _masked_logits(x_ntd[i], y_ntd[j], scale, tiling.valid_tt(i, j))
        rmax, rsum = _fold_lse(row_max[i], row_sum[i], logits_tt, axis=1)
        cmax, csum = _fold_lse(col_max[j], col_sum[j], logits_tt, axis=0)
        return (
            (row_max.at[i].set(rmax), row_sum.at[i].set(rsum)),
            (col_max.at[j].set(cmax), col_sum.at[j].set(csum)),
        )

    return for_each_tile(tiling, body, (row_stats, col_stats))


def softmax_grad_block_pair(tiling, x_ntd, y_ntd, scale, row_lse, col_lse, local, dy_ntd):
    """Adds sum_j (P_row + P_col)_ij terms of one block pair to the gradient accumulators.

    P_row = exp(L - lse_row), P_col = exp(L - lse_col) are the row and column softmaxes,
    recomputed tile by tile from the final statistics. Each log-sum-exp comes as its two
    parts (max [n, t], log of the shifted sum [n, t]): exp((L - max) - log_sum) keeps full
    float32 precision where exp(L - lse) would lose the low bits of a large lse (at
    scale 100, lse ~ 100 has an ulp of 8e-6). `local` holds the image gradient `dx`
    [n, t, D]; `dy_ntd` travels with the text block.
    The caller applies the 1/(2B) normalisation, the scale and the diagonal term.
    """
    dtype = x_ntd.dtype
    (row_max, row_logsum), (col_max, col_logsum) = row_lse, col_lse

    def body(i, j, carry):
        local, dy_ntd = carry
        x_td, y_td = x_ntd[i], y_ntd[j]
        valid_tt = tiling.valid_tt(i, j)
        logits_tt = _masked_logits(x_td, y_td, scale, valid_tt)
        p_tt = jnp.exp((logits_tt - row_max[i][:, None]) - row_logsum[i][:, None]) + jnp.exp(
            (logits_tt - col_max[j][None, :]) - col_logsum[j][None, :]
        )
        if valid_tt is not None:
            p_tt = jnp.where(valid_tt, p_tt, 0.0)
        p_lo = p_tt.astype(dtype)
        local = dict(local, dx=_add_at(local["dx"], i, _dot_f32(p_lo, y_td)))
        return local, _add_at(dy_ntd, j, _dot_f32(p_lo.T, x_td))

    return for_each_tile(tiling, body, (local, dy_ntd))


def zeros_like_rows(tiling, dtype=F32):
    return jnp.zeros((tiling.n_tiles, tiling.t), dtype)


def zeros_like_tiles(tiling, dim, dtype=F32):
    return jnp.zeros((tiling.n_tiles, tiling.t, dim), dtype)


def lse_parts(stats):
    """(running max, running sum) -> (max, log of the shifted sum): lse = max + log_sum."""
    max_nt, sum_nt = stats
    return max_nt, jnp.log(sum_nt)


__all__ = [
    "Tiling",
    "for_each_tile",
    "sigmoid_block_pair",
    "merge_lse",
    "softmax_stats_block_pair",
    "softmax_grad_block_pair",
    "zeros_like_rows",
    "zeros_like_tiles",
    "lse_parts",
]
