"""TFDS datasets as a random-access source, read through `tfds.data_source` (no TensorFlow).

The dataset must already be prepared in `data_dir` in the ArrayRecord file format
(`tfds build <name> --data_dir=<dir> --file_format=array_record`, or a builder's
`download_and_prepare()` with `file_format='array_record'`). Images are read as their encoded
bytes (`tfds.decode.SkipDecoding`) so that decoding happens in the pipeline's workers like
for every other source. Keys may be nested with `/`, e.g. `caption_key='captions/text'` for
`coco_captions`.

With `label_key` (a `ClassLabel` feature, e.g. `'label'`) each example also has an int `label`,
and the captions become optional (ImageNet, CIFAR: a missing caption feature means no captions).
`class_names`, when the eval glue passes the evaluator's list, must have one name per class.
"""

from __future__ import annotations

import re

from big_contrast.data.errors import MissingDataError
from big_contrast.data.labels import check_num_classes
from big_contrast.errors import ConfigError


def _nested(path: str, leaf):
    """`'a/b'`, leaf -> `{'a': {'b': leaf}}`."""
    for part in reversed(path.split("/")):
        leaf = {part: leaf}
    return leaf


def _get(record: dict, path: str):
    for part in path.split("/"):
        record = record[part]
    return record


def _open_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # heavy import, only when a TFDS source is used

    if data_dir is not None:
        _check_data_dir(data_dir)
    where = f"data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise MissingDataError(
            f"TFDS dataset {name!r} is neither registered nor prepared in {where}; check the name "
            "(with its config, e.g. 'coco_captions/2017') and data_dir") from None
    if not builder.is_prepared():
        raise MissingDataError(
            f"TFDS dataset {name!r} is not prepared in {where}; prepare it first with "
            f"`tfds build {name} --data_dir=<dir> --file_format=array_record`")
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if "array_record" not in file_format:
        raise ConfigError(
            f"TFDS dataset {name!r} in {where} was prepared as {file_format}, which has no random "
            "access; prepare it again with --file_format=array_record")
    return builder


def _check_data_dir(data_dir) -> None:
    """A malformed or unreachable data_dir is one sentence here, not a TFDS retry loop. A bucket is
    refused: TFDS would read its metadata, but the pinned array_record reader cannot open gs://
    files (it hangs; see experiments/cloud_storage)."""
    from big_contrast import paths

    paths.validate(data_dir)
    if paths.is_remote(data_dir):
        paths.check_readable(data_dir)
        raise ConfigError(
            f"TFDS data_dir {data_dir!r} is in a bucket, which the array_record reader cannot open; copy the "
            "prepared dataset to a local disk (gcloud storage cp -r) and pass that folder, or convert it "
            "with `big-contrast data convert` and read it as kind='array_record' (cached per host)")


class TfdsSource:
    """`source[i]` -> `{'image': encoded bytes, 'captions': ...}` from a prepared TFDS split."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", caption_key: str = "captions", label_key: str | None = None,
                 class_names=None):
        import tensorflow_datasets as tfds

        builder = _open_builder(name, data_dir)
        splits = list(builder.info.splits.keys())
        for base in re.split(r"[+]", split):
            base = base.split("[")[0].strip()
            if base not in splits:
                raise ConfigError(f"TFDS dataset {name!r} has no split {base!r}; its splits are {splits}")
        features = builder.info.features
        if label_key and caption_key.split("/")[0] not in features:
            caption_key = None  # a labelled dataset without captions
        for key in (image_key, caption_key, label_key):
            if key is None:
                continue
            if key.split("/")[0] not in features:
                raise ConfigError(
                    f"TFDS dataset {name!r} has no feature {key!r}; its features are "
                    f"{list(features.keys())}. Set the source's image_key / caption_key / label_key.")
        if label_key:
            num_classes = getattr(features[label_key], "num_classes", None)
            if num_classes is None:
                raise ConfigError(f"TFDS feature {name!r}[{label_key!r}] is a {type(features[label_key]).__name__}, "
                                 "not a ClassLabel; set label_key to the dataset's class-label feature")
            check_num_classes(num_classes, class_names, f"TFDS dataset {name!r} feature {label_key!r}")
        self.name, self.split = name, split
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        self._records = builder.as_data_source(
            split=split, decoders=_nested(image_key, tfds.decode.SkipDecoding()))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        example = {"image": _get(record, self.image_key)}
        if self.caption_key:
            example["captions"] = _get(record, self.caption_key)
        if self.label_key:
            example["label"] = int(_get(record, self.label_key))
        return example

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"
