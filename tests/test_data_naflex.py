"""NaFlex preprocessing (data/naflex.py) against transformers' Siglip2ImageProcessor."""
import numpy as np
import pytest
from PIL import Image

from big_contrast.data import naflex

transformers = pytest.importorskip("transformers")
from transformers.models.siglip2.image_processing_siglip2 import (  # noqa: E402
    get_image_size_for_max_num_patches,
)

# Odd sizes: wide, tall, tiny (enlarged), square, one pixel high.
SIZES = [(37, 91), (250, 17), (5, 3), (64, 64), (1, 40), (123, 457)]


def random_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


def test_target_sizes_equal_transformers_on_many_shapes():
    rng = np.random.default_rng(0)
    cases = [(*rng.integers(1, 700, 2), patch, budget)
             for patch in (8, 14, 16) for budget in (1, 7, 64, 256, 1024) for _ in range(12)]
    for height, width, patch, budget in cases:
        got = naflex.naflex_size(int(height), int(width), patch, budget)
        assert got == get_image_size_for_max_num_patches(int(height), int(width), patch, budget)
        assert (got[0] // patch) * (got[1] // patch) <= budget


@pytest.mark.parametrize("patch,budget", [(8, 64), (4, 17)])
def test_pixels_masks_and_shapes_equal_siglip2_image_processor(patch, budget):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = naflex.naflex_batch(images, patch_size=patch, max_num_patches=budget)
    pil = transformers.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=budget)
    theirs = pil(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["spatial_shapes"], theirs["spatial_shapes"])
    np.testing.assert_array_equal(ours["patch_mask"], theirs["pixel_attention_mask"].astype(bool))
    assert ours["patches"].dtype == theirs["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours["patches"], theirs["pixel_values"])


@pytest.mark.parametrize("patch,budget", [(8, 64), (4, 17)])
def test_the_torchvision_backend_differs_by_at_most_one_grey_level(patch, budget):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = naflex.naflex_batch(images, patch_size=patch, max_num_patches=budget)
    processor = transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=budget)
    theirs = processor(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["spatial_shapes"], theirs["spatial_shapes"])
    np.testing.assert_array_equal(ours["patch_mask"], theirs["pixel_attention_mask"].astype(bool))
    levels = np.abs(ours["patches"] - theirs["pixel_values"]) * 127.5  # one grey level = 1
    assert levels.max() < 1.0 + 1e-5 and (levels > 1e-4).mean() < 0.02


def test_real_patches_come_first_and_padding_is_zero():
    out = naflex.naflex_image(random_image(37, 91), patch_size=8, max_num_patches=64)
    rows, cols = out["spatial_shape"]
    assert (rows, cols) == (5, 12) and out["patch_mask"].sum() == 60
    assert out["patch_mask"][:60].all() and not out["patch_mask"][60:].any()
    assert not out["patches"][60:].any() and out["patches"].shape == (64, 8 * 8 * 3)


def test_numpy_input_and_other_modes_give_the_same_patches_as_rgb():
    image = random_image(30, 50)
    from_pil = naflex.naflex_image(image, patch_size=8, max_num_patches=16)
    from_array = naflex.naflex_image(np.asarray(image), patch_size=8, max_num_patches=16)
    from_rgba = naflex.naflex_image(image.convert("RGBA"), patch_size=8, max_num_patches=16)
    for other in (from_array, from_rgba):
        np.testing.assert_array_equal(other["patches"], from_pil["patches"])


def test_a_float_array_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"takes uint8 \[H, W, 3\] RGB pixels"):
        naflex.naflex_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="naflex_size needs a non-empty image"):
        naflex.naflex_size(0, 5, 16, 256)
