"""Training: config defaults and validation, optimizer, train step (with gradient caching), loop.

Only `big_contrast.cli` imports this package (data flows one way: see DESIGN.md)."""

from big_contrast.train.config import default_config, use_real_data_defaults, validate
from big_contrast.train.loop import NonFiniteLoss, build, train

__all__ = ["NonFiniteLoss", "build", "default_config", "train", "use_real_data_defaults", "validate"]
