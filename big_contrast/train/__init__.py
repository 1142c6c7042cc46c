"""Training: config defaults and validation, optimizer, train step (with gradient caching), loop,
and the memory model of a step (`plan.py`).

Only the commands layer (`big_contrast.commands`) imports this package: data flows one way, from
sources through the trainer, so no library module depends on training. The names
below are imported on first use, so `big_contrast.train.step` loads with jax, flax and optax
alone (no data pipeline, no ml_collections): what `experiments/step_throughput` runs on an
accelerator image that lacks them."""

import importlib

_EXPORTS = {
    "apply_arg": "config", "default_config": "config", "split_arg": "config",
    "use_real_data_defaults": "config", "validate": "config",
    "NonFiniteLoss": "loop", "build": "loop", "train": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'big_contrast.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"big_contrast.train.{_EXPORTS[name]}"), name)
