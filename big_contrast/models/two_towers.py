"""The dual encoder: image tower, text tower, projection heads, scale and bias.

``model(images=None, texts=None)`` returns ``Embeddings(zimg, ztxt, scale, bias)``:

* ``zimg`` ``[B, embed_dim]`` float32, L2-normalised (None without images);
* ``ztxt`` ``[B, embed_dim]`` float32, L2-normalised (None without texts);
* ``scale`` float32 scalar ``exp(log_scale)``, already clamped at ``max_log_scale``;
* ``bias`` float32 scalar, or None when the model has no bias (softmax default).

Either input may be None (embed images only, or texts only). On an Explicit
mesh each tower runs inside ``sharding.call_with_auto_axes``; under
``jax.set_mesh(mesh)`` the activations are constrained by their logical names.
The outputs plug straight into the loss engine:
``sigmoid_loss(out.zimg, out.ztxt, out.scale, out.bias, mesh=mesh, axis=batch_axes(mesh))``.

The clamp is in the forward pass (``exp(min(log_scale, max_log_scale))``), so
the log-scale gets no gradient while it sits above the cap; open_clip clamps the
stored parameter after each step instead, which gives the same logits.

Locked image tower (LiT): with ``lock_image=True`` the image features are
passed through ``stop_gradient`` (no backward pass through the tower) and
``frozen_patterns`` lists the regexes (over '/'-joined parameter paths, e.g.
``image/encoder/blocks/0/mlp/fc1/kernel``) whose updates the trainer must zero,
so weight decay cannot move them either. The image projection head stays
trainable unless ``frozen_patterns`` is given explicitly.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models import transformer as tfm
from big_contrast.models.text import TextTransformer
from big_contrast.models.vit import ViT
from big_contrast.sharding import call_with_auto_axes, constrain, path_str

EMBEDDINGS_LOGICAL = ("batch", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Embeddings:
    zimg: jax.Array | None
    ztxt: jax.Array | None
    scale: jax.Array
    bias: jax.Array | None


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTowers(nnx.Module):

    def __init__(self, image: ViT, text: TextTransformer, *, embed_dim: int | None = None,
                 image_head: bool = True, text_head: bool = True, head_bias: tuple[bool, bool] = (True, True),
                 log_scale_init: float,
                 max_log_scale: float | None = None, bias_init: float | None = None,
                 lock_image: bool = False, frozen_patterns: tuple[str, ...] | None = None,
                 param_dtype=jnp.float32, decoder: nnx.Module | None = None, rngs: nnx.Rngs):
        self.image, self.text = image, text
        # SigLIP 2's captioning decoder (models/decoder.py) on the image tower's patch tokens, or None.
        self.decoder = nnx.data(None) if decoder is None else decoder
        icfg, tcfg = image.config, text.config
        self.image_head = _head(icfg.width, embed_dim, image_head, head_bias[0], icfg.dtype,
                                param_dtype, rngs)
        self.text_head = _head(tcfg.width, embed_dim, text_head, head_bias[1], tcfg.dtype,
                               param_dtype, rngs)
        widths = (embed_dim if self.image_head is not None else icfg.width,
                  embed_dim if self.text_head is not None else tcfg.width)
        if widths[0] != widths[1]:
            raise ConfigError(f"image embeddings of width {widths[0]} and text embeddings of width "
                              f"{widths[1]} differ; set config.embed_dim to project both.")
        self.embed_dim = widths[0]
        self.log_scale = nnx.Param(jnp.asarray(log_scale_init, jnp.float32))
        self.bias = (nnx.Param(jnp.asarray(bias_init, jnp.float32)) if bias_init is not None
                     else nnx.data(None))
        self.max_log_scale = max_log_scale
        self.lock_image = lock_image
        if frozen_patterns is None:
            frozen_patterns = (r"image/.*",) if lock_image else ()
        self.frozen_patterns = tuple(frozen_patterns)

    def __call__(self, images: jax.Array | None = None,
                 texts: jax.Array | None = None) -> Embeddings:
        return Embeddings(zimg=None if images is None else self.embed_images(images),
                          ztxt=None if texts is None else self.embed_texts(texts),
                          scale=self.scale(), bias=None if self.bias is None else self.bias[...])

    def embed_images(self, images_bhwc: jax.Array, patch_keys: jax.Array | None = None) -> jax.Array:
        """``patch_keys``: per-example PRNG keys [B] for the image tower's patch dropout
        (training only; see ``ViT``). ``models.naflex.NaflexImages`` (a NaFlex batch's
        ``image_input``) take the NaFlex forward (issue 22)."""
        from big_contrast.models import naflex  # it imports this module

        if isinstance(images_bhwc, naflex.NaflexImages):
            return naflex.naflex_embed_images(self, *images_bhwc, patch_keys)
        extra = () if patch_keys is None else (patch_keys,)
        return self._embed(self.image, self.image_head, images_bhwc, self.lock_image, *extra)

    def embed_images_with_tokens(self, images_bhwc: jax.Array,
                                 patch_keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(zimg [B, embed_dim], the image tower's un-pooled patch tokens [B, N, width]) from one
        forward pass: the decoder cross-attends to the tokens before pooling. Auto meshes only
        (`call_with_auto_axes` returns one array)."""
        if isinstance(images_bhwc, tuple):  # models.naflex.NaflexImages
            raise NotImplementedError("SigLIP 2's captioning decoder does not take NaFlex batches yet (its "
                                      "cross-attention has no patch mask); use a fixed-size pp or drop the decoder.")
        extra = () if patch_keys is None else (patch_keys,)
        encoded_bnd = self.image.encode(images_bhwc, *extra)
        features_bd = self.image.pool_features(encoded_bnd)
        tokens_bnd = self.image.patch_tokens(encoded_bnd)
        if self.lock_image:
            features_bd, tokens_bnd = jax.lax.stop_gradient((features_bd, tokens_bnd))
        z_bd = features_bd if self.image_head is None else self.image_head(features_bd)
        return constrain(l2_normalize(z_bd), EMBEDDINGS_LOGICAL), tokens_bnd

    def embed_texts(self, tokens_bl: jax.Array) -> jax.Array:
        return self._embed(self.text, self.text_head, tokens_bl, False)

    def _embed(self, tower, head, inputs, locked: bool, *tower_args) -> jax.Array:
        def embed(tower_and_head, inputs, *tower_args):
            tower, head = tower_and_head
            features_bd = tower(inputs, *tower_args)
            if locked:  # LiT: no backward pass through the locked tower
                features_bd = jax.lax.stop_gradient(features_bd)
            z_bd = features_bd if head is None else head(features_bd)
            return constrain(l2_normalize(z_bd), EMBEDDINGS_LOGICAL)

        return call_with_auto_axes(embed, (tower, head), (inputs, *tower_args), EMBEDDINGS_LOGICAL,
                                   (inputs.shape[0], self.embed_dim))

    def scale(self) -> jax.Array:
        log_scale = self.log_scale[...]
        if self.max_log_scale is not None:
            log_scale = jnp.minimum(log_scale, self.max_log_scale)
        return jnp.exp(log_scale)

    def is_frozen(self, path) -> bool:
        """Whether the parameter at ``path`` (a tuple of keys or a '/'-joined string) is frozen."""
        name = path if isinstance(path, str) else path_str(path)
        return any(re.fullmatch(pattern, name) for pattern in self.frozen_patterns)


def _head(width, embed_dim, enabled, bias, dtype, param_dtype, rngs):
    """Linear projection to the shared width (CLIP's has no bias), or None (no projection)."""
    if embed_dim is None or not enabled:
        return nnx.data(None)
    return nnx.Linear(width, embed_dim, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.lecun_normal(),
                      kernel_metadata=tfm.logical("embed", "proj"),
                      bias_metadata=tfm.logical("proj"), rngs=rngs)
