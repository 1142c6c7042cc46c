"""NaFlex in training (issue 22): which runs are NaFlex runs, and the checks that fail them early.

A run is a NaFlex run when its ``config.data.pp_train`` ends in ``naflex(patch_size=...,
max_num_patches=...)`` (``data/image_ops.py``): its batches then hold ``patches``,
``patch_mask`` and ``spatial_shapes`` instead of ``image``, and everything downstream follows
the batch (``models.naflex.image_input``): the train step, gradient caching, the ring loss, the
EMA teacher; evaluators follow their own ``pp_eval`` the same way. The model is the ordinary
learned-posemb ViT; only its forward changes (``models/naflex.py``). This module holds what the
config must satisfy for that to work, each as one sentence, and the sizes ``plan`` needs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_contrast.data.image_ops import is_naflex, naflex_options
from big_contrast.errors import ConfigError
from big_contrast.models.naflex import NaflexImages


def pp_options(config, key: str = "pp_train") -> dict | None:
    """``{'patch_size', 'max_num_patches'}`` of the config's ``data.<key>`` naflex op, or None."""
    spec = config.data[key]
    return naflex_options(spec) if is_naflex(spec) else None


def validate(config) -> None:
    """One sentence per mistake of a NaFlex run (nothing to check for a fixed-resolution one)."""
    for key in ("pp_train", "pp_eval"):
        options = pp_options(config, key)
        if options is not None:
            _check_model(config, key, options)
    naflex_keys = [key for key in ("pp_train", "pp_eval") if pp_options(config, key) is not None]
    if naflex_keys and config.model.get("decoder"):
        raise ConfigError(f"SigLIP 2's captioning decoder does not take NaFlex batches yet (its cross-attention "
                          f"has no patch mask); drop config.model.decoder or use a fixed-size {naflex_keys[0]}.")


def _check_model(config, key: str, options: dict) -> None:
    from big_contrast import models

    tower = models.image_config(config.model)
    if (options["patch_size"], options["patch_size"]) != tuple(tower.patch_size):
        raise ConfigError(f"config.data.{key} cuts {options['patch_size']}-pixel NaFlex patches but the image "
                          f"tower's patches are {tower.patch_size[0]}x{tower.patch_size[1]}; use "
                          f"naflex(patch_size={tower.patch_size[0]}, ...).")
    if tower.posemb != "learn":
        raise ConfigError(f"config.data.{key} is NaFlex, which resamples a learned position table per image; "
                          f"set config.model.image.posemb='learn' (it is {tower.posemb!r}).")


def abstract_images(config, batch: int) -> NaflexImages | None:
    """Shapes of a NaFlex micro-batch of ``batch`` rows (sequence = max_num_patches), or None."""
    options = pp_options(config)
    if options is None:
        return None
    n, p = options["max_num_patches"], options["patch_size"]
    from big_contrast import models

    channels = models.image_config(config.model).channels
    return NaflexImages(jax.ShapeDtypeStruct((batch, n, p * p * channels), jnp.float32),
                        jax.ShapeDtypeStruct((batch, n), jnp.bool_),
                        jax.ShapeDtypeStruct((batch, 2), jnp.int32))
