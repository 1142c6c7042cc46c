"""Zero-shot classifier, top-k accuracy, prompt templates and class-name sources."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_contrast.evaluate import prompts
from big_contrast.evaluate.imagenet_classes import IMAGENET_CLASSNAMES
from big_contrast.evaluate.zero_shot import (
    ZeroShotEvaluator, classifier_from_prompt_embeddings, topk_accuracy)


def brute_force_topk(zimg, classifier, labels, ks):
    """Accuracy from np.argsort(-logits, kind='stable') over all classes."""
    logits = np.asarray(zimg, np.float64) @ np.asarray(classifier, np.float64).T
    order = np.argsort(-logits, axis=1, kind="stable")
    position = np.argmax(order == np.asarray(labels)[:, None], axis=1)
    return {k: float(np.mean(position < k)) for k in ks}


def test_classifier_is_normalised_mean_of_normalised_prompts():
    rng = np.random.default_rng(11)
    ztxt = rng.normal(size=(5, 3, 4)) * rng.uniform(0.1, 10, size=(5, 3, 1))  # prompts of unequal norms
    expected = np.stack([
        np.mean([p / np.linalg.norm(p) for p in prompts_of_class], axis=0) for prompts_of_class in ztxt])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(classifier_from_prompt_embeddings(ztxt), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_matches_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    classifier = rng.normal(size=(12, 8)).astype(np.float32)
    labels = rng.integers(0, 12, size=50)
    zimg = (classifier[labels] + 1.5 * rng.normal(size=(50, 8))).astype(np.float32)
    expected = brute_force_topk(zimg, classifier, labels, (1, 5))
    assert 0 < expected[1] < expected[5] < 1
    got = topk_accuracy(zimg, classifier, labels, (1, 5), chunk=16)  # 50 images: 4 chunks, the last padded
    assert got == pytest.approx({"top1": expected[1], "top5": expected[5]}, abs=1e-12)


def test_topk_ties_from_duplicate_class_names():
    """Two identical classifier rows (ImageNet has two 'sunglasses'): the lower index wins the tie."""
    rng = np.random.default_rng(5)
    classifier = rng.integers(-1, 2, size=(6, 8)).astype(np.float32) / 2
    classifier[4] = classifier[1]
    labels = np.array([1, 4, 1, 4, 0, 2, 3, 5, 4, 1])
    zimg = classifier[labels].copy()
    zimg[4:] += rng.integers(-1, 2, size=(6, 8)) / 4
    expected = brute_force_topk(zimg, classifier, labels, (1, 2, 5))
    got = topk_accuracy(zimg, classifier, labels, (1, 2, 5))
    assert got == pytest.approx({f"top{k}": v for k, v in expected.items()}, abs=1e-12)
    assert got["top1"] < 1  # images of class 4 lose their tie against class 1


def test_k_is_clamped_to_the_number_of_classes():
    classifier = np.eye(3, dtype=np.float32)
    zimg = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], np.float32)
    got = topk_accuracy(zimg, classifier, np.array([0, 2, 1]), (1, 5))
    assert got == pytest.approx({"top1": 1 / 3, "top3": 1.0})


def test_bad_labels_are_reported():
    with pytest.raises(ValueError, match="Labels must lie in"):
        topk_accuracy(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.array([0, 1, 3]))


def test_shipped_templates_and_class_names():
    assert len(prompts.IMAGENET_TEMPLATES) == len(set(prompts.IMAGENET_TEMPLATES)) == 80
    assert set(prompts.SIMPLE_IMAGENET_TEMPLATES) <= set(prompts.IMAGENET_TEMPLATES)
    assert len(prompts.SIMPLE_IMAGENET_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in prompts.IMAGENET_TEMPLATES)
    assert len(IMAGENET_CLASSNAMES) == 1000
    # Spot checks against the ImageNet label order (TFDS imagenet2012 / torchvision indices).
    assert IMAGENET_CLASSNAMES[0] == "tench"
    assert IMAGENET_CLASSNAMES[207] == "Golden Retriever"
    assert IMAGENET_CLASSNAMES[281] == "tabby cat"
    assert IMAGENET_CLASSNAMES[817] == "sports car"
    assert IMAGENET_CLASSNAMES[999] == "toilet paper"
    assert prompts.resolve_class_names("imagenet") == list(IMAGENET_CLASSNAMES)
    assert prompts.build_prompts(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]


def test_template_errors():
    with pytest.raises(ValueError, match=r"no '\{\}' placeholder"):
        prompts.resolve_templates(["a photo of a cat."])
    with pytest.raises(ValueError, match=r"no '\{\}' placeholder"):
        ZeroShotEvaluator("bad", {"class_names": ["cat"], "templates": ["a photo of a {c}."]})
    with pytest.raises(ValueError, match="Unknown template set"):
        prompts.resolve_templates("imagenet_81")
    with pytest.raises(ValueError, match="empty"):
        prompts.resolve_templates([])


def test_empty_class_list_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="class-name list .* is empty"):
        ZeroShotEvaluator("bad", {"class_names": [], "templates": "photo"})
    empty = tmp_path / "names.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        prompts.resolve_class_names(f"file:{empty}")


def test_class_names_from_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("Great_White shark\nGeoffroy's spider-monkey\nkite (bird of prey)\n\n")
    assert prompts.resolve_class_names(f"file:{path}") == [
        "Great_White shark", "Geoffroy's spider-monkey", "kite (bird of prey)"]
    assert prompts.resolve_class_names(f"file:{path}", canonicalize=True) == [
        "great white shark", "geoffroys spider monkey", "kite bird of prey"]
    path.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="blank lines"):
        prompts.resolve_class_names(f"file:{path}")
    with pytest.raises(ValueError, match="does not exist"):
        prompts.resolve_class_names(f"file:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="neither a built-in list"):
        prompts.resolve_class_names("imagenet21k")


class EvalTestTinyLabels(tfds.core.GeneratorBasedBuilder):
    """A three-example TFDS dataset with a ClassLabel feature, built into a temporary folder."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "fine": tfds.features.ClassLabel(names=["Tabby_Cat", "golden retriever", "St. Bernard"]),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"x": np.zeros(2, np.float32), "fine": i}


def test_class_names_from_tfds_dataset_info(tmp_path):
    EvalTestTinyLabels(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    evaluator = ZeroShotEvaluator("tiny", {
        "class_names": "tfds:eval_test_tiny_labels", "tfds_data_dir": str(tmp_path), "label_field": "fine",
        "canonicalize": True, "templates": "simple7"})
    assert evaluator.class_names == ["tabby cat", "golden retriever", "st bernard"]
    assert evaluator.templates == prompts.SIMPLE_IMAGENET_TEMPLATES
    with pytest.raises(ValueError, match="no feature 'label'"):
        prompts.resolve_class_names("tfds:eval_test_tiny_labels", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a ClassLabel"):
        prompts.resolve_class_names("tfds:eval_test_tiny_labels", tfds_data_dir=str(tmp_path), label_field="x")
