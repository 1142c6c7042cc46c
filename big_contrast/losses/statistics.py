"""Per-row statistics of a field over the global batch: what travels with the ring.

An objective (objectives.py) asks for reductions over j of elementwise "fields" F_ij of the
logit tile (for column statistics: over i). Three kinds cover every objective here:

* `Lse`: log sum_j exp F_ij (softmax denominators, hard-negative weights, uniformity);
* `Sum`: sum_j F_ij (SigLIP terms, CWCL weighted targets);
* `Expect`: (log sum_j exp W_ij, sum_j softmax(W)_ij V_ij), a soft-target expectation under
  a distribution that is itself only known at the end (distillation's teacher softmax).

Each kind can be reduced in one go over a full row (`reduce`, for the dense and all-gather
impls, differentiated by autodiff), or online over tiles (`init` / `fold` / `merge`, the
ring's forward pass) into a `finalize`d residual of O(b) numbers, from which `value` is read
and `field_cotangents` gives the exact dloss/dF_ij of one tile in the ring's backward pass.
Log-sum-exps are kept as (max, log of the shifted sum): exp((F - max) - log_sum) keeps full
float32 precision where exp(F - lse) would lose the low bits of a large lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_contrast.losses.tiles import F32, _fold_lse, merge_lse


def _masked(f_tt, valid_tt, fill):
    return f_tt if valid_tt is None else jnp.where(valid_tt, f_tt, fill)


def _expand(v, axis):
    return jnp.expand_dims(v, axis)


class Lse:
    """log sum_j exp F_ij of one field."""

    n_fields = 1

    @staticmethod
    def reduce(fields, axis):
        (f,) = fields
        return jax.nn.logsumexp(f, axis=axis)

    @staticmethod
    def init(shape):
        return jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32)

    @staticmethod
    def fold(state, fields, axis, valid_tt):
        (f,) = fields
        return _fold_lse(*state, _masked(f, valid_tt, -jnp.inf), axis)

    merge = staticmethod(merge_lse)

    @staticmethod
    def finalize(state):
        top, total = state
        return top, jnp.log(total)

    @staticmethod
    def value(residual):
        top, log_sum = residual
        return top + log_sum

    @staticmethod
    def field_cotangents(residual, ct, fields, axis):
        (f,) = fields
        top, log_sum = residual
        return (_expand(ct, axis) * jnp.exp((f - _expand(top, axis)) - _expand(log_sum, axis)),)


class Sum:
    """sum_j F_ij of one field."""

    n_fields = 1

    @staticmethod
    def reduce(fields, axis):
        (f,) = fields
        return jnp.sum(f, axis=axis)

    @staticmethod
    def init(shape):
        return (jnp.zeros(shape, F32),)

    @staticmethod
    def fold(state, fields, axis, valid_tt):
        (f,) = fields
        return (state[0] + _masked(f, valid_tt, 0.0).sum(axis),)

    @staticmethod
    def merge(a, b):
        return (a[0] + b[0],)

    @staticmethod
    def finalize(state):
        return state

    @staticmethod
    def value(residual):
        return residual[0]

    @staticmethod
    def field_cotangents(residual, ct, fields, axis):
        (f,) = fields
        return (jnp.broadcast_to(_expand(ct, axis), f.shape),)


class Expect:
    """(lse_j W_ij, E_i = sum_j softmax_j(W)_ij V_ij) of a weight field W and a value field V.

    Online, the running sum of exp(W - max) V is rescaled with the running sum whenever the
    max grows, so the expectation needs no second pass once the distribution is known.
    """

    n_fields = 2

    @staticmethod
    def reduce(fields, axis):
        w, v = fields
        lse = jax.nn.logsumexp(w, axis=axis)
        return lse, jnp.sum(jnp.exp(w - _expand(lse, axis)) * v, axis=axis)

    @staticmethod
    def init(shape):
        return jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32), jnp.zeros(shape, F32)

    @staticmethod
    def fold(state, fields, axis, valid_tt):
        w, v = _masked(fields[0], valid_tt, -jnp.inf), _masked(fields[1], valid_tt, 0.0)
        top, total, weighted = state
        new_top = jnp.maximum(top, w.max(axis))
        shift = jnp.where(jnp.isneginf(new_top), 0.0, new_top)
        decay = jnp.exp(top - shift)
        e = jnp.exp(w - _expand(shift, axis))
        return new_top, total * decay + e.sum(axis), weighted * decay + (e * v).sum(axis)

    @staticmethod
    def merge(a, b):
        top = jnp.maximum(a[0], b[0])
        shift = jnp.where(jnp.isneginf(top), 0.0, top)
        da, db = jnp.exp(a[0] - shift), jnp.exp(b[0] - shift)
        return top, a[1] * da + b[1] * db, a[2] * da + b[2] * db

    @staticmethod
    def finalize(state):
        top, total, weighted = state
        return top, jnp.log(total), weighted / total

    @staticmethod
    def value(residual):
        top, log_sum, mean = residual
        return top + log_sum, mean

    @staticmethod
    def field_cotangents(residual, ct, fields, axis):
        w, v = fields
        top, log_sum, mean = residual
        ct_lse, ct_mean = (_expand(c, axis) for c in ct)
        p = jnp.exp((w - _expand(top, axis)) - _expand(log_sum, axis))
        return p * (ct_lse + ct_mean * (v - _expand(mean, axis))), p * ct_mean


KINDS = {"lse": Lse, "sum": Sum, "expect": Expect}
