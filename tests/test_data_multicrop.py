"""Global + local crops for SILC (data/multicrop.py): shapes, determinism per (seed, index), each
local crop is the drawn window of the original, the scale range, and config errors."""

import io

import grain
import numpy as np
import pytest
from PIL import Image

from big_contrast.data.errors import SkipRecord
from big_contrast.data.image_ops import parse_image_pp, sample_crop_box
from big_contrast.data.multicrop import MultiCrop, multicrop_from_config

GLOBAL_PP = "decode|random_resized_crop(64, scale=(0.5, 1.0))|value_range(-1, 1)"


def smooth_image(height=120, width=160, seed=0) -> np.ndarray:
    """A smooth random image (so crops differ and resampling is well behaved)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def png_bytes(pixels: np.ndarray) -> bytes:  # lossless: decoded pixels equal `pixels`
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_outputs_have_the_global_views_shape_and_v_local_crops():
    multicrop = MultiCrop(GLOBAL_PP, count=5, size=(24, 32))
    out = multicrop(png_bytes(smooth_image()), np.random.default_rng(0))
    assert set(out) == {"image", "local_images"}
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
    assert out["local_images"].shape == (5, 24, 32, 3) and out["local_images"].dtype == np.float32
    assert -1.0 <= out["local_images"].min() and out["local_images"].max() <= 1.0


def test_global_view_is_what_the_op_string_alone_gives():
    data = png_bytes(smooth_image())
    out = MultiCrop(GLOBAL_PP, count=3, size=16)(data, np.random.default_rng(7))
    np.testing.assert_array_equal(out["image"], parse_image_pp(GLOBAL_PP)(data, np.random.default_rng(7)))


class _Crops(grain.transforms.RandomMap):
    def __init__(self, multicrop):
        self.multicrop = multicrop

    def random_map(self, data, rng):
        return self.multicrop(data, rng)


def test_crops_are_deterministic_per_seed_and_index_whatever_the_reading_order():
    images = [png_bytes(smooth_image(seed=k)) for k in range(4)]
    multicrop = MultiCrop(GLOBAL_PP, count=3, size=16)

    def dataset(seed):
        return grain.MapDataset.source(images).seed(seed).random_map(_Crops(multicrop))

    forward = [dataset(3)[i] for i in range(4)]
    backward = {i: dataset(3)[i] for i in reversed(range(4))}
    for i in range(4):
        for key in ("image", "local_images"):
            np.testing.assert_array_equal(forward[i][key], backward[i][key])
    assert not np.array_equal(forward[0]["local_images"], dataset(4)[0]["local_images"])
    assert not np.array_equal(forward[0]["local_images"][0], forward[0]["local_images"][1])


def test_each_local_crop_is_the_drawn_window_of_the_original_resized():
    pixels = smooth_image()
    height, width = pixels.shape[:2]
    size, scale, ratio = (20, 28), (0.05, 0.4), (3 / 4, 4 / 3)
    multicrop = MultiCrop("decode|resize(48)", count=6, size=size, scale=scale, ratio=ratio)
    out = multicrop(png_bytes(pixels), np.random.default_rng(11), with_boxes=True)
    assert out["local_images"].dtype == np.uint8  # the global string has no value op, so neither do the crops

    replay = np.random.default_rng(11)  # the same draws: the global view's, then each crop's window
    parse_image_pp("decode|resize(48)")(png_bytes(pixels), replay)
    for crop, box in zip(out["local_images"], out["local_boxes"]):
        x0, y0, x1, y1 = sample_crop_box(width, height, replay, scale, ratio)
        np.testing.assert_allclose(box, (y0 / height, x0 / width, y1 / height, x1 / width), atol=1e-6)
        expected = np.asarray(Image.fromarray(pixels).crop((x0, y0, x1, y1)).resize(
            (size[1], size[0]), Image.Resampling.BILINEAR), np.float32)
        assert np.abs(crop.astype(np.float32) - expected).mean() < 3.0, "crop is not the window's resampling"


def test_crop_windows_respect_the_scale_and_ratio_ranges():
    scale, ratio = (0.05, 0.4), (3 / 4, 4 / 3)
    multicrop = MultiCrop("decode|resize(32)", count=50, size=8, scale=scale, ratio=ratio)
    data = png_bytes(smooth_image(200, 200))
    boxes = np.concatenate([multicrop(data, np.random.default_rng(s), with_boxes=True)["local_boxes"]
                            for s in range(4)])
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    areas, aspects = heights * widths, widths / heights
    assert np.all((boxes >= 0) & (boxes <= 1))
    # window sides are rounded to whole pixels (sides >= 44 px here): a few per cent of slack
    assert areas.min() >= scale[0] * 0.95 and areas.max() <= scale[1] * 1.05
    assert aspects.min() >= ratio[0] * 0.97 and aspects.max() <= ratio[1] * 1.03
    assert areas.min() < scale[0] + 0.03 and areas.max() > scale[1] - 0.03  # the whole range is drawn


def test_undecodable_bytes_are_skipped_like_the_global_op_string_does():
    with pytest.raises(SkipRecord, match="undecodable_image"):
        MultiCrop(GLOBAL_PP, count=2, size=16)(b"not an image", np.random.default_rng(0))


def test_config_defaults_are_silcs_local_views_and_none_means_no_crops():
    multicrop = multicrop_from_config(GLOBAL_PP, {"size": 32})
    assert (multicrop.count, multicrop.size, multicrop.scale) == (8, (32, 32), (0.05, 0.4))
    assert multicrop.crop_pp.spec == "decode|value_range(-1, 1)"  # the global string's final value op
    assert multicrop_from_config(GLOBAL_PP, {"pp": "flip_lr|value_range(-1,1)"}).crop_pp.ops[-1][0] == "value_range"
    assert multicrop_from_config(GLOBAL_PP, None) is None and multicrop_from_config(GLOBAL_PP, {}) is None


@pytest.mark.parametrize("options, words", [
    (dict(count=0), "count"),
    (dict(count=2.5), "count"),
    (dict(size=0), "size"),
    (dict(size=(8, 8, 8)), "size"),
    (dict(scale=(0.5, 0.1)), "scale"),
    (dict(scale=(0.0, 0.4)), "scale"),
    (dict(scale=(0.1, 1.5)), "scale"),
    (dict(scale=0.3), "scale"),
    (dict(ratio=(0.0, 1.0)), "ratio"),
    (dict(pp="decode|value_range(-1, 1)"), "must not decode"),
    (dict(pp="flip_lr"), "same value op"),
    (dict(pp="normalize()"), "same value op"),
    (dict(pp="value_range(0, 1)"), "same value op"),
    (dict(crops=4), "unknown keys"),
])
def test_bad_options_fail_with_one_sentence(options, words):
    with pytest.raises(ValueError, match=words) as error:
        multicrop_from_config(GLOBAL_PP, options)
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
