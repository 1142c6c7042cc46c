"""Training: config defaults and validation, optimizer, train step (with gradient caching), loop.

Only `big_contrast.cli` imports this package (data flows one way: see DESIGN.md)."""

from big_contrast.train.config import apply_arg, default_config, split_arg, use_real_data_defaults, validate
from big_contrast.train.loop import NonFiniteLoss, build, train

__all__ = ["NonFiniteLoss", "apply_arg", "build", "default_config", "split_arg", "train", "use_real_data_defaults", "validate"]
