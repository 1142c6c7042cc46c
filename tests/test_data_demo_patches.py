"""Per-patch labels of the demo data (data/demo.py: shape_geometry, shape_coverage,
demo_patch_labels): they agree with the pixels the demo draws."""

import io

import numpy as np
import pytest
from PIL import Image

from big_contrast.data.demo import (COLOURS, SHAPES, demo_class_names, demo_patch_classes, demo_patch_labels,
                                    demo_source, shape_coverage, shape_geometry)


def decoded(source, index) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(source[index]["image"])).convert("RGB"), np.float32)


def shape_pixels(source, index) -> np.ndarray:
    """bool [H, W]: pixels nearer the example's nominal colour than its background (the median
    of its top and bottom rows, which no shape reaches)."""
    pixels = decoded(source, index)
    colour = list(COLOURS)[source[index]["label/colour"]]
    background = np.median(np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)]), axis=0)
    to_fill = np.linalg.norm(pixels - np.asarray(COLOURS[colour], np.float32), axis=-1)
    return to_fill < np.linalg.norm(pixels - background, axis=-1)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_patch_labels_agree_with_the_drawn_pixels(split):
    source, grid = demo_source(split, 60, image_size=64), 8
    for index in range(60):
        fraction = shape_pixels(source, index).reshape(grid, 8, grid, 8).mean(axis=(1, 3))
        coverage = shape_coverage(source, index, grid)
        assert np.abs(fraction - coverage).max() < 0.15, "the rasterised shape is not where the image has it"
        labels = demo_patch_labels(source, index, grid, "shape")
        clear = np.abs(coverage - 0.5) > 0.2  # patches the shape clearly covers or clearly misses
        np.testing.assert_array_equal((labels > 0)[clear], (fraction >= 0.5)[clear])
        assert set(np.unique(labels)) <= {0, 1 + source[index]["label/shape"]}


def test_labels_carry_the_examples_class_per_task():
    source = demo_source("eval", 144, image_size=32)
    for index in (96, 109, 143):  # large shapes (eval indices 96-143): they cover >= 30 % of some 8 px patch
        example = source[index]
        for task in ("shape", "colour", "colour_shape"):
            labels = demo_patch_labels(source, index, 4, task, min_coverage=0.3)
            assert labels.shape == (4, 4) and labels.dtype == np.int32 and labels.max() > 0
            assert set(np.unique(labels)) == {0, 1 + example[f"label/{task}"]}
            assert demo_patch_classes(task)[labels.max()] == demo_class_names(task)[example[f"label/{task}"]]
        assert set(np.unique(demo_patch_labels(source, index, 4, "foreground", 0.3))) == {0, 1}


def test_circle_coverage_sums_to_its_area():
    source = demo_source("eval", 96, image_size=64)
    circles = [i for i in range(96) if source[i]["label/shape"] == SHAPES.index("circle")]
    assert circles
    for index in circles:
        shape, cx, cy, r = shape_geometry(source, index)
        area = shape_coverage(source, index, 16).mean()  # the fraction of the image covered
        assert shape == "circle" and 0.2 < cx < 0.8 and 0.2 < cy < 0.8
        # PIL's ellipse includes its boundary pixels: up to ~1 px of radius more at the 2x canvas
        assert np.pi * r ** 2 <= area <= np.pi * (r + 1.0 / 128) ** 2 * 1.03


def test_coverage_grid_need_not_divide_the_image():
    source = demo_source("eval", 4, image_size=32)
    fine, coarse = shape_coverage(source, 1, 64), shape_coverage(source, 1, (3, 5))
    assert coarse.shape == (3, 5) and 0 <= coarse.min() and coarse.max() <= 1
    assert abs(fine.mean() - coarse.mean()) < 1e-3  # area is kept when averaging over cells


def test_bad_patch_label_options_fail_with_one_sentence():
    source = demo_source("eval", 4, image_size=32)
    for call in (lambda: demo_patch_labels(source, 0, 4, "size"),
                 lambda: demo_patch_labels(source, 0, 0),
                 lambda: demo_patch_labels(source, 0, 4, min_coverage=0.0)):
        with pytest.raises(ValueError) as error:
            call()
        assert "\n" not in str(error.value) and str(error.value).endswith(".")
