"""The grain pipeline: determinism, per-process sharding, exact resume, mixtures, skip accounting,
evaluation padding and global sharded batches on the 8-device mesh."""

import io
import json

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from big_contrast.data import TooManySkippedError, default_data_config, make_pipeline
from big_contrast.data.records import encode_record


def jpeg(i):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_array_record(path, indices, captions=None):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in indices:
        writer.write(encode_record(jpeg(i), [f"n{i}"] if captions is None else captions(i)))
    writer.close()
    return str(path)


def config_for(sources, batch_size=4, **overrides):
    config = default_data_config()
    config.sources = ml_collections.ConfigDict(sources)
    config.batch_size = batch_size
    config.tokenizer, config.lowercase, config.max_len = "bytes", False, 12
    config.pp_train = "decode|random_resized_crop(4)|flip_lr|value_range"
    config.pp_eval = "decode|resize(4)|value_range"
    config.update(overrides)
    return config


def names_of(batch):
    """The caption of each example, e.g. 'n7' (captions are unique per record here)."""
    return [bytes(int(t) - 3 for t in row if t > 2).decode() for row in batch["text"]]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_array_record(tmp_path_factory.mktemp("ar") / "data.array_record", range(30))


def test_same_seed_same_batches_other_seed_other_batches(records):
    config = config_for({"s": {"kind": "array_record", "path": records}})
    first = take(make_pipeline(config), 4)
    assert_same_batches(first, take(make_pipeline(config), 4))
    other = take(make_pipeline(config, seed=1), 4)
    assert [names_of(b) for b in other] != [names_of(b) for b in first]


def test_processes_see_disjoint_examples_that_cover_the_data(records):
    config = config_for({"s": {"kind": "array_record", "path": records}}, batch_size=15)
    per_process = []
    for index in range(3):  # 3 simulated hosts, 5 examples per step each: 2 steps = one epoch
        batches = take(make_pipeline(config, process_index=index, process_count=3), 2)
        per_process.append({name for b in batches for name in names_of(b)})
    assert all(len(names) == 10 for names in per_process)
    assert not (per_process[0] & per_process[1] or per_process[0] & per_process[2]
                or per_process[1] & per_process[2])
    assert set.union(*per_process) == {f"n{i}" for i in range(30)}


def test_evaluation_pass_pads_and_masks_in_step_across_processes(records):
    config = config_for({"s": {"kind": "array_record", "path": records}}, batch_size=8)
    seen, lengths = [], []
    for index in range(2):  # 15 records per host, 4 per batch: 4 batches, the last one padded
        batches = list(make_pipeline(config, train=False, process_index=index, process_count=2))
        lengths.append(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == 4 and batch["mask"].dtype == bool
            seen += [name for name, keep in zip(names_of(batch), batch["mask"]) if keep]
        assert batches[-1]["mask"].tolist() == [True, True, True, False]
    assert lengths == [4, 4]
    assert sorted(seen) == sorted(f"n{i}" for i in range(30))


def test_resume_from_saved_state_mid_epoch_gives_the_same_batches(records):
    config = config_for({"s": {"kind": "array_record", "path": records}}, batch_size=8)
    iterator = make_pipeline(config)
    take(iterator, 2)  # 16 of 30 records: the saved position is mid-epoch
    state = json.loads(json.dumps(iterator.get_state()))  # survives JSON (orbax JsonSave)
    expected = take(iterator, 5)  # crosses into the next, reshuffled epoch
    resumed = make_pipeline(config)
    resumed.set_state(state)
    assert_same_batches(expected, take(resumed, 5))
    assert resumed.skip_counts() == iterator.skip_counts()


def test_resume_with_worker_processes():
    config = config_for({"d": {"kind": "demo", "size": 40, "image_size": 16}}, batch_size=4,
                        num_workers=2, pp_train="decode|random_resized_crop(8)|value_range")
    with make_pipeline(config) as iterator:
        take(iterator, 3)
        state = iterator.get_state()
        expected = take(iterator, 4)
    with make_pipeline(config) as resumed:
        resumed.set_state(state)
        assert_same_batches(expected, take(resumed, 4))


def test_groups_of_records_share_a_batch_and_resume_exactly(records):
    config = config_for({"s": {"kind": "array_record", "path": records, "group_size": 3}}, batch_size=6)
    iterator = make_pipeline(config)
    epochs = [[int(n[1:]) for batch in take(iterator, 5) for n in names_of(batch)] for _ in range(2)]
    for order in epochs:  # 10 groups of 3 per epoch, each whole and in its own order
        assert sorted(order) == list(range(30))
        assert all(order[i:i + 3] == list(range(order[i], order[i] + 3)) and order[i] % 3 == 0
                   for i in range(0, 30, 3))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    state = iterator.get_state()
    expected = take(iterator, 3)
    resumed = make_pipeline(config)
    resumed.set_state(state)
    assert_same_batches(expected, take(resumed, 3))
    with pytest.raises(ValueError, match="interleaves them record by record"):
        make_pipeline(config_for({"s": config.sources.s.to_dict(), "t": {"kind": "array_record", "path": records}}))
    with pytest.raises(ValueError, match="group_size=0 must be a positive int"):
        make_pipeline(config_for({"s": {"kind": "array_record", "path": records, "group_size": 0}}))


def test_mixture_follows_weights_and_counts_per_source(tmp_path):
    a = write_array_record(tmp_path / "a.array_record", range(0, 20))
    b = write_array_record(tmp_path / "b.array_record", range(100, 120))
    config = config_for({"a": {"kind": "array_record", "path": a, "weight": 3.0},
                         "b": {"kind": "array_record", "path": b, "weight": 1.0}}, batch_size=8)
    iterator = make_pipeline(config)
    names = [name for batch in take(iterator, 25) for name in names_of(batch)]
    from_a = sum(int(name[1:]) < 100 for name in names)
    assert abs(from_a / len(names) - 0.75) < 0.05
    counts = iterator.skip_counts()
    assert counts["seen/a"] == from_a and counts["seen/b"] == len(names) - from_a


def bad_manifest(tmp_path, n_good):
    """A JSONL manifest with n_good good rows followed by one bad row per reason."""
    rows = []
    for i in range(n_good):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"filepath": f"{i}.jpg", "title": f"n{i}"})
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "cut.jpg").write_bytes(jpeg(0)[:300])
    rows += [{"filepath": "missing.jpg", "title": "gone"},  # missing_image
             {"filepath": "0.jpg", "title": "   "},  # empty_caption
             {"filepath": "0.jpg", "title": 12345},  # non_text_caption
             {"filepath": "garbage.jpg", "title": "x"},  # undecodable_image
             {"filepath": "cut.jpg", "title": "y"}]  # undecodable_image (truncated file)
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_records_are_skipped_and_counted_per_reason(tmp_path):
    config = config_for({"m": {"kind": "manifest", "path": bad_manifest(tmp_path, 7)}},
                        batch_size=4, max_skip_fraction=None)
    iterator = make_pipeline(config, train=False)
    names = [n for batch in iterator for n, keep in zip(names_of(batch), batch["mask"]) if keep]
    assert sorted(names) == sorted(f"n{i}" for i in range(7))
    counts = iterator.skip_counts()
    assert counts["seen/m"] == 12
    assert {k: v for k, v in counts.items() if k.startswith("skipped/m/") and v} == {
        "skipped/m/missing_image": 1, "skipped/m/empty_caption": 1,
        "skipped/m/non_text_caption": 1, "skipped/m/undecodable_image": 2}
    assert counts["skipped/undecodable_image"] == 2


def test_too_many_skipped_names_the_source_and_reason(tmp_path):
    config = config_for({"flaky": {"kind": "manifest", "path": bad_manifest(tmp_path, 3)}},
                        batch_size=2, max_skip_fraction=0.2, min_seen=4)
    with pytest.raises(TooManySkippedError, match=r"'flaky'.*undecodable_image"):
        take(make_pipeline(config), 10)


def test_a_source_with_only_bad_records_stops_instead_of_hanging(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("filepath,title\n" + "".join(f"missing{i}.jpg,cap\n" for i in range(5)))
    config = config_for({"empty": {"kind": "manifest", "path": str(path)}}, min_seen=50)
    with pytest.raises(TooManySkippedError, match=r"'empty'.*missing_image"):
        next(make_pipeline(config))


@pytest.mark.parametrize("explicit", [False, True])
def test_global_batches_are_sharded_over_the_batch_axes(records, explicit):
    if explicit:
        mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    else:
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    config = config_for({"s": {"kind": "array_record", "path": records}}, batch_size=16,
                        label_keys=())
    batch = next(make_pipeline(config, mesh))
    local = next(make_pipeline(config))
    for key in ("image", "text"):
        array = batch[key]
        assert isinstance(array, jax.Array) and array.shape == local[key].shape
        assert array.sharding.spec[0] == ("data", "fsdp")
        assert len(array.addressable_shards) == 8
        assert array.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(array), local[key])
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    assert next(make_pipeline(config, sharding))["text"].sharding.spec[0] == "data"
    with pytest.raises(ValueError, match="does not divide over the 8 batch shards"):
        make_pipeline(config, mesh, global_batch_size=12)
    with pytest.raises(ValueError, match="only possible without a sharding"):
        make_pipeline(config, mesh, process_index=1, process_count=2)


def test_bad_pipeline_settings_fail_early(records):
    source = {"s": {"kind": "array_record", "path": records}}
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        make_pipeline(config_for(source, batch_size=4), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="weight"):
        make_pipeline(config_for({"s": {**source["s"], "weight": 0.0}}))
    with pytest.raises(ValueError, match="unknown image op"):
        make_pipeline(config_for(source, pp_train="decode|sharpen"))



def test_an_image_pp_without_a_fixed_size_is_reported(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "sizes.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(4):
        image = io.BytesIO()
        Image.new("RGB", (8 + i, 8)).save(image, format="PNG")
        writer.write(encode_record(image.getvalue(), [f"n{i}"]))
    writer.close()
    config = config_for({"s": {"kind": "array_record", "path": path}}, pp_train="decode|resize_small(4)")
    with pytest.raises(ValueError, match="different 'image' shapes"):
        next(make_pipeline(config))


def test_shared_memory_stacking_matches_numpy_and_allocator_tuning_applies():
    from big_contrast.data.batching import stack_examples
    from big_contrast.data.memory import keep_freed_memory

    rng = np.random.default_rng(0)
    examples = [{"image": rng.uniform(size=(3, 3, 3)).astype(np.float32),
                 "text": rng.integers(0, 9, size=5).astype(np.int32), "_source": 0} for _ in range(4)]
    shared = stack_examples(examples, shared_memory=True)
    assert set(shared) == {"image", "text"}
    for key in shared:
        np.testing.assert_array_equal(shared[key], np.stack([ex[key] for ex in examples]))
        assert type(shared[key]).__name__ == "SharedMemoryArray"
        shared[key].unlink_on_del()  # as the receiving process does; frees /dev/shm
    assert keep_freed_memory() is True  # Linux / glibc, as on the test machine


def test_device_normalize_sends_uint8_images_that_normalise_to_the_float_batch(records):
    """Same examples either way; only the final value_range moves to `device_ops`."""
    from big_contrast.data.device_ops import device_normalization, normalize_on_device

    batches = {}
    for uint8 in (False, True):
        with make_pipeline(config_for({"d": {"kind": "array_record", "path": records}},
                                      device_normalize=uint8)) as it:
            batches[uint8] = next(it)
    assert batches[False]["image"].dtype == np.float32 and batches[True]["image"].dtype == np.uint8
    np.testing.assert_array_equal(batches[True]["text"], batches[False]["text"])
    norm = device_normalization(config_for({}).pp_train)
    np.testing.assert_allclose(normalize_on_device(batches[True]["image"], norm),
                               batches[False]["image"], rtol=1e-6, atol=1e-6)
