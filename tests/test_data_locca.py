"""LocCa's boxes from a source through the data pipeline: the demo source's shape boxes, a
manifest's `boxes` column, the decoder target fields of `config.data.decoder_targets` (their task
drawn per example, the same after a resume), malformed boxes skipped and counted, and a cropping
pp refused."""

import json

import ml_collections
import numpy as np
import pytest

from big_contrast.data import default_data_config, make_pipeline
from big_contrast.data.demo import demo_source, shape_box, shape_coverage
from big_contrast.data.location_targets import TASKS, LocationVocab, tokens_to_box
from test_data_sources import jpeg

LOCCA = dict(num_bins=32, text_vocab_size=64)


def demo_config(batch_size=8, **targets):
    config = default_data_config()
    config.sources = ml_collections.ConfigDict(
        {"demo": dict(kind="demo", split="train", size=40, image_size=32, boxes=True)})
    config.batch_size = batch_size
    config.pp_train = config.pp_eval = "decode|resize(32)|value_range(-1, 1)"
    config.decoder_targets = dict(LOCCA, **targets)
    return config


@pytest.mark.parametrize("index", range(0, 60, 7))
def test_the_demo_box_bounds_the_drawn_shape(index):
    """The box is the extent of the shape the drawing fills: the rasterised mask (at the drawing's
    own 2x resolution, 64 px) lies inside it and reaches each of its sides to within one pixel."""
    source = demo_source("train", size=60, image_size=32, boxes=True)
    ymin, xmin, ymax, xmax = box = shape_box(source, index)
    assert source[index]["boxes"] == [{"box": box, "phrase": " ".join(source.attributes(index)[:2])}]
    grid = 64
    ys, xs = np.nonzero(shape_coverage(source, index, grid) > 0)
    cell = 1.0 / grid
    assert ymin - cell <= ys.min() * cell and (ys.max() + 1) * cell <= ymax + cell
    assert xmin - cell <= xs.min() * cell and (xs.max() + 1) * cell <= xmax + cell
    np.testing.assert_allclose([ys.min() * cell, xs.min() * cell, (ys.max() + 1) * cell, (xs.max() + 1) * cell],
                               box, atol=cell)
    assert "boxes" not in demo_source("train", size=60, image_size=32)[index]


def test_pipeline_batches_hold_the_decoder_targets_with_tasks_drawn_per_example():
    batch = next(make_pipeline(demo_config(batch_size=40), None))
    targets, mask, task, box = (batch[k] for k in ("decoder_targets", "decoder_mask", "decoder_task", "decoder_box"))
    assert targets.shape == (40, 16) and mask.dtype == bool and task.shape == (40,) and box.shape == (40, 4)
    assert set(task.tolist()) == {0, 1, 2}  # equal odds: all three tasks among 40 examples
    vocab = LocationVocab(64, 32)
    for row in np.flatnonzero(task == TASKS.index("referring")):
        start = int(np.argmax(mask[row]))  # the loss starts at the box: <ref> phrase is the prompt
        decoded = tokens_to_box(targets[row, start:start + 4], vocab)
        np.testing.assert_allclose(decoded, box[row], atol=0.5 / 32 + 1e-6)
    for row in np.flatnonzero(task == TASKS.index("caption")):
        assert targets[row, 0] == vocab.task_id("caption") and not mask[row, 0] and mask[row, 1]
        np.testing.assert_array_equal(box[row], 0)


def test_a_resumed_pipeline_draws_the_same_tasks_and_the_text_is_unchanged():
    config = demo_config()
    plain = default_data_config()
    plain.update(sources=config.sources.copy_and_resolve_references(), batch_size=8, pp_train=config.pp_train)
    it = make_pipeline(config, None)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = make_pipeline(config, None)
    resumed.set_state(state)
    again = next(resumed)
    for key in ("decoder_targets", "decoder_mask", "decoder_task", "text", "image"):
        np.testing.assert_array_equal(again[key], expected[key])
    # The task is drawn after the caption and the image ops: the towers' inputs are what they were.
    without = make_pipeline(plain, None)
    next(without)
    second = next(without)
    np.testing.assert_array_equal(second["text"], expected["text"])
    np.testing.assert_array_equal(second["image"], expected["image"])
    assert "decoder_targets" not in second


def write_manifest(tmp_path, cells):
    for i in range(len(cells)):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        f.write("filepath,title,boxes\n")
        for i, cell in enumerate(cells):
            f.write(f'{i}.jpg,image number {i},"{cell.replace(chr(34), chr(34) * 2)}"\n')
    return path


def test_a_manifest_boxes_column_feeds_the_targets_and_malformed_boxes_are_counted(tmp_path):
    good = json.dumps([{"box": [0.1, 0.2, 0.5, 0.6], "phrase": "a thing"}])
    bad = json.dumps([{"box": [0.7, 0.2, 0.5, 0.6], "phrase": "upside down"}])
    path = write_manifest(tmp_path, [good, "", bad, good])
    config = default_data_config()
    config.sources = ml_collections.ConfigDict({"m": dict(kind="manifest", path=str(path), boxes_key="boxes")})
    config.update(batch_size=3, tokenizer="bytes", max_len=24, pp_eval="decode|resize(4)")
    config.decoder_targets = dict(LOCCA, text_vocab_size=300, task_weights=dict(referring=1))
    it = make_pipeline(config, None, train=False)
    batch = next(it)
    task = batch["decoder_task"][batch["mask"]].tolist()
    assert sorted(task) == [TASKS.index("caption"), TASKS.index("referring"), TASKS.index("referring")]
    referring = batch["decoder_box"][batch["decoder_task"] == TASKS.index("referring")]
    np.testing.assert_allclose(referring, [[0.1, 0.2, 0.5, 0.6]] * 2, rtol=1e-6)
    list(it)
    assert it.skip_counts()["skipped/m/malformed_box"] == 1


def test_a_manifest_without_the_boxes_column_and_a_cropping_pp_fail_with_one_sentence(tmp_path):
    path = write_manifest(tmp_path, ["[]"])
    config = default_data_config()
    config.sources = ml_collections.ConfigDict({"m": dict(kind="manifest", path=str(path), boxes_key="regions")})
    with pytest.raises(ValueError, match=r"no column\(s\) \['regions'\]"):
        make_pipeline(config, None, train=False)
    cropping = demo_config()
    cropping.pp_train = "decode|random_resized_crop(32)|value_range(-1, 1)"
    with pytest.raises(ValueError, match="move the boxes"):
        make_pipeline(cropping, None)
