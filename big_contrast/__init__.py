"""big_contrast: large-batch image-text contrastive training in JAX."""

__version__ = "0.1.0"
