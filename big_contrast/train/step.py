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
  up to float round-off. The towers are deterministic functions of (params, batch) (no
  dropout; augmentation happens in the input pipeline), so both passes see the same
  computation.

Micro-batches are cut per device: with `n` batch shards, per-device batch `b` and `k`
micro-batches of `m = b / k`, micro-batch `c` holds rows `c*m ... (c+1)*m` of every device's
local rows, so slicing never moves data between devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from big_contrast import losses
from big_contrast.data.device_ops import normalize_on_device


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss and how the engine computes it."""

    name: str  # "softmax" | "sigmoid"
    impl: str = "ring"
    block: int | None = None

    def __call__(self, zimg, ztxt, scale, bias, mesh, axis):
        if self.name == "softmax":
            return losses.softmax_loss(zimg, ztxt, scale, impl=self.impl, mesh=mesh, axis=axis, block=self.block)
        return losses.sigmoid_loss(zimg, ztxt, scale, bias, impl=self.impl, mesh=mesh, axis=axis, block=self.block)


def _scale_and_bias(model):
    bias = model.bias[...] if model.bias is not None else jnp.zeros((), jnp.float32)
    return model.scale(), bias


def _microbatches(x, n_shards, k):
    """[B, ...] -> [k, B/k, ...]: micro-batch c takes rows c*m:(c+1)*m of every device's block."""
    b = x.shape[0] // n_shards
    m = b // k
    x = x.reshape(n_shards, k, m, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(k, n_shards * m, *x.shape[3:])


def _from_microbatches(x, n_shards):
    """Inverse of `_microbatches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    k, rows = x.shape[:2]
    m = rows // n_shards
    x = x.reshape(k, n_shards, m, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(k * rows, *x.shape[3:])


def loss_and_grads(graphdef, params, rest, batch, *, loss: LossSpec, mesh, axis, n_shards, microbatches):
    """(loss, aux, grads) for one global batch, in one pass or with gradient caching."""

    def embed(p, images, texts):
        model = nnx.merge(graphdef, p, rest)
        return model.embed_images(images), model.embed_texts(texts)

    def scalars(p):
        return _scale_and_bias(nnx.merge(graphdef, p, rest))

    images, texts = batch["image"], batch["text"]
    if microbatches <= 1:

        def full_loss(p):
            zimg, ztxt = embed(p, images, texts)
            scale, bias = scalars(p)
            return loss(zimg, ztxt, scale, bias, mesh, axis), (scale, bias)

        (value, (scale, bias)), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        return value, dict(scale=scale, bias=bias), grads

    # 1. embeddings, micro-batch by micro-batch, no activations kept
    images_k, texts_k = _microbatches(images, n_shards, microbatches), _microbatches(texts, n_shards, microbatches)

    def embed_one(_, inputs):
        return None, embed(params, *inputs)

    _, (zimg_k, ztxt_k) = jax.lax.scan(embed_one, None, (images_k, texts_k))
    zimg, ztxt = _from_microbatches(zimg_k, n_shards), _from_microbatches(ztxt_k, n_shards)

    # 2. the loss over the whole global batch and its embedding / scalar gradients
    (scale, bias), scalars_vjp = jax.vjp(scalars, params)
    value, (dzimg, dztxt, dscale, dbias) = jax.value_and_grad(
        lambda zi, zt, s, b: loss(zi, zt, s, b, mesh, axis), argnums=(0, 1, 2, 3)
    )(zimg, ztxt, scale, bias)
    (grads,) = scalars_vjp((dscale, dbias))

    # 3. parameter gradients, micro-batch by micro-batch
    dzimg_k, dztxt_k = _microbatches(dzimg, n_shards, microbatches), _microbatches(dztxt, n_shards, microbatches)

    def backprop_one(grads, inputs):
        images_c, texts_c, dzimg_c, dztxt_c = inputs
        _, embed_vjp = jax.vjp(lambda p: embed(p, images_c, texts_c), params)
        (grads_c,) = embed_vjp((dzimg_c, dztxt_c))
        return jax.tree.map(jnp.add, grads, grads_c), None

    grads, _ = jax.lax.scan(backprop_one, grads, (images_k, texts_k, dzimg_k, dztxt_k))
    return value, dict(scale=scale, bias=bias), grads


def train_step(state: TrainState, batch, *, graphdef, rest, tx, loss, mesh, axis, n_shards, microbatches, lr_fn,
               image_norm=None):
    """One optimizer step; returns the new state and scalar metrics.

    `image_norm` (a `device_ops.DeviceNormalization`) turns uint8 images into the model's
    float input here, on the device; float images pass through.
    """
    batch = {**batch, "image": normalize_on_device(batch["image"], image_norm)}
    value, aux, grads = loss_and_grads(
        graphdef, state.params, rest, batch, loss=loss, mesh=mesh, axis=axis, n_shards=n_shards,
        microbatches=microbatches,
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        loss=value,
        scale=aux["scale"],
        bias=aux["bias"],
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        learning_rate=lr_fn(state.step),
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
