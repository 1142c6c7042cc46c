"""A folder of class folders (ImageNet val / torchvision `ImageFolder` layout) as a labelled source.

    DIR/n01440764/ILSVRC2012_val_00000293.JPEG
    DIR/n01443537/...

Label = index of the class folder in sorted order (what torchvision and open_clip's
`--imagenet-val` use, and the order of the TFDS `imagenet2012` labels for the WordNet-id
folders). Images are files with the extensions `.jpg .jpeg .png .webp`, any case; other files
are ignored. The folder is listed once, at construction (through `etils.epath`, so `gs://`
works), and an empty class folder or a folder without images fails there with the path; image
bytes are read lazily. The folder names are the class names (`class_names="folder:DIR"` in the
zero-shot evaluator, optionally mapped through `class_name_map`, e.g. WordNet ids -> names).
"""

from __future__ import annotations

from collections.abc import Sequence

from big_contrast.data.errors import MissingDataError, SkipRecord
from big_contrast.data.labels import check_num_classes
from big_contrast.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def _path(path):
    from big_contrast import paths

    return paths.parse(path)  # local or a bucket; a malformed URL is refused, not made a folder


def class_folders(path: str) -> list[str]:
    """The sorted class-folder names of an image-folder dataset (its class names)."""
    root = _path(path)
    if not root.is_dir():
        raise MissingDataError(
            f"image folder {str(path)!r} does not exist; put one sub-folder of images per class there "
            "(the ImageNet val / torchvision ImageFolder layout)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ConfigError(f"image folder {str(path)!r} has no class sub-folders; put each class's images "
                         "in a sub-folder named after the class")
    return names


def list_images(path: str) -> tuple[list[str], list[int], list[str]]:
    """(relative image paths, labels, class names), in class then file-name order."""
    classes = class_folders(path)
    root = _path(path)
    files, labels = [], []
    for label, name in enumerate(classes):
        images = sorted(p.name for p in (root / name).iterdir()
                        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        if not images:
            raise ConfigError(
                f"class folder {str(root / name)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove the folder or add its images")
        files.extend(f"{name}/{image}" for image in images)
        labels.extend([label] * len(images))
    return files, labels, classes


class ImageFolderSource:
    """`source[i]` -> `{'image': bytes, 'label': int, 'key': 'CLASS/FILE'}` (no captions).

    `class_names` (optional, the evaluator's list) must have one name per class folder.
    """

    def __init__(self, path: str, class_names: Sequence[str] | None = None):
        self.path = str(path)
        self._files, self._labels, self.classes = list_images(path)
        check_num_classes(len(self.classes), class_names, f"image folder {self.path!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        relative = self._files[index]
        try:
            image = (_path(self.path) / relative).read_bytes()
        except OSError as e:
            raise SkipRecord("missing_image", f"{relative}: {e}") from None
        return {"image": image, "label": self._labels[index], "key": relative}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.path!r}, {len(self)} images, {self.num_classes} classes)"
