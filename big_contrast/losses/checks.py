"""Input validation for the loss engine: every error names the numbers and says what to change."""

from __future__ import annotations

import math
import jax
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.sharding import axis_names as batch_axes  # `axis` as a tuple of mesh axis names

IMPLS = ("dense", "all_gather", "ring")


def ring_size(mesh, axis) -> int:
    """Number of devices the batch is split over: the product of the sizes of `axis`."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[name] for name in batch_axes(axis))


def check_loss_inputs(zimg, ztxt, scale, bias, *, impl, mesh, axis, block) -> None:
    """Fails early, with a sentence that names the offending value, on any malformed call."""
    if impl not in IMPLS:
        raise ConfigError(f"Unknown loss impl {impl!r}; choose one of {', '.join(IMPLS)}.")
    for name, z in (("zimg", zimg), ("ztxt", ztxt)):
        if np.ndim(z) != 2:
            raise ValueError(
                f"{name} must be a [batch, dim] matrix, got rank {np.ndim(z)} with shape "
                f"{tuple(np.shape(z))}; flatten or pool the embeddings first."
            )
    if tuple(zimg.shape) != tuple(ztxt.shape):
        raise ValueError(
            f"zimg and ztxt must have the same shape (row i of each is a positive pair), got "
            f"zimg {tuple(zimg.shape)} and ztxt {tuple(ztxt.shape)}."
        )
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None and np.ndim(value) != 0:
            raise ValueError(
                f"{name} must be a scalar, got shape {tuple(np.shape(value))}; pass e.g. "
                f"jnp.exp(log_scale).reshape(()) instead."
            )
    if block is not None and (not isinstance(block, (int, np.integer)) or block < 1):
        raise ConfigError(f"block must be a positive integer (tile size in rows), got {block!r}.")
    if mesh is None:
        return
    names = batch_axes(axis)
    missing = [name for name in names if name not in mesh.axis_names]
    if missing:
        raise ConfigError(
            f"Loss axis {missing[0]!r} is not an axis of the mesh, whose axes are "
            f"{tuple(mesh.axis_names)}; pass axis= one of those (or a tuple of them)."
        )
    n = ring_size(mesh, axis)
    batch = zimg.shape[0]
    if batch % n:
        raise ConfigError(
            f"The global batch {batch} does not divide over the {n} devices of mesh axis "
            f"{axis!r}; use a batch that is a multiple of {n}."
        )


def is_explicit_mesh(mesh) -> bool:
    """True when any axis of `mesh` has sharding-in-types (Explicit) semantics."""
    axis_types = getattr(mesh, "axis_types", ())
    return any(t == jax.sharding.AxisType.Explicit for t in axis_types)
