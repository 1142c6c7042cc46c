"""Opening a source from its config, and the raw-example protocol every source follows.

A source is random access (grain's `RandomAccessDataSource`: `len(source)`, `source[i]`) and
returns *raw* examples: `{'image': encoded image bytes, 'captions': str | bytes | list of them,
...}` (optional extra fields such as `'key'` or integer `'label/<task>'` pass through).
Decoding and preprocessing happen later, in the pipeline's map stage (so in grain's worker
processes). A source may raise `SkipRecord(reason)` for a record it already knows is bad
(e.g. a manifest row whose image file is missing); `TaggedSource` turns that into a skip
marker so that it is counted, never fatal.

Source config (`ConfigDict` or dict), by `kind`:
  demo:          split='train' | 'eval', size=None (default 10,000 / 960), image_size=64,
                 pairs='all' | 'held_out' (eval only), captions='full' | 'names',
                 colours=None or a subset of the colour names, group_size=1 (see demo.py)
  array_record:  path (a file, a directory of *.array_record files, or a glob; local or a bucket),
                 cache_dir=None (where a bucket's shards are copied on this host; see array_record.py)
  manifest:      path (.csv / .tsv / .jsonl), image_key='filepath', caption_key='title'
                 (a column or a comma-separated list of columns), separator=None,
                 label_key=None (int or class-name column; captions then optional)
  tfds:          name, split='train', data_dir=None, image_key='image', caption_key='captions',
                 label_key=None (a ClassLabel feature; captions then optional)
  image_folder:  path (one sub-folder of images per class); yields 'label', no captions
  karpathy:      path (dataset_coco.json / dataset_flickr30k.json), split='test', image_dir=None
Labelled kinds (image_folder, and manifest / tfds with a label_key) yield an int 'label' and
take `class_names` (the evaluator's list, which the eval glue fills in) to check labels against.
Every kind also takes `weight` (mixture weight, default 1.0) and `group_size` (default 1): in
training, blocks of `group_size` consecutive records are shuffled as one unit, so that records
written next to each other on purpose (hard negatives, such as the demo's shape groups) share a
batch (a mixture of several sources interleaves them record by record, so groups need a single
training source). Webdataset tar shards are not
random access: training streams them (kind='stream', `data/streaming/`, which `make_pipeline`
selects before any source here is opened), and `big-contrast data convert` turns them into
ArrayRecord files for random access.
"""

from __future__ import annotations

from collections.abc import Mapping

from big_contrast.data.errors import SkipRecord
from big_contrast.errors import ConfigError

SOURCE_FIELDS = {
    "demo": {"split": "train", "size": None, "image_size": 64, "pairs": "all", "captions": "full",
             "colours": None, "group_size": 1, "boxes": False},
    "array_record": {"path": None, "cache_dir": None},
    "manifest": {"path": None, "image_key": "filepath", "caption_key": "title", "separator": None,
                 "label_key": None, "class_names": None, "boxes_key": None},
    "tfds": {"name": None, "split": "train", "data_dir": None, "image_key": "image",
             "caption_key": "captions", "label_key": None, "class_names": None},
    "image_folder": {"path": None, "class_names": None},
    "karpathy": {"path": None, "split": "test", "image_dir": None},
}
REQUIRED = {"array_record": ("path",), "manifest": ("path",), "tfds": ("name",),
            "image_folder": ("path",), "karpathy": ("path",)}


def is_labelled(config: Mapping) -> bool:
    """Whether a source config yields an int 'label' (so it can take the evaluator's class names)."""
    return config.get("kind") == "image_folder" or bool(config.get("label_key"))


def source_options(name: str, config: Mapping) -> tuple[str, dict]:
    """Validates a source config: returns its kind and its options with defaults filled in."""
    config = dict(config)
    kind = config.pop("kind", None)
    config.pop("weight", None)
    if kind != "demo":  # the pipeline's shuffle reads it; the demo also lays its records out by it
        config.pop("group_size", None)
    if kind == "tar":
        raise ConfigError(
            f"data source {name!r}: webdataset tar shards stream with kind='stream', path=<shards> "
            "(training), or are converted once for random access: run `big-contrast data convert "
            "<shards> <out_dir>` and use kind='array_record', path=<out_dir>")
    if kind == "stream":  # data/streaming/ reads these; everything here needs random access
        raise ConfigError(
            f"data source {name!r} is kind='stream' (tar shards read in order, for training only); "
            "this needs a random-access source: convert the shards with `big-contrast data convert` "
            "and use kind='array_record'")
    if kind not in SOURCE_FIELDS:
        raise ConfigError(f"data source {name!r} has kind={kind!r}; use one of {sorted(SOURCE_FIELDS)}")
    unknown = sorted(set(config) - set(SOURCE_FIELDS[kind]))
    if unknown:
        raise ConfigError(
            f"data source {name!r} (kind={kind!r}) has unknown field(s) {unknown}; "
            f"its fields are {sorted(SOURCE_FIELDS[kind])} and 'weight'")
    options = {**SOURCE_FIELDS[kind], **config}
    for field in REQUIRED.get(kind, ()):
        if not options[field]:
            raise ConfigError(f"data source {name!r} (kind={kind!r}) needs {field!r}")
    return kind, options


def open_source(name: str, config: Mapping):
    """The random-access source a config describes; bad paths / names fail here, early."""
    kind, options = source_options(name, config)
    if kind == "demo":
        from big_contrast.data.demo import DemoSource

        return DemoSource(**options)
    if kind == "array_record":
        from big_contrast.data.array_record import ArrayRecordSource

        return ArrayRecordSource(options["path"], options["cache_dir"])
    if kind == "manifest":
        from big_contrast.data.manifest import ManifestSource

        return ManifestSource(**options)
    if kind == "image_folder":
        from big_contrast.data.image_folder import ImageFolderSource

        return ImageFolderSource(**options)
    if kind == "karpathy":
        from big_contrast.data.karpathy import KarpathySource

        return KarpathySource(**options)
    from big_contrast.data.tfds_source import TfdsSource

    return TfdsSource(**options)


class TaggedSource:
    """Wraps a source for the pipeline: adds `'_source': index` and turns `SkipRecord` raised by
    the source into a skip marker `{'_skip': reason, '_source': index}`."""

    def __init__(self, source, source_index: int):
        self.source, self.source_index = source, source_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        try:
            raw = dict(self.source[index])
        except SkipRecord as e:
            return {"_skip": e.reason, "_source": self.source_index}
        raw["_source"] = self.source_index
        return raw

    def __repr__(self) -> str:
        return f"TaggedSource({self.source!r}, source_index={self.source_index})"
