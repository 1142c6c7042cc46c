"""Global and local crops of one image, for SILC's global-from-local self-distillation.

SILC (Naeem et al. 2023), as SigLIP 2 uses it: the EMA teacher sees the global view of an
image, the student each of V small random crops of the same image, and the student's feature
of every local crop must predict the teacher's of the global view. So the pipeline emits, per
example,

    {"image": [H, W, 3],              the usual training op string's output (what `image` is
                                      without local crops: same ops, same random draws)
     "local_images": [V, h, w, 3]}    V random resized crops of the decoded original

configured by

    config.data.local_crops = dict(count=8, size=96, scale=(0.05, 0.4), ratio=(3/4, 4/3),
                                   pp="value_range(-1, 1)")

The defaults are SILC's local views (8 crops of 5-40 % of the image area, DINO's multi-crop
range) at DINO's 96 px for a 224 px global view; `size` must be a multiple of the tower's patch
size. `pp` holds the ops applied to each crop after cropping (e.g. `flip_lr`, then the same
final `value_range` / `normalize` as the global op string: the tower sees both views, so both
must end in the same value op; by default `pp` is that final op of the global string alone).
Deviation from SILC stated here and in the README: SILC also trains on two global views per
image (0.4-1.0 of the area); here the global view is the one training view the sigmoid loss
already uses, the local views come on top of it.

Random draws: the global op string first, then each local crop in turn (its box, then its `pp`
ops), all from the one generator the caller hands in -- grain's per-index generator in
`ProcessExample` -- so an example's crops are the same whichever worker draws them and after
a resume. The image bytes are decoded twice: once by the global op string (which may use a
reduced-size JPEG decode), once at full resolution for all local crops together.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from big_contrast.data.image_ops import (
    decode,
    parse_image_pp,
    resize,
    sample_crop_box,
    to_uint8,
)
from big_contrast.errors import ConfigError

SILC_LOCAL_CROPS = dict(count=8, size=96, scale=(0.05, 0.4), ratio=(3 / 4, 4 / 3))
_VALUE_OPS = ("value_range", "normalize")
_KEYS = ("count", "size", "scale", "ratio", "pp")


def _final_value_op(spec: str) -> str | None:
    """The op string's last op when it is `value_range(...)` / `normalize(...)`, else None."""
    ops = [p.strip() for p in spec.split("|") if p.strip()]
    last = ops[-1] if ops else ""
    return last if last.split("(")[0].strip() in _VALUE_OPS else None


def _parsed(op: str | None):
    """(name, kwargs) of one op, so that 'value_range(-1,1)' equals 'value_range(-1, 1)'."""
    return None if op is None else parse_image_pp(f"decode|{op}").ops[-1]


def _check_range(name: str, pair, low: float, high: float | None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in pair)
    except (TypeError, ValueError):  # not iterable, not two values, not numbers
        raise ConfigError(f"data.local_crops.{name}={pair!r} must be a pair of numbers (low, high).") from None
    if not low < a <= b or (high is not None and b > high) or not np.isfinite(b):
        bound = f" <= {high}" if high is not None else ""
        raise ConfigError(f"data.local_crops.{name}={pair!r} must satisfy {low} < low <= high{bound}.")
    return a, b


class MultiCrop:
    """`multicrop(image_bytes, rng) -> {'image': [H, W, 3], 'local_images': [V, h, w, 3]}`. Picklable.

    Args:
      image_pp: the global view's op string (`data.pp_train`), starting with `decode`.
      count, size, scale, ratio: V crops of `scale` x the area and `ratio` aspect (torchvision's
        RandomResizedCrop window), each resized to `size` (int or (h, w)).
      pp: ops applied to each crop after cropping (no `decode`); None: the global string's final
        value op alone.
    """

    def __init__(self, image_pp: str, *, count: int = 8, size=96, scale=(0.05, 0.4),
                 ratio=(3 / 4, 4 / 3), pp: str | None = None):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"data.local_crops.count={count!r} must be a positive integer (SILC uses 8).")
        sizes = (size, size) if isinstance(size, int) else tuple(size)
        if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ConfigError(f"data.local_crops.size={size!r} must be a positive int or (h, w) (SILC: 96).")
        self.count, self.size = count, sizes
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0, None)
        self.global_pp = parse_image_pp(image_pp)
        self.crop_pp = self._crop_pipeline(image_pp, pp)

    @staticmethod
    def _crop_pipeline(image_pp: str, pp: str | None):
        global_value = _final_value_op(image_pp)
        pp = (global_value or "") if pp is None else pp
        if any(p.strip().split("(")[0].strip() == "decode" for p in pp.split("|")):
            raise ConfigError(f"data.local_crops.pp={pp!r} must not decode: the crops are cut from the "
                              "decoded image; give only the ops after cropping (e.g. 'flip_lr|value_range(-1, 1)').")
        local_value = _final_value_op(pp)
        if _parsed(local_value) != _parsed(global_value):
            raise ConfigError(
                f"data.local_crops.pp ends with {local_value!r} but the global op string with "
                f"{global_value!r}; the tower sees both views, so end both with the same value op.")
        return parse_image_pp("|".join(p for p in ("decode", pp) if p.strip()))

    def draw_local(self, pixels: np.ndarray, rng: np.random.Generator):
        """(crops [V, h, w, 3], boxes [V, 4]): the crops of uint8 `pixels` [H, W, 3] and their
        windows as (ymin, xmin, ymax, xmax) fractions of the image."""
        height, width = pixels.shape[:2]
        crops, boxes = [], []
        for _ in range(self.count):
            x0, y0, x1, y1 = sample_crop_box(width, height, rng, self.scale, self.ratio)
            window = resize(pixels[y0:y1, x0:x1], None, size=self.size)
            crops.append(self.crop_pp(window, rng))
            boxes.append((y0 / height, x0 / width, y1 / height, x1 / width))
        return np.stack(crops), np.asarray(boxes, np.float32)

    def __call__(self, data, rng: np.random.Generator, *, with_boxes: bool = False) -> dict:
        """The global view and the local crops; `with_boxes` adds 'local_boxes' [V, 4] (tests,
        figures). Undecodable bytes raise `SkipRecord` as the global op string does."""
        image = self.global_pp(data, rng)
        pixels = to_uint8(decode(data, None))
        local_images, boxes = self.draw_local(pixels, rng)
        out = {"image": image, "local_images": local_images}
        if with_boxes:
            out["local_boxes"] = boxes
        return out

    def __repr__(self) -> str:
        return (f"MultiCrop({self.global_pp.spec!r}, count={self.count}, size={self.size}, "
                f"scale={self.scale}, ratio={self.ratio}, pp={self.crop_pp.spec!r})")


def multicrop_from_config(image_pp: str, local_crops: Mapping | None) -> MultiCrop | None:
    """`MultiCrop` from `config.data.local_crops` (a dict, or None / empty: no local crops)."""
    if not local_crops:
        return None
    settings = dict(local_crops.to_dict() if hasattr(local_crops, "to_dict") else local_crops)
    unknown = sorted(set(settings) - set(_KEYS))
    if unknown:
        raise ConfigError(f"data.local_crops has unknown keys {unknown}; the known ones are {list(_KEYS)}.")
    return MultiCrop(image_pp, **{**SILC_LOCAL_CROPS, **settings})


def training_multicrop(data_config) -> MultiCrop | None:
    """The `MultiCrop` of a data config's training pipeline (None without `local_crops`). With
    `device_normalize` the final value op runs on the device for both views, so it is dropped
    from the crops' `pp` as from `pp_train` (the step normalises 'local_images' like 'image')."""
    from big_contrast.data.device_ops import host_spec

    local_crops = data_config.get("local_crops")
    if not local_crops:
        return None
    on_device = data_config.get("device_normalize", False)
    settings = dict(local_crops.to_dict() if hasattr(local_crops, "to_dict") else local_crops)
    if settings.get("pp"):
        settings["pp"] = host_spec(f"decode|{settings['pp']}", on_device).partition("|")[2]
    return multicrop_from_config(host_spec(data_config.pp_train, on_device), settings)
