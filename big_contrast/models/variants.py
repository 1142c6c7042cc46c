"""Model sizes by name, as in big_vision's ``decode_variant``: "B/16", "So400m/14", "L".

``mu`` is big_vision's tiny test size (width 32, depth 1); tests and the demo
override its depth where they need more than one block.
"""
from __future__ import annotations

import dataclasses

from big_contrast.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


SIZES = {
    "mu": Size(32, 1, 128, 2),
    "Ti": Size(192, 12, 768, 3),
    "S": Size(384, 12, 1536, 6),
    "M": Size(512, 12, 2048, 8),
    "B": Size(768, 12, 3072, 12),
    "L": Size(1024, 24, 4096, 16),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1280, 32, 5120, 16),
    "g": Size(1408, 40, 6144, 16),
    "G": Size(1664, 48, 8192, 16),
    "e": Size(1792, 56, 15360, 16),
}


def _size(name: str, variant: str) -> Size:
    if name not in SIZES:
        raise ConfigError(f"model variant {variant!r}: size {name!r} is unknown; "
                          f"use one of {tuple(SIZES)} (e.g. 'B/16' for images, 'B' for text).")
    return SIZES[name]


def decode_image_variant(variant: str) -> tuple[Size, int]:
    """'B/16' -> (Size of B, patch size 16)."""
    name, slash, patch = variant.partition("/")
    size = _size(name, variant)
    if not slash or not patch.isdigit() or int(patch) < 1:
        raise ConfigError(f"image variant {variant!r} needs a positive patch size after the size, "
                          "like 'B/16' or 'So400m/14'.")
    return size, int(patch)


def decode_text_variant(variant: str) -> Size:
    """'B' -> Size of B; text towers have no patch size."""
    if "/" in variant:
        raise ConfigError(f"text variant {variant!r} has a patch size; text towers take a bare "
                          f"size such as 'B' (one of {tuple(SIZES)}).")
    return _size(variant, variant)


def with_overrides(size: Size, **overrides: int | None) -> Size:
    """``size`` with the non-None fields of ``overrides`` (width, depth, mlp_dim, num_heads)."""
    return dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
