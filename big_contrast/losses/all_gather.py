"""The all-gather scheme (open_clip `local_loss` with `gather_with_grad`, DisCo-CLIP).

Each device gathers both embedding matrices with gradient (the transpose of a tiled
all-gather is a reduce-scatter, so every device receives exactly the gradient of its own
rows) and computes its local rows against all B columns: a (B/n) x B logit slice per device.
The per-device partial losses are summed with a psum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _gathered_logits(zlocal_bd, zall_Bd, scale):
    return scale * jnp.dot(zlocal_bd, zall_Bd.T, preferred_element_type=jnp.float32)


def softmax_all_gather_shard(zimg, ztxt, scale, *, axis, batch):
    """Per-device body (inside shard_map): returns the global loss, replicated."""
    b = zimg.shape[0]
    offset = lax.axis_index(axis) * b
    zimg_all = lax.all_gather(zimg, axis, tiled=True)
    ztxt_all = lax.all_gather(ztxt, axis, tiled=True)
    positives_b = offset + jnp.arange(b)
    ce_sum = 0.0
    # Row CE of the local images against all texts, then of the local texts against all images.
    for logits_bB in (_gathered_logits(zimg, ztxt_all, scale), _gathered_logits(ztxt, zimg_all, scale)):
        diag_b = jnp.take_along_axis(logits_bB, positives_b[:, None], axis=1)[:, 0]
        ce_sum += jnp.sum(jax.nn.logsumexp(logits_bB, axis=1) - diag_b)
    return lax.psum(ce_sum, axis) / (2 * batch)


def sigmoid_all_gather_shard(zimg, ztxt, scale, bias, *, axis, batch):
    """Per-device body (inside shard_map): returns the global loss, replicated."""
    b = zimg.shape[0]
    offset = lax.axis_index(axis) * b
    ztxt_all = lax.all_gather(ztxt, axis, tiled=True)
    logits_bB = _gathered_logits(zimg, ztxt_all, scale) + bias
    is_positive_bB = (offset + jnp.arange(b))[:, None] == jnp.arange(batch)[None, :]
    sign_bB = jnp.where(is_positive_bB, 1.0, -1.0)
    return -lax.psum(jnp.sum(jax.nn.log_sigmoid(sign_bB * logits_bB)), axis) / batch
