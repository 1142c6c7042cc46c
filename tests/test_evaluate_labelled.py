"""Labelled sources and every-caption retrieval, end to end through the eval data glue.

Each source is written as tiny files (solid-colour PNG / JPEG images) and read by the same
glue the trainer and `big-contrast eval` use (`train.evals.eval_data_config` + `EvalData`).
The encoders are fixed numpy functions of the decoded pixels and tokens, so the metrics can be
checked against a brute-force reference computed straight from the files.
"""

import io
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import encoded_image, unit
from PIL import Image

from big_contrast import evaluate
from big_contrast.data import default_data_config, make_tokenizer
from big_contrast.data.errors import MissingDataError
from big_contrast.data.tokenizer import encode_fixed
from big_contrast.evaluate.embed import embed_pairs_for
from big_contrast.train.evals import EvalData, eval_data_config

CLASSES = ["red thing", "green thing", "blue thing"]
FOLDERS = ["a_red", "b_green", "c_blue"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]
BASE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
PER_CLASS = 4
MAX_LEN = 24
PROJECTION = np.random.default_rng(6).normal(size=(3, 8))
TOKEN_TABLE = np.random.default_rng(1).normal(size=(260, 8))
TOKENIZER = make_tokenizer("bytes", False)


def colour(label, i):
    return np.clip(BASE[label] + np.array([37, -23, 11]) * (i - 1.5) * (1 + label), 0, 255)


def embed_images(images):
    return np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1) @ PROJECTION


def embed_texts(tokens):
    return TOKEN_TABLE[np.asarray(tokens)].sum(-2)


def tokenize(texts):
    return np.stack([encode_fixed(TOKENIZER, t, MAX_LEN) for t in texts])


ENCODERS = evaluate.Encoders(embed_images, embed_texts, tokenize)


def decoded_embedding(data: bytes):
    return embed_images(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]


def write_examples(root):
    """Class folders of PNGs and JPEGs (one upper-case extension); returns (relative path, label, bytes)."""
    examples = []
    for label, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        for i in range(PER_CLASS):
            fmt, ext = ("PNG", ".png") if i % 2 else ("JPEG", ".JPG" if i == 0 else ".jpeg")
            data = encoded_image(colour(label, i), fmt)
            (root / folder / f"{i}{ext}").write_bytes(data)
            examples.append((f"{folder}/{i}{ext}", label, data))
    (root / FOLDERS[0] / "notes.txt").write_text("not an image")
    return examples


def full_config(source, **data):
    config = ml_collections.ConfigDict({"data": default_data_config()})
    config.data.update(tokenizer="bytes", lowercase=False, max_len=MAX_LEN, pp_eval="decode|resize(4)")
    return config, dict(sources={"eval": source}, **data)


def zero_shot(source, class_names=CLASSES, **extra):
    config, data = full_config(source, label_keys=("label",))
    evaluator = evaluate.build_evaluator("zs", dict(type="zero_shot", class_names=class_names, templates=TEMPLATES,
                                                    batch_size=5, ks=(1, 2), **extra, data=data))
    return evaluator, EvalData(eval_data_config(config, evaluator), evaluator.batch_size)


def reference_topk(examples, ks=(1, 2)):
    """Brute force: normalised mean of normalised prompt embeddings, stable argsort per image."""
    prompts = unit(embed_texts(tokenize([t.replace("{}", c) for c in CLASSES for t in TEMPLATES])))
    classifier = unit(prompts.reshape(len(CLASSES), len(TEMPLATES), -1).mean(1))
    zimg = unit(np.stack([decoded_embedding(data) for _, _, data in examples]))
    labels = np.array([label for _, label, _ in examples])
    order = np.argsort(-(zimg @ classifier.T), axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def assert_matches_reference(evaluator, data, examples):
    got = evaluator.evaluate(data, ENCODERS)
    expected = reference_topk(examples)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0 < expected["top1"] < expected["top2"] < 1  # the fixture is neither trivially right nor wrong


def test_image_folder_png_and_jpeg_with_a_corrupt_file_counted(tmp_path):
    examples = write_examples(tmp_path / "val")
    (tmp_path / "val" / FOLDERS[1] / "broken.png").write_bytes(b"\x89PNG not really")
    evaluator, data = zero_shot({"kind": "image_folder", "path": str(tmp_path / "val")})
    assert_matches_reference(evaluator, data, examples)
    assert data.skipped == 1
    # Class names from the folder names, through a WordNet-style 'RAW NAME' map file.
    (tmp_path / "map.txt").write_text("".join(f"{f} {c}\n" for f, c in zip(FOLDERS, CLASSES)))
    evaluator, data = zero_shot({"kind": "image_folder", "path": str(tmp_path / "val")},
                                class_names=f"folder:{tmp_path / 'val'}", class_name_map=str(tmp_path / "map.txt"))
    assert evaluator.class_names == CLASSES
    assert_matches_reference(evaluator, data, examples)


@pytest.mark.parametrize("label_column", ["index", "name"])
def test_csv_manifest_with_integer_or_class_name_labels(tmp_path, label_column):
    examples = write_examples(tmp_path / "images")
    rows = ["filepath,label"] + [f"images/{path},{label if label_column == 'index' else CLASSES[label]}"
                                 for path, label, _ in examples]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    evaluator, data = zero_shot({"kind": "manifest", "path": str(tmp_path / "val.csv"), "label_key": "label"})
    assert_matches_reference(evaluator, data, examples)


def build_labelled_tfds(data_dir, examples, names=FOLDERS):
    class BcTestLabelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=names)}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, (_, label, data) in enumerate(examples):
                yield i, {"image": data, "label": label}

    BcTestLabelled(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return {"kind": "tfds", "name": "bc_test_labelled", "split": "test", "data_dir": str(data_dir),
            "label_key": "label"}


def test_tfds_class_label_dataset_without_captions(tmp_path):
    examples = [e for e in write_examples(tmp_path / "images") if e[0].endswith(".png")]  # lossless only
    source = build_labelled_tfds(tmp_path / "tfds", examples)
    evaluator, data = zero_shot(source)
    assert_matches_reference(evaluator, data, examples)
    # Class names read from the ClassLabel, mapped to prompt names.
    evaluator, _ = zero_shot(source, class_names="tfds:bc_test_labelled", tfds_data_dir=str(tmp_path / "tfds"),
                             class_name_map=dict(zip(FOLDERS, CLASSES)))
    assert evaluator.class_names == CLASSES
    with pytest.raises(ValueError, match=r"feature 'label' has 3 classes but the class-name list has 2 names"):
        zero_shot(source, class_names=CLASSES[:2])


def test_bad_labelled_inputs_fail_before_anything_is_embedded(tmp_path):
    write_examples(tmp_path / "val")
    calls = []
    encoders = evaluate.Encoders(lambda x: calls.append(x), lambda x: calls.append(x), tokenize)

    def fails(source, match, **extra):
        with pytest.raises(ValueError, match=match):
            evaluator, data = zero_shot(source, **extra)
            evaluator.run(data, encoders)
        assert not calls

    folder = {"kind": "image_folder", "path": str(tmp_path / "val")}
    fails(folder, r"image folder .*val' has 3 classes but the class-name list has 4 names",
          class_names=CLASSES + ["extra"])
    (tmp_path / "val" / "d_empty").mkdir()
    fails(folder, r"class folder .*d_empty' has no images")
    (tmp_path / "flat").mkdir()
    fails({"kind": "image_folder", "path": str(tmp_path / "flat")}, r"'.*flat' has no class sub-folders")
    with pytest.raises(MissingDataError, match=r"image folder .*nowhere' does not exist"):
        zero_shot({"kind": "image_folder", "path": str(tmp_path / "nowhere")})
    for label, match in (("7", r"row 2 column 'label': label 7 lies outside the class list \(\[0, 3\)\)"),
                         ("purple thing", r"row 2 column 'label': label 'purple thing' is not in the class-name list")):
        (tmp_path / "bad.csv").write_text(f"filepath,label\nval/a_red/0.JPG,0\nval/a_red/1.png,{label}\n")
        fails({"kind": "manifest", "path": str(tmp_path / "bad.csv"), "label_key": "label"}, match)


def write_karpathy(root, captions_per_image=(1, 5, 3, 2, 4, 1)):
    """A Flickr-style Karpathy file: images with 1-5 captions each, plus one 'val' image."""
    (root / "images").mkdir(parents=True)
    entries, examples = [], []
    for i, k in enumerate(captions_per_image):
        data = encoded_image(colour(i % 3, i % 4), "PNG")
        (root / "images" / f"{i}.png").write_bytes(data)
        captions = [f"image {i} caption {j}" for j in range(k)]
        entries.append({"filename": f"{i}.png", "split": "test", "sentences": [{"raw": c} for c in captions]})
        examples.append((data, captions))
    entries.append({"filename": "0.png", "split": "val", "sentences": [{"raw": "held out"}]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return examples


def test_retrieval_embeds_every_caption_through_the_pipeline(tmp_path):
    examples = write_karpathy(tmp_path)
    config, data = full_config({"kind": "karpathy", "path": str(tmp_path / "dataset_flickr30k.json"),
                                "image_dir": str(tmp_path / "images")}, max_captions=5)
    evaluator = evaluate.build_evaluator("flickr", dict(type="retrieval", text_field="texts", ks=(1, 2, 5),
                                                        caption_mask_field="caption_mask", batch_size=4, data=data))
    zimg, ztxt, img_of_txt = embed_pairs_for(evaluator, EvalData(eval_data_config(config, evaluator), 4), ENCODERS)
    assert len(zimg) == len(examples) and len(ztxt) == sum(len(c) for _, c in examples) == 16
    got = evaluator.evaluate(EvalData(eval_data_config(config, evaluator), 4), ENCODERS)

    ref_img = unit(np.stack([decoded_embedding(d) for d, _ in examples]))
    ref_txt = unit(embed_texts(tokenize([c for _, caps in examples for c in caps])))
    ref_img_of_txt = np.concatenate([[i] * len(caps) for i, (_, caps) in enumerate(examples)])
    scores = ref_img @ ref_txt.T
    i2t_order = np.argsort(-scores, axis=1, kind="stable")
    t2i_order = np.argsort(-scores.T, axis=1, kind="stable")
    i2t_rank = np.array([np.flatnonzero(ref_img_of_txt[row] == i)[0] for i, row in enumerate(i2t_order)])
    t2i_rank = np.array([np.flatnonzero(row == ref_img_of_txt[t])[0] for t, row in enumerate(t2i_order)])
    expected = {}
    for k in (1, 2, 5):
        expected[f"i2t_recall@{k}"] = float(np.mean(i2t_rank < k))
        expected[f"t2i_recall@{k}"] = float(np.mean(t2i_rank < k))
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0 < expected["t2i_recall@1"] < 1
    # More captions than max_captions is an error that says what to raise, not a silent cut.
    config.data.max_captions = 4
    evaluator = evaluate.build_evaluator("flickr", dict(type="retrieval", text_field="texts",
                                                        caption_mask_field="caption_mask", batch_size=4,
                                                        data={**data, "max_captions": 4}))
    with pytest.raises(ValueError, match="an image has 5 captions, more than data.max_captions=4"):
        evaluator.evaluate(EvalData(eval_data_config(config, evaluator), 4), ENCODERS)


def test_tfds_captions_sequence_keeps_every_caption(tmp_path):
    """coco_captions-style `captions/text` (a Sequence): every caption of every image reaches the batch."""
    counts = (3, 1, 5, 2)

    class BcTestManyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, k in enumerate(counts):
                captions = [{"text": f"img {i} cap {j}"} for j in range(k)]
                yield i, {"image": encoded_image(colour(0, i)), "captions": captions}

    BcTestManyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config, data = full_config({"kind": "tfds", "name": "bc_test_many_captions", "split": "test",
                                "data_dir": str(tmp_path), "caption_key": "captions/text"}, max_captions=5)
    config.data.update(data)
    config.data.sources = ml_collections.ConfigDict(data["sources"])
    captions = {}
    for batch in EvalData(config.data, 4):
        for texts, mask, valid in zip(batch["texts"], batch["caption_mask"], batch["_valid"]):
            if valid:
                decoded = [bytes(int(t) - 3 for t in row if t > 2).decode() for row in texts[mask]]
                captions[decoded[0].split(" cap")[0]] = decoded
    assert captions == {f"img {i}": [f"img {i} cap {j}" for j in range(k)] for i, k in enumerate(counts)}


def test_captions_are_optional_in_evaluation_only():
    from big_contrast.data.errors import REASON_INDEX
    from big_contrast.data.preprocess import ProcessExample

    raw = {"image": encoded_image((10, 20, 30)), "label": 2, "_source": 0}
    rng = np.random.default_rng(0)
    evaluation = ProcessExample("decode|resize(4)", TOKENIZER, MAX_LEN, ("label",), captions_optional=True)
    assert sorted(evaluation.random_map(dict(raw), rng)) == ["_source", "image", "label"]
    training = ProcessExample("decode|resize(4)", TOKENIZER, MAX_LEN, ("label",))
    assert training.random_map(dict(raw), rng) == {"_skip": REASON_INDEX["empty_caption"], "_source": 0}
