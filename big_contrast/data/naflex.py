"""NaFlex inputs (SigLIP 2's variable resolution): aspect-preserving resize under a patch
budget, patches padded to the budget, a mask and each image's patch grid.

Why: a fixed-resolution ViT squashes every image to a square; NaFlex (NaViT + FlexiViT, as in
SigLIP 2) keeps each image's aspect ratio and spends at most ``max_num_patches`` patches on
it, so one model serves every resolution and sequence length. The model then needs, per
image, its patches ``[N, p*p*C]`` (the first ``h*w`` real, the rest zero padding), a mask of
the real ones and the grid ``(h, w)`` that its position embeddings are resampled to.

The steps are those of transformers' ``Siglip2ImageProcessorPil`` (pixel for pixel; no
torch at run time, as for the fixed-resolution checkpoints in ``interop/preprocess.py``), so
a released NaFlex checkpoint sees what it was converted with:

1. the target size: the largest scale (found by the same bisection over
   ``[1e-6, 100]`` to within ``1e-5``, which decides the ties) at which
   ``ceil(h * s / p) * p`` by ``ceil(w * s / p) * p`` pixels, each at least one patch,
   hold at most ``max_num_patches`` patches; an image may be enlarged;
2. a bilinear resize of the uint8 image to that size with Pillow (antialiased when
   shrinking);
3. ``x / 255`` (in float64, then float32), minus ``mean``, over ``std``;
4. patches in row-major grid order, each flattened as (row in patch, column, channel), then
   zero rows up to ``max_num_patches``.

The default ``Siglip2ImageProcessor`` (torchvision backend) gives the same sizes, masks and
patch order; its uint8 resize rounds differently from Pillow's when shrinking, so up to a few
per cent of its values differ by one grey level (measured in the tests).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from big_contrast.errors import ConfigError

SIGLIP2_MEAN = SIGLIP2_STD = (0.5, 0.5, 0.5)
_SCALE_LOW, _SCALE_HIGH, _SCALE_TOLERANCE = 1e-6, 100.0, 1e-5  # Siglip2ImageProcessor's search


def _scaled_side(side: int, scale: float, patch_size: int) -> int:
    """``side * scale`` rounded up to whole patches, at least one."""
    return max(patch_size, math.ceil(side * scale / patch_size) * patch_size)


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The (height, width) in pixels an image is resized to: multiples of ``patch_size``, the
    aspect ratio kept as nearly as whole patches allow, at most ``max_num_patches`` patches."""
    if height < 1 or width < 1 or patch_size < 1 or max_num_patches < 1:
        raise ConfigError(f"naflex_size needs a non-empty image and a positive patch size and budget, "
                          f"got {height}x{width}, patch {patch_size}, max_num_patches {max_num_patches}.")

    def fits(scale: float) -> bool:
        rows = _scaled_side(height, scale, patch_size) / patch_size
        cols = _scaled_side(width, scale, patch_size) / patch_size
        return rows * cols <= max_num_patches

    low, high = _SCALE_LOW, _SCALE_HIGH
    while high - low >= _SCALE_TOLERANCE:  # `low` always fits, `high` (once moved) never does
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return _scaled_side(height, low, patch_size), _scaled_side(width, low, patch_size)


def patchify(image_hwc: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] -> [H/p * W/p, p * p * C]: patches row by row, each (row, column, channel)."""
    h, w, c = image_hwc.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"an image of {h}x{w} pixels is not whole {patch_size}-pixel patches.")
    grid = image_hwc.reshape(h // patch_size, patch_size, w // patch_size, patch_size, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape(-1, patch_size * patch_size * c)


def naflex_image(image, *, patch_size: int = 16, max_num_patches: int = 256,
                 mean=SIGLIP2_MEAN, std=SIGLIP2_STD) -> dict[str, np.ndarray]:
    """One image (uint8 [H, W, 3] array or a PIL image) as NaFlex inputs:
    ``patches`` float32 [max_num_patches, p*p*3], ``patch_mask`` bool [max_num_patches]
    (True for the real patches, which come first), ``spatial_shape`` int32 [2] (grid rows,
    columns)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(_uint8_rgb(image))
    pil = pil if pil.mode == "RGB" else pil.convert("RGB")  # convert copies even an RGB image
    height, width = naflex_size(pil.height, pil.width, patch_size, max_num_patches)
    pixels = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    real = patchify(pixels, patch_size)
    patches = np.zeros((max_num_patches, real.shape[1]), np.float32)
    patches[:len(real)] = real
    mask = np.arange(max_num_patches) < len(real)
    return dict(patches=patches, patch_mask=mask,
                spatial_shape=np.asarray([height // patch_size, width // patch_size], np.int32))


def naflex_batch(images, **options) -> dict[str, np.ndarray]:
    """``naflex_image`` of each image, stacked: patches [B, N, P], patch_mask [B, N],
    spatial_shapes [B, 2] (transformers' names: pixel_values, pixel_attention_mask,
    spatial_shapes)."""
    rows = [naflex_image(image, **options) for image in images]
    return dict(patches=np.stack([r["patches"] for r in rows]),
                patch_mask=np.stack([r["patch_mask"] for r in rows]),
                spatial_shapes=np.stack([r["spatial_shape"] for r in rows]))


def _uint8_rgb(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"NaFlex preprocessing takes uint8 [H, W, 3] RGB pixels (what 'decode' "
                          f"yields), got {array.dtype} {array.shape}.")
    return array
