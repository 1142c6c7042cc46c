"""SILC's local crops in the training pipeline (`data.local_crops` -> ProcessExample's MultiCrop):
the batch field, the global view unchanged by the crops, uint8 crops with device normalisation,
and exact resume."""

import json

import numpy as np
import pytest

from big_contrast.data import make_pipeline
from big_contrast.errors import ConfigError
from tests.test_data_pipeline import assert_same_batches, config_for, take, write_array_record

LOCAL = dict(count=3, size=4, scale=(0.1, 0.5))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_array_record(tmp_path_factory.mktemp("ar") / "data.array_record", range(20))


def _config(records, **overrides):
    config = config_for({"s": {"kind": "array_record", "path": records}}, batch_size=4,
                        pp_train="decode|random_resized_crop(8)|flip_lr|value_range(-1, 1)", **overrides)
    return config


def test_local_crops_add_a_field_and_leave_the_global_view_as_it_was(records):
    plain = take(make_pipeline(_config(records)), 2)
    config = _config(records)
    config.local_crops = LOCAL
    crops = take(make_pipeline(config), 2)
    for a, b in zip(plain, crops):
        assert set(b) == set(a) | {"local_images"}
        assert b["local_images"].shape == (4, 3, 4, 4, 3) and b["local_images"].dtype == np.uint8
        np.testing.assert_array_equal(a["image"], b["image"])  # the same draws for the global view
        np.testing.assert_array_equal(a["text"], b["text"])


def test_host_normalised_crops_are_floats_in_the_global_views_range(records):
    config = _config(records, device_normalize=False)
    config.local_crops = dict(LOCAL, pp="flip_lr|value_range(-1, 1)")
    batch = next(make_pipeline(config))
    assert batch["local_images"].dtype == np.float32 and batch["image"].dtype == np.float32
    assert -1.0 <= batch["local_images"].min() and batch["local_images"].max() <= 1.0


def test_device_normalisation_drops_the_crops_value_op_too(records):
    config = _config(records)
    config.local_crops = dict(LOCAL, pp="flip_lr|value_range(-1, 1)")
    assert next(make_pipeline(config))["local_images"].dtype == np.uint8


def test_a_crop_value_op_unlike_the_global_one_is_one_sentence(records):
    config = _config(records, device_normalize=False)
    config.local_crops = dict(LOCAL, pp="normalize")
    with pytest.raises(ConfigError, match="same value op"):
        make_pipeline(config)


def test_resume_with_local_crops_gives_the_same_batches(records):
    config = _config(records)
    config.local_crops = LOCAL
    iterator = make_pipeline(config)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)  # into the next epoch
    resumed = make_pipeline(config)
    resumed.set_state(state)
    assert_same_batches(expected, take(resumed, 4))
