"""Released checkpoints in and out: Hugging Face SigLIP / CLIP, open_clip, big_vision ``.npz``.

    from big_contrast import interop
    model, tokenizer, transform = interop.load("path/to/siglip-hf-dir")   # or a workdir W
    zimg = model.embed_images(transform.batch(pil_images))               # [n, D], L2-normalised
    ztxt = model.embed_texts(tokenizer(["a photo of a cat"]))            # [n, D]

``read(source, arch=None)`` returns the ``Imported`` record (model options, weights,
tokenizer, preprocessing) that ``big-contrast import`` writes into a workdir; the command
line lives in ``big_contrast/commands/`` (import_.py, export.py). Sources: an HF model directory (``config.json``), an
open_clip ``.safetensors`` / ``.bin`` file with ``arch`` (its model-config name or JSON
path), a big_vision ``.npz`` with ``arch`` (e.g. ``"B/16,B,vocab=32000,size=224"``), or a
workdir written by the import.
"""
from __future__ import annotations

from etils import epath

from big_contrast.errors import ConfigError, MissingFileError


def read(source, arch: str | None = None, step: int | None = None):
    """The ``Imported`` record of ``source`` (see the module docstring)."""
    from big_contrast.interop import imported

    path = epath.Path(source)
    if not path.exists():
        raise MissingFileError(f"{source} does not exist; pass a Hugging Face model directory, "
                               "an open_clip or big_vision weights file, or an imported workdir.")
    if imported.is_workdir(path):
        return imported.read_workdir(path, step)
    if path.is_dir():
        from big_contrast.interop import hf

        return hf.read(path)
    if path.name.endswith(".npz"):
        from big_contrast.interop import big_vision

        return big_vision.read(path, _need_arch(arch, path))
    from big_contrast.interop import open_clip

    return open_clip.read(path, _need_arch(arch, path))


def _need_arch(arch, path):
    if not arch:
        raise ConfigError(f"{path.name} carries no architecture; pass --arch (an open_clip model "
                          "name such as ViT-B-16-SigLIP, or big_vision's such as 'B/16,B').")
    return arch


def load(source, arch: str | None = None):
    """``(model, tokenizer, transform)`` of ``source``, open_clip style."""
    from big_contrast.interop.preprocess import Transform

    record = read(source, arch)
    return record.model(), record.make_tokenizer(), Transform(record.preprocess)


__all__ = ["load", "read"]
