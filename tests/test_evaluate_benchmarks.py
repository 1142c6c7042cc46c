"""The benchmark registry, and `big-contrast eval` on labelled sources, a few-shot probe and a
benchmark list where one dataset is missing (the others still run)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_evaluate_labelled import CLASSES, FOLDERS, build_labelled_tfds, write_examples, write_karpathy

from big_contrast import cli, evaluate
from big_contrast.checkpoint import Checkpointer
from big_contrast.evaluate import benchmarks
from big_contrast.train import build
from big_contrast.workdir import CHECKPOINTS

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = '''
import sys
sys.path.insert(0, {configs!r})
import demo
from big_contrast.evaluate import benchmarks


def get_config(arg=None):
    config = demo.get_config("noeval")
    config.batch_size = 32
    config.data.sources.demo.size = 500
    data_dir = {data_dir!r}
    config.evals = benchmarks.evals(["flickr30k", "cifar10"], data_dir=data_dir, batch_size=16)
    labelled = lambda source: dict(sources={{"eval": source}}, label_keys=("label",))
    zero_shot = dict(type="zero_shot", class_names={classes!r}, templates=("a photo of a {{}}.",), batch_size=16)
    config.evals.folder = dict(zero_shot, data=labelled(dict(kind="image_folder", path=data_dir + "/val")))
    config.evals.csv = dict(zero_shot, data=labelled(dict(kind="manifest", path=data_dir + "/val.csv",
                                                          label_key="label")))
    config.evals.csv_index = dict(zero_shot, data=labelled(dict(kind="manifest", path=data_dir + "/val_index.csv",
                                                                label_key="label")))
    config.evals.tfds = dict(zero_shot, data=labelled({tfds!r}))
    config.evals.probe = dict(type="fewshot", shots=(1, 2), holdout_per_class=1, batch_size=16,
                              train_data=labelled(dict(kind="image_folder", path=data_dir + "/val")),
                              data=labelled(dict(kind="image_folder", path=data_dir + "/val")))
    return config
'''


def test_eval_command_runs_labelled_sources_fewshot_and_skips_a_missing_benchmark(tmp_path):
    data_dir = tmp_path / "data"
    examples = write_examples(data_dir / "val")
    (data_dir / "val" / FOLDERS[2] / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (data_dir / "val.csv").write_text("filepath,label\n" + "".join(
        f"val/{path},{CLASSES[label]}\n" for path, label, _ in examples))
    (data_dir / "val_index.csv").write_text("filepath,label\n" + "".join(
        f"val/{path},{label}\n" for path, label, _ in examples))
    tfds_source = build_labelled_tfds(data_dir / "tfds", examples)
    write_karpathy(data_dir / "flickr30k")
    (data_dir / "flickr30k" / "images").rename(data_dir / "flickr30k" / "flickr30k-images")
    config_file = tmp_path / "bench.py"
    config_file.write_text(CONFIG.format(configs=str(REPO / "configs"), data_dir=str(data_dir), classes=CLASSES,
                                         tfds=tfds_source))
    sys.path.insert(0, str(tmp_path))
    try:
        import bench
    finally:
        sys.path.remove(str(tmp_path))
    ckpt = Checkpointer(tmp_path / "work" / CHECKPOINTS, async_save=False)
    ckpt.save(3, build(bench.get_config()).state, {"step": 3})
    ckpt.close()

    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "big_contrast.cli", "eval", "--config", str(config_file),
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
             "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    metrics = report["results"]
    for key in ("folder/top1", "csv/top1", "csv_index/top1", "tfds/top1",
                "flickr30k/t2i_recall@1", "flickr30k/i2t_recall@5",
                "probe/1shot", "probe/2shot"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The csvs name the same images with class-name / index labels: the same accuracy as the folder.
    assert metrics["csv/top1"] == metrics["csv_index/top1"] == metrics["folder/top1"]
    assert metrics["folder/skipped"] == 1 and metrics["csv/skipped"] == 0
    assert "step 3" in result.stdout and "folder" in result.stdout
    assert "cifar10" not in metrics and "tfds build cifar10" in report["missing"]["cifar10"]
    assert "benchmark 'cifar10' skipped" in result.stderr


def test_benchmarks_flag_replaces_the_evals(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_evaluate_checkpoint(config, workdir, *, step=None, missing=None):
        seen["evals"] = list(config.evals.keys())
        seen["source"] = config.evals.coco.data.sources.coco.to_dict()
        return {"coco/t2i_recall@1": 0.5, "cifar100/top1": 0.25}, 7

    monkeypatch.setattr("big_contrast.commands.eval.evaluate_checkpoint", fake_evaluate_checkpoint)
    assert cli.main(["big-contrast", "eval", "--config", str(REPO / "configs/demo.py"), "--workdir", str(tmp_path),
                     "--benchmarks", "imagenet,cifar100,coco", "--data_dir", str(tmp_path)]) == 0
    assert sorted(seen["evals"]) == ["cifar100", "coco", "imagenet2012"]
    assert seen["source"]["kind"] == "tfds" and seen["source"]["name"] == "coco_captions"
    assert "recall@1" in capsys.readouterr().out


def test_registry_entries_carry_clip_names_templates_and_the_folder_layout(tmp_path):
    expected_classes = {"cifar10": 10, "cifar100": 100, "food101": 101, "oxford_iiit_pet": 37, "dtd": 47,
                        "caltech101": 102}
    config = benchmarks.evals(list(benchmarks.BENCHMARKS), data_dir=str(tmp_path))
    assert set(config) == set(benchmarks.BENCHMARKS)
    for name, count in expected_classes.items():
        entry = config[name]
        assert len(entry.class_name_map) == count and len(set(entry.class_name_map.values())) == count, name
        assert entry.templates and all("{}" in t for t in entry.templates)
        assert entry.data.sources[name].label_key == "label"
    assert config.cifar100.class_name_map["aquarium_fish"] == "aquarium fish"
    assert config.caltech101.class_name_map["faces_easy"] == "centered face"
    assert len(config.cifar10.templates) == 18 and len(config.caltech101.templates) == 34
    assert config.imagenet2012.class_names == "imagenet" and len(config.imagenet2012.templates) == 80
    assert config.imagenet2012.data.sources.imagenet2012.kind == "tfds"
    assert config.coco.data.max_captions >= 5 and config.flickr30k.data.sources.flickr30k.kind == "karpathy"
    # An ImageNet val folder under data_dir is used instead of TFDS.
    (tmp_path / "imagenet2012" / "val").mkdir(parents=True)
    assert benchmarks.entry("imagenet", str(tmp_path))["data"]["sources"]["imagenet2012"]["kind"] == "image_folder"
    with pytest.raises(ValueError, match="Unknown benchmark 'imagenet3'"):
        benchmarks.evals(["imagenet3"], data_dir=str(tmp_path))
    results = benchmarks.add_mean({"cifar10/top1": 0.5, "dtd/top1": 0.25, "coco/t2i_recall@1": 0.9},
                                  ["cifar10", "dtd", "coco"])
    assert results["benchmarks/mean_top1"] == pytest.approx(0.375)


def test_missing_tfds_class_names_say_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'dtd' is not prepared .*tfds build dtd"):
        evaluate.build_evaluator("dtd", benchmarks.entry("dtd", str(tmp_path)))
