"""The data pipeline's naflex(...) op: NaFlex fields in training and evaluation batches,
sharded over the batch axes, with exact resume (issue 22)."""
import numpy as np
import pytest
from PIL import Image

from big_contrast.data import naflex
from big_contrast.errors import ConfigError


def random_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))

NAFLEX_PP = ("decode|random_resized_crop(None, scale=(0.5, 1.0), ratio=(0.5, 2.0))"
             "|naflex(patch_size=4, max_num_patches=12)")


def demo_naflex_config(pp=NAFLEX_PP, batch_size=8):
    from big_contrast.data import default_data_config

    config = default_data_config()
    config.sources.demo.update(size=64, image_size=16)
    config.batch_size, config.pp_train, config.pp_eval = batch_size, pp, pp
    return config


def test_the_naflex_op_gives_the_fields_of_naflex_image_for_its_crop():
    from big_contrast.data.image_ops import parse_image_pp, random_resized_crop

    image = random_image(20, 30)
    fields = parse_image_pp(NAFLEX_PP)(image, np.random.default_rng(5))
    crop = random_resized_crop(image, np.random.default_rng(5), size=None, scale=(0.5, 1.0), ratio=(0.5, 2.0))
    want = naflex.naflex_image(crop, patch_size=4, max_num_patches=12)
    assert crop.shape[:2] != (image.height, image.width)  # a window at its own size, not resized
    np.testing.assert_array_equal(fields["patches"], want["patches"])
    np.testing.assert_array_equal(fields["patch_mask"], want["patch_mask"])
    np.testing.assert_array_equal(fields["spatial_shapes"], want["spatial_shape"])


@pytest.mark.parametrize("pp, words", [
    ("decode|naflex(patch_size=4)|flip_lr", "must be the last op"),
    ("decode|value_range(-1, 1)|naflex(patch_size=4)", "normalises the pixels itself"),
])
def test_a_misplaced_naflex_op_is_refused_in_one_sentence(pp, words):
    from big_contrast.data.image_ops import parse_image_pp

    with pytest.raises(ConfigError, match=words):
        parse_image_pp(pp)


def test_pipeline_batches_hold_naflex_fields_sharded_over_the_batch_axes_and_resume_exactly():
    import json

    import jax
    from big_contrast.data import make_pipeline
    from big_contrast.sharding import batch_sharding, make_mesh

    mesh = make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
    it = make_pipeline(demo_naflex_config(), batch_sharding(mesh))
    batch = next(it)
    assert sorted(batch) == ["patch_mask", "patches", "spatial_shapes", "text"]
    assert batch["patches"].shape == (8, 12, 48) and batch["patches"].dtype == np.float32
    assert batch["patch_mask"].shape == (8, 12) and batch["spatial_shapes"].shape == (8, 2)
    for field in ("patches", "patch_mask", "spatial_shapes"):
        assert batch[field].sharding.spec[0] == ("data", "fsdp")
        assert len(batch[field].addressable_shards) == jax.device_count()
    shapes, mask = np.asarray(batch["spatial_shapes"]), np.asarray(batch["patch_mask"])
    np.testing.assert_array_equal(mask.sum(1), shapes.prod(1))  # the real patches come first
    assert len({tuple(s) for s in shapes}) > 1  # the crops' aspects differ: mixed grids in one batch
    state = json.loads(json.dumps(it.get_state()))
    following = [next(it) for _ in range(2)]
    resumed = make_pipeline(demo_naflex_config(), batch_sharding(mesh))
    resumed.set_state(state)
    for want in following:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_evaluation_pads_naflex_batches_with_a_mask():
    from big_contrast.data import make_pipeline

    config = demo_naflex_config(batch_size=48)
    config.sources.demo.split = "eval"
    batches = list(make_pipeline(config, None, train=False))
    last = batches[-1]
    assert not last["mask"].all() and not last["patch_mask"][~last["mask"]].any()
