"""Named benchmarks: the datasets papers report, each with its split, class names and templates.

    config.evals = benchmarks.evals(["imagenet2012", "cifar100", "coco"], data_dir=D)
    big-contrast eval --config C --workdir W --benchmarks imagenet2012,cifar100,coco --data_dir D

Every benchmark becomes an ordinary `config.evals` entry (zero-shot or retrieval) whose data
reads a prepared TFDS dataset in `data_dir`, or a folder / Karpathy file under it:

| name             | task       | data (in data_dir)                                   | split      |
|------------------|------------|------------------------------------------------------|------------|
| imagenet2012     | zero-shot  | folder imagenet2012/val/<wnid>/*, else TFDS imagenet2012 | validation |
| imagenet_v2      | zero-shot  | TFDS imagenet_v2/matched-frequency                   | test       |
| cifar10/cifar100 | zero-shot  | TFDS cifar10 / cifar100                              | test       |
| food101          | zero-shot  | TFDS food101                                         | validation |
| oxford_iiit_pet  | zero-shot  | TFDS oxford_iiit_pet                                 | test       |
| dtd              | zero-shot  | TFDS dtd                                             | test       |
| caltech101       | zero-shot  | TFDS caltech101                                      | test       |
| coco             | retrieval  | coco/dataset_coco.json (+ images), else TFDS coco_captions | test (Karpathy 5k) |
| flickr30k        | retrieval  | flickr30k/dataset_flickr30k.json + flickr30k-images/ | test (Karpathy 1k) |

Class names and templates are CLIP's published ones, kept as data in `benchmark_data/`
(sources in its README); for TFDS datasets the label order is read from the prepared
`ClassLabel` and mapped to CLIP's names. Preprocessing is the config's `data.pp_eval` (the
model's own resize + central crop + normalisation, as CLIP evaluates) unless `pp_eval` is
given. Retrieval embeds every caption of every image (`data.max_captions`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from typing import Sequence

import ml_collections

from big_contrast.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    task: str                      # 'zero_shot' | 'retrieval'
    tfds_name: str | None          # the TFDS dataset (with its config), None if not in TFDS
    split: str
    folder: str | None = None      # relative to data_dir: an image folder / a Karpathy JSON file
    image_dir: str | None = None   # Karpathy: the images, relative to data_dir
    max_captions: int = 5          # retrieval: captions per image, at most
    prepare: str = ""              # how to prepare the data once


def _tfds_prepare(name: str) -> str:
    return f"`tfds build {name} --data_dir=<dir> --file_format=array_record`"


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("imagenet2012", "zero_shot", "imagenet2012", "validation", folder="imagenet2012/val",
              prepare="put the 50,000 val images as <data_dir>/imagenet2012/val/<wnid>/*.JPEG (torchvision "
                      "ImageFolder layout), or put ILSVRC2012_img_{train,val}.tar in <data_dir>/downloads/manual and "
                      "run " + _tfds_prepare("imagenet2012")),
    Benchmark("imagenet_v2", "zero_shot", "imagenet_v2/matched-frequency", "test",
              prepare=_tfds_prepare("imagenet_v2/matched-frequency")),
    Benchmark("cifar10", "zero_shot", "cifar10", "test", prepare=_tfds_prepare("cifar10")),
    Benchmark("cifar100", "zero_shot", "cifar100", "test", prepare=_tfds_prepare("cifar100")),
    Benchmark("food101", "zero_shot", "food101", "validation", prepare=_tfds_prepare("food101")),
    Benchmark("oxford_iiit_pet", "zero_shot", "oxford_iiit_pet", "test", prepare=_tfds_prepare("oxford_iiit_pet")),
    Benchmark("dtd", "zero_shot", "dtd", "test", prepare=_tfds_prepare("dtd")),
    Benchmark("caltech101", "zero_shot", "caltech101", "test", prepare=_tfds_prepare("caltech101")),
    Benchmark("coco", "retrieval", "coco_captions", "test", folder="coco/dataset_coco.json", image_dir="coco",
              max_captions=8,
              prepare="put Karpathy's dataset_coco.json in <data_dir>/coco/ with the COCO val2014/ images beside it, "
                      "or run " + _tfds_prepare("coco_captions")),
    Benchmark("flickr30k", "retrieval", None, "test", folder="flickr30k/dataset_flickr30k.json",
              image_dir="flickr30k/flickr30k-images",
              prepare="put Karpathy's dataset_flickr30k.json in <data_dir>/flickr30k/ and the images in "
                      "<data_dir>/flickr30k/flickr30k-images/"),
)}
ALIASES = {"imagenet": "imagenet2012", "imagenet1k": "imagenet2012", "imagenetv2": "imagenet_v2",
           "pets": "oxford_iiit_pet",
           "mscoco": "coco", "flickr": "flickr30k"}
CLASSIFICATION_METRIC = "top1"
MEAN_PREFIX = "benchmarks"


@functools.cache
def _classification_data() -> dict:
    text = resources.files("big_contrast.evaluate").joinpath("benchmark_data/classification.json").read_text("utf-8")
    return json.loads(text)


def get(name: str) -> Benchmark:
    """The benchmark called `name` (or one of its aliases)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BENCHMARKS:
        raise ConfigError(f"Unknown benchmark {name!r}; use some of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[key]


def _exists(data_dir: str, relative: str | None) -> bool:
    if relative is None:
        return False
    from etils import epath

    return epath.Path(data_dir, relative).exists()


def _source(bench: Benchmark, data_dir: str) -> dict:
    """The eval source: the folder / Karpathy file when it is there, else the TFDS dataset."""
    if _exists(data_dir, bench.folder) or bench.tfds_name is None:
        path = os.path.join(data_dir, bench.folder)
        if bench.task == "zero_shot":
            return dict(kind="image_folder", path=path)
        return dict(kind="karpathy", path=path, split=bench.split, image_dir=os.path.join(data_dir, bench.image_dir))
    source = dict(kind="tfds", name=bench.tfds_name, split=bench.split, data_dir=data_dir)
    if bench.task == "zero_shot":
        source.update(label_key="label")
    else:
        source.update(caption_key="captions/text")
    return source


def _zero_shot_entry(bench: Benchmark, data_dir: str) -> dict:
    from big_contrast.evaluate.prompts import IMAGENET_TEMPLATES

    if bench.name in ("imagenet2012", "imagenet_v2"):
        return dict(type="zero_shot", class_names="imagenet", templates=list(IMAGENET_TEMPLATES))
    data = _classification_data()[bench.name]
    return dict(type="zero_shot", class_names=f"tfds:{bench.tfds_name}", tfds_data_dir=data_dir,
                class_name_map=dict(data["class_name_map"]), templates=list(data["templates"]))


def entry(name: str, data_dir: str, *, batch_size: int = 256, every_steps: int = 0,
          pp_eval: str | None = None) -> dict:
    """The `config.evals` entry of one benchmark."""
    bench = get(name)
    data = dict(sources={bench.name: _source(bench, data_dir)})
    if pp_eval is not None:
        data["pp_eval"] = pp_eval
    if bench.task == "zero_shot":
        config = _zero_shot_entry(bench, data_dir)
        data["label_keys"] = ("label",)
    else:
        config = dict(type="retrieval", text_field="texts", caption_mask_field="caption_mask")
        data["max_captions"] = bench.max_captions
    return dict(config, data=data, batch_size=batch_size, every_steps=every_steps)


def evals(names: Sequence[str] | str, data_dir: str, *, batch_size: int = 256, every_steps: int = 0,
          pp_eval: str | None = None) -> ml_collections.ConfigDict:
    """`config.evals` entries for the named benchmarks (a list or a comma-separated string)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise ConfigError("No benchmark named; pass some of " + ", ".join(sorted(BENCHMARKS)) + ".")
    if not data_dir:
        raise ConfigError("Benchmarks need data_dir: the folder with the prepared TFDS datasets / image folders.")
    config = ml_collections.ConfigDict()
    for name in names:
        bench = get(name)
        config[bench.name] = entry(bench.name, data_dir, batch_size=batch_size, every_steps=every_steps,
                                   pp_eval=pp_eval)
    return config


def missing_message(name: str, error: Exception) -> str:
    """One sentence for a benchmark whose data is not there: what is missing, how to prepare it."""
    hint = BENCHMARKS[name].prepare if name in BENCHMARKS else ""
    advice = f"; to prepare it: {hint}" if hint and hint not in str(error) else ""
    return f"benchmark {name!r} skipped: {error}{advice}"


def add_mean(results: dict[str, float], names: Sequence[str]) -> dict[str, float]:
    """Adds 'benchmarks/mean_top1', the mean top-1 over the classification benchmarks that ran."""
    scores = [results[f"{n}/{CLASSIFICATION_METRIC}"] for n in names
              if n in BENCHMARKS and BENCHMARKS[n].task == "zero_shot" and f"{n}/{CLASSIFICATION_METRIC}" in results]
    if scores:
        results = {**results, f"{MEAN_PREFIX}/mean_{CLASSIFICATION_METRIC}": sum(scores) / len(scores)}
    return results
