"""An exponential moving average of the parameters: the EMA teacher of SigLIP 2's SILC / TIPS
terms and of momentum distillation (ALBEF, COSMOS), and weights to evaluate (`eval --ema`).

    config.ema = dict(decay=0.999, start_step=0, every=1)

Before ``start_step`` the average *is* the parameters (it starts from where training is, not
from the random initialisation); from then on, at every step that is a multiple of ``every``,
``ema ← decay · ema + (1 − decay) · params``. ``decay`` is per update, so with ``every=k`` the
average's horizon is ``k / (1 − decay)`` steps. The update runs inside the jitted train step on
the state's arrays, so the average keeps the parameters' shardings (nothing is gathered), is
saved and restored with the state (exact resume), and is a pure function of (step, params):
decay 0 gives the parameters themselves.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from big_contrast.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    decay: float = 0.999
    start_step: int = 0
    every: int = 1

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"config.ema.decay={self.decay} must be in [0, 1) (e.g. 0.999; 0 copies the "
                              "parameters).")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise ConfigError(f"config.ema.start_step={self.start_step!r} must be a non-negative integer.")
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"config.ema.every={self.every!r} must be a positive integer (update every k steps).")

    @classmethod
    def from_config(cls, ema) -> "EmaConfig | None":
        """`config.ema` (a ConfigDict / dict, or None / empty when the run keeps no EMA)."""
        if not ema:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(ema) - known)
        if unknown:
            raise ConfigError(f"config.ema has unknown field(s) {unknown}; use {sorted(known)}.")
        return cls(**dict(ema))


def ema_init(params):
    """The average at step 0: a copy of the parameters (float leaves only)."""
    return jax.tree.map(jnp.copy, params)


def ema_update(ema, params, step: jax.Array, config: EmaConfig):
    """The average after the optimizer update of step ``step`` (the step just taken, 1-based).

    Traced inside the train step: ``step`` is an array, the branches are `jnp.where`s."""
    before_start = step < config.start_step
    updating = (step % config.every) == 0

    def one(average, param):
        blended = config.decay * average.astype(jnp.float32) + (1.0 - config.decay) * param.astype(jnp.float32)
        new = jnp.where(before_start, param.astype(jnp.float32), jnp.where(updating, blended, average))
        return new.astype(average.dtype)

    return jax.tree.map(one, ema, params)
