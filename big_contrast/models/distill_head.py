"""The projection head of SigLIP 2's self-supervised terms (SILC / TIPS): DINO's head.

features [..., D] -> MLP (D -> hidden -> hidden -> bottleneck, GELU) -> L2-normalise ->
weight-normalised linear map to K prototype scores (Caron et al. 2021). The student and its
EMA teacher each have one; the teacher's is the EMA of the student's. One head serves the
pooled features (SILC) and, applied to every patch token, the patch features (TIPS), as iBOT
does when it shares its heads.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models import transformer as tfm


@dataclasses.dataclass(frozen=True)
class DistillHeadConfig:
    input_width: int
    hidden: int = 2048
    bottleneck: int = 256
    prototypes: int = 65536  # DINO's K; the demo uses a few hundred

    def __post_init__(self):
        for name in ("input_width", "hidden", "bottleneck", "prototypes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.model.distill_head.{name}={value!r} must be a positive integer.")


class DistillHead(nnx.Module):

    def __init__(self, config: DistillHeadConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.truncated_normal(0.02)
        dense = dict(kernel_init=init, rngs=rngs)
        self.fc1 = nnx.Linear(config.input_width, config.hidden, kernel_metadata=tfm.logical("embed", "mlp"),
                              bias_metadata=tfm.logical("mlp"), **dense)
        self.fc2 = nnx.Linear(config.hidden, config.hidden, kernel_metadata=tfm.logical("mlp", None),
                              bias_metadata=tfm.logical(None), **dense)
        self.fc3 = nnx.Linear(config.hidden, config.bottleneck, kernel_metadata=tfm.logical(None, None),
                              bias_metadata=tfm.logical(None), **dense)
        self.prototypes = nnx.Param(init(rngs.params(), (config.bottleneck, config.prototypes)),
                                    **tfm.logical(None, "vocab"))

    def __call__(self, features: jax.Array) -> jax.Array:
        """Prototype scores [..., K] in float32 (cosines of the bottleneck with each prototype)."""
        x = jax.nn.gelu(self.fc1(features.astype(jnp.float32)))
        x = jax.nn.gelu(self.fc2(x))
        x = self.fc3(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        w = self.prototypes.get_value()
        return x @ (w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-6))
