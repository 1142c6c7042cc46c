"""Integer class labels for labelled sources, checked against the evaluator's class list.

A labelled source (image folder, manifest with `label_key`, TFDS with `label_key`) yields an
int field `label`. When the eval glue hands it the evaluator's class names (`class_names`),
the source checks at construction, before anything is embedded, that its labels fit them: a
class count that differs, an integer label outside `[0, C)`, a class-name label that is not in
the list. Each error is one sentence naming the path and the value.
"""

from __future__ import annotations

from collections.abc import Sequence

from big_contrast.errors import ConfigError


def check_num_classes(num_classes: int, class_names: Sequence[str] | None, where: str) -> None:
    """The source has `num_classes` classes; a given class list must have as many names."""
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(
            f"{where} has {num_classes} classes but the class-name list has {len(class_names)} "
            "names; give the evaluator the class names of this dataset, in label order")


def label_index(value, class_names: Sequence[str] | None, where: str,
                name_to_index: dict[str, int] | None = None) -> int:
    """A manifest label cell -> int: an integer (or its string), or a class name from the list
    (`name_to_index`, the list's inverse, saves rebuilding it per row)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: label {value!r} is a boolean, not a class index or name")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    elif isinstance(value, str) and value.strip():
        if class_names is None:
            raise ConfigError(
                f"{where}: label {value!r} is a class name, but no class-name list was given to map "
                "it to an index; set the evaluator's class_names (or the source's class_names)")
        index = name_to_index or {name: i for i, name in enumerate(class_names)}
        if value.strip() not in index:
            raise ConfigError(
                f"{where}: label {value!r} is not in the class-name list "
                f"({len(class_names)} names, e.g. {list(class_names[:3])})")
        return index[value.strip()]
    else:
        raise ConfigError(f"{where}: label {value!r} is neither an integer nor a class name")
    if label < 0 or (class_names is not None and label >= len(class_names)):
        bound = f"[0, {len(class_names)})" if class_names is not None else ">= 0"
        raise ConfigError(f"{where}: label {label} lies outside the class list ({bound})")
    return label
