"""The contrastive loss engine: CLIP's softmax loss and SigLIP's pairwise-sigmoid loss.

    softmax_loss(zimg, ztxt, scale, *, impl="ring", mesh=None, axis="data", block=None)
    sigmoid_loss(zimg, ztxt, scale, bias, *, impl="ring", mesh=None, axis="data", block=None)

`zimg`, `ztxt` are the [B, D] embeddings of the global batch (row i of both is a positive
pair); with a mesh they are sharded over the batch along `axis` (a mesh axis name or a
tuple of names). `impl` picks the scheme:

* "dense": the full B x B logits (the reference; one device, or GSPMD with a mesh);
* "all_gather": local rows against all-gathered columns, (B/n) x B logits per device;
* "ring" (default): text blocks travel around the mesh axis, tiles of `block` rows are
  recomputed in the backward pass; no tensor larger than block x block + O(b * D).
  `block=None` picks `ring.default_block(mesh)`: 512 on CPU, up to 4,096 on GPU/TPU
  (bounded by `ring.TILE_BUDGET_BYTES`).

All are differentiable in every argument with plain `jax.grad` and return a float32 scalar.
The compute dtype follows the inputs: bfloat16 embeddings run bfloat16 matmuls with float32
accumulation and statistics (half the bytes on the wire of the ring), and their gradients
come back in bfloat16; cast `zimg`, `ztxt` to choose (the train step's `LossSpec.dtype`).

Beyond the two: any weighted sum of contrastive objectives (DCL, DiHT hard negatives, CWCL
soft targets, teacher / momentum distillation, alignment + uniformity, and the two above),
with the same three impls and a teacher whose embeddings travel in the ring (engine.py,
objectives.py):

    combined_loss("sigmoid + 0.5 * distill", zimg, ztxt, scale, bias, teacher={"image": u, "text": v},
                  teacher_scale=None, impl="ring", mesh=None, axis="data", block=None, with_terms=False)
    objective_values(objective, zimg, ztxt, scale, bias, ...)  # the vector of unweighted term values
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from big_contrast.losses import checks, ring
from big_contrast.losses.all_gather import sigmoid_all_gather_shard, softmax_all_gather_shard
from big_contrast.losses.dense import sigmoid_loss_dense, softmax_loss_dense
from big_contrast.losses.engine import combined_loss, objective_values
from big_contrast.losses.objectives import TERMS, Objective, parse_objective

__all__ = ["softmax_loss", "sigmoid_loss", "IMPLS", "combined_loss", "objective_values", "parse_objective",
           "Objective", "TERMS"]

IMPLS = checks.IMPLS


def softmax_loss(zimg, ztxt, scale, *, impl="ring", mesh=None, axis="data", block=None):
    """CLIP loss: mean_i 1/2 (CE(row i) + CE(column i)) of L = scale * zimg @ ztxt.T."""
    checks.check_loss_inputs(zimg, ztxt, scale, None, impl=impl, mesh=mesh, axis=axis, block=block)
    zimg, ztxt = _place_rows(zimg, mesh, axis), _place_rows(ztxt, mesh, axis)
    scale = jnp.asarray(scale, jnp.float32)
    if impl == "dense":
        return softmax_loss_dense(zimg, ztxt, scale)
    layout = _layout(zimg, mesh, axis)
    if impl == "all_gather":
        return _all_gather(softmax_all_gather_shard, layout, n_scalars=1)(zimg, ztxt, scale)
    return ring.softmax_ring_loss(*layout, block or ring.default_block(mesh), zimg.shape[0])(zimg, ztxt, scale)


def sigmoid_loss(zimg, ztxt, scale, bias, *, impl="ring", mesh=None, axis="data", block=None):
    """SigLIP loss: -(1/B) sum_ij log sigmoid(s_ij (scale <zimg_i, ztxt_j> + bias)), s_ii = +1, else -1."""
    checks.check_loss_inputs(zimg, ztxt, scale, bias, impl=impl, mesh=mesh, axis=axis, block=block)
    zimg, ztxt = _place_rows(zimg, mesh, axis), _place_rows(ztxt, mesh, axis)
    scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    if impl == "dense":
        return sigmoid_loss_dense(zimg, ztxt, scale, bias)
    layout = _layout(zimg, mesh, axis)
    if impl == "all_gather":
        return _all_gather(sigmoid_all_gather_shard, layout, n_scalars=2)(zimg, ztxt, scale, bias)
    return ring.sigmoid_ring_loss(*layout, block or ring.default_block(mesh), zimg.shape[0])(zimg, ztxt, scale, bias)


def _axis_spec(axis):
    return axis if isinstance(axis, str) else tuple(axis)


def _layout(zimg, mesh, axis):
    """(mesh, axis, ring size): a single device when there is no mesh."""
    if mesh is None:
        return None, None, 1
    return mesh, _axis_spec(axis), checks.ring_size(mesh, axis)


def _place_rows(z, mesh, axis):
    """On a mesh with Explicit axes, shard_map wants its inputs already sharded by rows."""
    if mesh is None or not checks.is_explicit_mesh(mesh):
        return z
    return jax.reshard(z, NamedSharding(mesh, P(_axis_spec(axis), None)))


def _all_gather(shard_fn, layout, *, n_scalars):
    mesh, axis, n = layout
    if mesh is None:
        # One device: gathering is the identity; reuse the same body under a trivial mesh.
        mesh = jax.sharding.Mesh(jax.devices()[:1], ("_single",))
        axis = "_single"
    body = lambda *args: shard_fn(*args, axis=axis, batch=args[0].shape[0] * n)  # noqa: E731
    rows = P(axis, None)
    in_specs = (rows, rows) + (P(),) * n_scalars
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P())
