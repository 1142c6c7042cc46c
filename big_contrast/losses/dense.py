"""Plain dense reference losses: the full B x B logit matrix, autodiff for gradients.

Every other implementation is tested against these. With inputs sharded over a mesh they run
as ordinary GSPMD programs (XLA decides the communication).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _logits_bb(zimg, ztxt, scale):
    zimg = zimg.astype(jnp.float32)
    ztxt = _gathered(ztxt.astype(jnp.float32))
    return scale.astype(jnp.float32) * (zimg @ ztxt.T)


def _gathered(z):
    """With Explicit mesh axes (sharding in types) the contracted operand must be replicated
    before the matmul, or jax refuses a result sharded twice; elsewhere a no-op."""
    sharding = getattr(jax.typeof(z), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if not explicit or all(dim is None for dim in sharding.spec):
        return z
    return jax.reshard(z, jax.sharding.PartitionSpec())


def softmax_loss_dense(zimg, ztxt, scale):
    """mean_i 1/2 (CE(row i) + CE(column i)) of L = scale * zimg @ ztxt.T (CLIP)."""
    logits_bb = _logits_bb(zimg, ztxt, scale)
    diag_b = scale * jnp.sum(zimg.astype(jnp.float32) * ztxt.astype(jnp.float32), axis=1)
    row_ce_b = jax.nn.logsumexp(logits_bb, axis=1) - diag_b
    col_ce_b = jax.nn.logsumexp(logits_bb, axis=0) - diag_b
    return 0.5 * jnp.mean(row_ce_b + col_ce_b)


def sigmoid_loss_dense(zimg, ztxt, scale, bias):
    """-(1/B) sum_ij log sigmoid(s_ij (scale <zimg_i, ztxt_j> + bias)), s = +1 on the diagonal (SigLIP)."""
    logits_bb = _logits_bb(zimg, ztxt, scale) + bias.astype(jnp.float32)
    batch = logits_bb.shape[0]
    sign_bb = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(sign_bb * logits_bb)) / batch
