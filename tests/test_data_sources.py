"""Every source kind read end to end through the pipeline, from small files the tests write.

Image i is a solid colour computed from i and its caption is "image number i", so each example
that comes out of the pipeline can be checked against what was written.
"""

import csv
import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_contrast.data import default_data_config, demo_class_names, demo_source, make_pipeline
from big_contrast.data.demo import HELD_OUT, SHAPES, demo_vocabulary
from big_contrast.data.records import decode_record, encode_record
from big_contrast.data.sources import open_source

N = 10


def colour(i):
    return (20 * i % 256, 255 - 20 * i % 256, 90)


def jpeg(i, size=(12, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour(i)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def data_config(sources, batch_size=4):
    config = default_data_config()
    config.sources = ml_collections.ConfigDict(sources)
    config.batch_size = batch_size
    config.tokenizer, config.lowercase, config.max_len = "bytes", False, 24
    config.pp_train = config.pp_eval = "decode|resize(4)"
    return config


def caption_of(tokens):
    return bytes(int(t) - 3 for t in tokens if t > 2).decode("utf-8")


def read_all(config):
    """One evaluation pass: {caption: mean colour} over the unmasked examples."""
    seen = {}
    for batch in make_pipeline(config, train=False):
        for image, tokens, keep in zip(batch["image"], batch["text"], batch["mask"]):
            if keep:
                seen[caption_of(tokens)] = image.reshape(-1, 3).mean(0)
    return seen


def assert_all_examples(seen, indices=range(N)):
    assert sorted(seen) == sorted(f"image number {i}" for i in indices)
    for i in indices:
        np.testing.assert_allclose(seen[f"image number {i}"], colour(i), atol=4)


def write_images(folder):
    os.makedirs(folder / "img", exist_ok=True)
    for i in range(N):
        (folder / "img" / f"{i}.jpg").write_bytes(jpeg(i))


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_csv_and_tsv_manifests(tmp_path, ext):
    write_images(tmp_path)
    path = tmp_path / f"manifest.{ext}"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if ext == "tsv" else ",")
        writer.writerow(["path", "text", "other"])
        writer.writerows([[f"img/{i}.jpg", f"image number {i}", "x"] for i in range(N)])
    config = data_config({"m": {"kind": "manifest", "path": str(path), "image_key": "path",
                                "caption_key": "text"}})
    assert_all_examples(read_all(config))


def test_jsonl_manifest_with_several_caption_columns(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "manifest.jsonl"
    with open(path, "w") as f:
        for i in range(N):  # one caption column empty, the other a list: both are accepted
            f.write(json.dumps({"filepath": str(tmp_path / "img" / f"{i}.jpg"),  # absolute path
                                "title": "", "alt": [f"image number {i}"]}) + "\n")
    config = data_config({"m": {"kind": "manifest", "path": str(path), "caption_key": "title,alt"}})
    assert_all_examples(read_all(config))


def test_array_record_files(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    for shard, indices in enumerate([range(0, 6), range(6, N)]):
        writer = ArrayRecordWriter(str(tmp_path / f"part-{shard}.array_record"), "group_size:1")
        for i in indices:
            writer.write(encode_record(jpeg(i), [f"image number {i}"], key=str(i)))
        writer.close()
    record = decode_record(encode_record(b"\x01\x02", ["a", "b"], key="k", extra=3))
    assert record == {"image": b"\x01\x02", "captions": ["a", "b"], "key": "k", "extra": 3}
    for path in (str(tmp_path), str(tmp_path / "part-*.array_record")):
        assert_all_examples(read_all(data_config({"ar": {"kind": "array_record", "path": path}})))


def build_tfds_dataset(data_dir):
    import tensorflow_datasets as tfds

    class BcTestCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(7)), "test": self._generate_examples(range(7, N))}

        def _generate_examples(self, indices):
            for i in indices:  # images as encoded bytes: building needs no TensorFlow then
                yield i, {"image": jpeg(i), "captions": [{"text": f"image number {i}"}]}

    BcTestCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source_without_tensorflow(tmp_path):
    build_tfds_dataset(tmp_path / "tfds")
    source = {"kind": "tfds", "name": "bc_test_captions", "data_dir": str(tmp_path / "tfds"),
              "caption_key": "captions/text"}
    assert_all_examples(read_all(data_config({"t": {**source, "split": "train"}})), range(7))
    assert_all_examples(read_all(data_config({"t": {**source, "split": "test"}})), range(7, N))
    with pytest.raises(ValueError, match="no split 'validation'"):
        open_source("t", {**source, "split": "validation"})
    with pytest.raises(ValueError, match="no feature 'caption'"):
        open_source("t", {**source, "caption_key": "caption"})
    with pytest.raises(ValueError, match="not prepared"):
        open_source("t", {**source, "data_dir": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="neither registered nor prepared"):
        open_source("t", {**source, "name": "bc_no_such_dataset"})


def test_demo_source_is_deterministic_and_holds_out_pairs():
    train, again = demo_source("train", size=200), demo_source("train", size=200)
    assert train[7]["image"] == again[7]["image"] and train[7]["captions"] == again[7]["captions"]
    pairs_train = {tuple(train[i]["captions"][1].split(",")[0].split()) for i in range(200)}
    assert not pairs_train & set(HELD_OUT)
    evaluation = demo_source("eval")
    pairs_eval = {tuple(evaluation[i]["captions"][1].split(",")[0].split()) for i in range(48)}
    assert len(pairs_eval) == 48 and set(HELD_OUT) <= pairs_eval
    names = demo_class_names("shape")
    for i in range(20):
        example = train[i]
        shape = names[example["label/shape"]]
        colour_shape = demo_class_names("colour_shape")[example["label/colour_shape"]]
        assert all(shape in c for c in example["captions"])
        assert colour_shape in example["captions"][0]
    assert len(demo_class_names("colour_shape")) == 48 and names == list(SHAPES)
    with pytest.raises(ValueError, match="unknown demo task"):
        demo_class_names("texture")


def test_demo_held_out_selection_and_name_only_captions():
    held = demo_source("eval", size=24, pairs="held_out")
    names = demo_class_names("colour_shape")
    pairs = [tuple(names[held[i]["label/colour_shape"]].split()) for i in range(24)]
    assert set(pairs) == set(HELD_OUT) and pairs[:6] == [p for p in pairs[:6] if p in HELD_OUT]
    assert len({(held.attributes(i)[2], held.attributes(i)[3]) for i in range(24)}) == 4  # layouts vary
    plain = demo_source("train", size=50, captions="names")
    for i in range(50):
        assert plain.captions(i) == [names[plain[i]["label/colour_shape"]]]
    with pytest.raises(ValueError, match="held_out"):
        demo_source("train", pairs="held_out")
    with pytest.raises(ValueError, match="captions"):
        demo_source("eval", captions="short")


def test_demo_groups_differ_in_shape_alone_and_drawing_is_cached():
    from big_contrast.data import demo

    grouped = demo_source("train", size=400, group_size=5)
    assert "groups of 5" in repr(grouped)
    pairs_seen = set()
    for g in range(80):
        members = [grouped.attributes(5 * g + r)[:4] for r in range(5)]
        assert len({(colour, size, position) for colour, _, size, position in members}) == 1
        assert len({shape for _, shape, _, _ in members}) == 5
        pairs_seen.update((colour, shape) for colour, shape, _, _ in members)
    assert not pairs_seen & set(HELD_OUT) and len(pairs_seen) == 42
    example = grouped[12]
    assert example["label/shape"] == SHAPES.index(grouped.attributes(12)[1])
    assert example["image"] is grouped[12]["image"]  # kept after the first draw
    fresh = demo_source("train", size=400, group_size=5)
    fresh._encoded.clear()
    assert fresh[12]["image"] == example["image"] and fresh[12]["captions"] == example["captions"]
    assert demo.CACHE_RECORDS >= 10_000  # the demo's whole train split
    with pytest.raises(ValueError, match="must lie in"):
        demo_source("train", size=60, group_size=6)  # a colour has 5 training shapes
    with pytest.raises(ValueError, match="multiple of group_size"):
        demo_source("train", size=402, group_size=5)
    with pytest.raises(ValueError, match="split='train' only"):
        demo_source("eval", group_size=2)


def test_demo_templates_are_the_captions_with_the_class_left_open():
    from big_contrast.data.demo import COLOURS, demo_templates

    train = demo_source("train", size=300)
    for task, label in (("shape", "label/shape"), ("colour", "label/colour"),
                        ("colour_shape", "label/colour_shape")):
        templates, names = demo_templates(task), demo_class_names(task)
        prompts = {t.format(name) for t in templates for name in names}
        assert len(prompts) == len(templates) * len(names)  # one class per prompt
        for i in range(300):  # every training caption that names the class is a prompt of it
            example = train[i]
            wanted = {t.format(names[example[label]]) for t in templates}
            naming = [c for c in example["captions"] if task != "colour_shape" or names[example[label]] in c]
            assert naming and set(naming) <= wanted
    assert len(demo_templates("shape")) == 328 and "{}" in demo_templates("size")[0]
    assert [t.format("circle") for t in demo_templates("shape", "short")] == [f"{c} circle" for c in COLOURS]
    assert [t.format("red") for t in demo_templates("colour", "short")] == [f"red {s}" for s in SHAPES]
    with pytest.raises(ValueError, match="style"):
        demo_templates("shape", "photo")


def test_demo_pipeline_with_labels():
    config = default_data_config()
    config.batch_size = 16
    config.label_keys = ("label/shape",)
    config.device_normalize = False  # the host runs value_range too: float images in [-1, 1]
    batch = next(make_pipeline(config))
    assert batch["image"].shape == (16, 64, 64, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text"].shape == (16, 16) and batch["text"].dtype == np.int32
    vocabulary = ["<pad>", "<eos>", "<unk>", *demo_vocabulary()]
    for tokens, label in zip(batch["text"], batch["label/shape"]):
        words = [vocabulary[t] for t in tokens if t > 2]
        assert demo_class_names("shape")[label] in words


def test_bad_source_configs_fail_early(tmp_path):
    (tmp_path / "m.csv").write_text("filepath,caption\na.jpg,hello\n")
    cases = [
        ({"kind": "manifest", "path": str(tmp_path / "missing.csv")}, FileNotFoundError, "does not exist"),
        ({"kind": "manifest", "path": str(tmp_path / "m.csv")}, ValueError, r"no column\(s\) \['title'\]"),
        ({"kind": "array_record", "path": str(tmp_path / "nope.array_record")}, FileNotFoundError, "does not exist"),
        ({"kind": "array_record", "path": str(tmp_path)}, FileNotFoundError, "no \\*.array_record"),
        ({"kind": "tar", "path": "x.tar"}, ValueError, "big-contrast data convert"),
        ({"kind": "parquet"}, ValueError, "kind='parquet'"),
        ({"kind": "demo", "splitt": "eval"}, ValueError, "unknown field"),
        ({"kind": "manifest"}, ValueError, "needs 'path'"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            make_pipeline(data_config({"s": source}))
