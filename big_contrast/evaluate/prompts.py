"""Prompt templates and class names for zero-shot classification.

Templates are plain strings with a `{}` where the class name goes ("a photo of a {}."), so they
can live in a config file. Class names come from a list, the built-in ImageNet list, a text file
(one name per line) or the `ClassLabel` feature of a TFDS dataset; `resolve_class_names` turns the
config value into a list.
"""
from __future__ import annotations

import json
import os
import re
import string
from typing import Mapping, Sequence

from big_contrast.errors import ConfigError
from big_contrast.evaluate.imagenet_classes import IMAGENET_CLASSNAMES

# CLIP's 80 ImageNet templates, in the order of OpenAI's notebook and open_clip's
# `OPENAI_IMAGENET_TEMPLATES` (the order does not change the classifier, it is kept for diffing).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template ensemble selected in CLIP's prompt-engineering notebook (open_clip's
# `SIMPLE_IMAGENET_TEMPLATES`): nearly the accuracy of the 80 at a tenth of the text compute.
SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# The single template CLIP uses for most non-ImageNet datasets.
PHOTO_TEMPLATE = ("a photo of a {}.",)

TEMPLATE_SETS = {
    "imagenet80": IMAGENET_TEMPLATES,
    "simple7": SIMPLE_IMAGENET_TEMPLATES,
    "photo": PHOTO_TEMPLATE,
}

BUILTIN_CLASS_NAMES = {"imagenet": IMAGENET_CLASSNAMES}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name ('imagenet80', 'simple7', 'photo') or an explicit list, validated."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ConfigError(
                f"Unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)} "
                "or pass a list of strings that contain '{}'.")
        templates = TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates:
        raise ConfigError("The template list is empty; pass at least one template such as 'a photo of a {}.'.")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ConfigError(
                f"Template {template!r} has no '{{}}' placeholder for the class name; "
                "write it like 'a photo of a {}.'.")
    return templates


def fill_template(template: str, class_name: str) -> str:
    # str.replace rather than str.format: a class name or template with other braces stays literal.
    return template.replace("{}", class_name)


_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c != "'"} | {"'": ""})


def canonicalize_class_name(name: str) -> str:
    """Lower-case, apostrophes removed, other punctuation and '_' turned into spaces, spaces collapsed.

    "Geoffroy's spider monkey" -> "geoffroys spider monkey"; "kite (bird of prey)" ->
    "kite bird of prey"; "great_white_shark" -> "great white shark".
    """
    return re.sub(r"\s+", " ", name.lower().translate(_PUNCTUATION_TO_SPACE)).strip()


def class_names_from_file(path: str | os.PathLike) -> list[str]:
    """One class name per line, line i is label i; trailing blank lines are ignored."""
    from big_contrast import paths

    if not paths.parse(path).exists():  # local or in a bucket
        raise ConfigError(f"Class-name file {str(path)!r} does not exist; give a text file with one name per line.")
    names = [line.strip() for line in paths.read_bytes(path).decode("utf-8").rstrip().splitlines()]
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        # A blank line in the middle would shift every later label by one, so refuse it.
        raise ConfigError(f"Class-name file {str(path)!r} has blank lines {blank[:5]}; every line must name a class.")
    return names


def class_names_from_tfds(name: str, *, data_dir: str | None = None, field: str = "label") -> list[str]:
    """The names of the `ClassLabel` feature `field` of the TFDS dataset `name` (as prepared in data_dir)."""
    import tensorflow_datasets as tfds  # heavy import, only when asked for

    from big_contrast.data.errors import MissingDataError

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        prepared = False
    if not prepared:
        raise MissingDataError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, so its class names cannot be "
            f"read; prepare it with `tfds build {name} --data_dir=<dir> --file_format=array_record`")
    features = builder.info.features
    if field not in features:
        raise ConfigError(
            f"TFDS dataset {name!r} has no feature {field!r}; its features are {sorted(features.keys())}. "
            "Set the evaluator's label_field to the class-label feature.")
    names = getattr(features[field], "names", None)
    if names is None:
        raise ConfigError(f"TFDS feature {name!r}[{field!r}] is a {type(features[field]).__name__}, not a ClassLabel "
                         "with names; pass class names as a list or a file instead.")
    return list(names)


def read_name_map(spec: str | Mapping[str, str]) -> dict[str, str]:
    """A class-name map: a dict, or a file of 'RAW NAME' lines (e.g. 'n01440764 tench', the
    WordNet-id lists that come with ImageNet) or a JSON object {raw: name}."""
    if not isinstance(spec, str):
        return {str(k): str(v) for k, v in dict(spec).items()}
    from big_contrast import paths

    if not paths.parse(spec).exists():
        raise ConfigError(f"Class-name map {spec!r} does not exist; give a JSON object or 'RAW NAME' lines.")
    text = paths.read_bytes(spec).decode("utf-8")
    if spec.endswith(".json"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    pairs = [line.strip().split(None, 1) for line in text.splitlines() if line.strip()]
    bad = [" ".join(p) for p in pairs if len(p) != 2]
    if bad:
        raise ConfigError(f"Class-name map {spec!r} has lines without a name after the raw label: {bad[:3]}.")
    return {raw: name.strip() for raw, name in pairs}


def map_class_names(names: Sequence[str], name_map: str | Mapping[str, str] | None) -> list[str]:
    """Every raw class name (a folder or ClassLabel name) through the map; all must be in it."""
    if name_map is None:
        return list(names)
    mapping = read_name_map(name_map)
    missing = [n for n in names if n not in mapping]
    if missing:
        raise ConfigError(f"The class-name map has no entry for {missing[:5]} (of {len(names)} classes); "
                         "add them or fix the map.")
    return [mapping[n] for n in names]


def resolve_class_names(
    spec: str | Sequence[str],
    *,
    canonicalize: bool = False,
    tfds_data_dir: str | None = None,
    label_field: str = "label",
    name_map: str | Mapping[str, str] | None = None,
) -> list[str]:
    """Class names from a config value.

    spec: a list of names; 'imagenet' (the 1000 CLIP names); 'file:PATH' (one name per line);
    'tfds:NAME' (NAME may carry a config and version, e.g. 'tfds:cifar10:3.0.2'; the names of its
    `label_field` ClassLabel feature, read from tfds_data_dir); 'folder:DIR' (the sorted class
    folders of an image-folder dataset). name_map (a dict or file, see `read_name_map`) then
    replaces each raw name, e.g. WordNet ids by readable names.
    """
    if isinstance(spec, str):
        if spec in BUILTIN_CLASS_NAMES:
            names = list(BUILTIN_CLASS_NAMES[spec])
        elif spec.startswith("file:"):
            names = class_names_from_file(spec[len("file:"):])
        elif spec.startswith("tfds:"):
            names = class_names_from_tfds(spec[len("tfds:"):], data_dir=tfds_data_dir, field=label_field)
        elif spec.startswith("folder:"):
            from big_contrast.data.image_folder import class_folders

            names = class_folders(spec[len("folder:"):])
        else:
            raise ConfigError(
                f"Class names {spec!r} are neither a built-in list {sorted(BUILTIN_CLASS_NAMES)} nor "
                "'file:PATH', 'tfds:NAME' or 'folder:DIR'; pass one of those or a list of names.")
    else:
        names = list(spec)
    names = map_class_names(names, name_map)
    if not names:
        raise ConfigError(f"The class-name list from {spec!r} is empty; zero-shot classification needs at least "
                         "one class name.")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ConfigError(f"Class names must be non-empty strings; got {bad[:5]}.")
    if canonicalize:
        names = [canonicalize_class_name(n) for n in names]
    return names


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: prompt c*T + t is template t filled with class c."""
    return [fill_template(t, c) for c in class_names for t in templates]
