"""The image preprocessing a released checkpoint expects, as an op string of the data pipeline.

``Transform(settings)(pil_image)`` -> float32 ``[H, W, 3]``, the same steps as the PIL
backend of transformers' ``SiglipImageProcessor`` / ``CLIPImageProcessor`` (and open_clip's
eval transform for SigLIP, which resizes straight to the square): convert to RGB, resize
the uint8 image with Pillow (to an exact size, or the shorter side to ``size`` with the longer
side floored, as transformers does), centre-crop, scale by ``1/255``, subtract the mean and
divide by the std per channel. ``settings`` is a dict:

    resize     'exact' (SigLIP) | 'shortest' (CLIP)
    size       [h, w] for 'exact', an int for 'shortest'
    crop       [h, w] or None
    resample   'bicubic' | 'bilinear' | 'nearest' | 'lanczos'
    mean, std  three floats each

There is one implementation: ``pp_string(settings)`` writes these steps as an op string of
``data/image_ops`` (e.g. ``decode|resize_small(224, method="bicubic")|central_crop((224, 224))
|normalize(...)``) and ``Transform`` runs it. ``big-contrast import`` writes the same string into
the workdir's ``config.data.pp_eval`` / ``pp_train``, so ``big-contrast eval`` on a dataset
preprocesses as the reference does. The normalisation constants are ``image_ops``'.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from big_contrast.data import image_ops
from big_contrast.errors import ConfigError

# settings["resample"] (transformers' names) -> the resize ops' Pillow `method`
RESIZE_METHOD = {"bicubic": "bicubic", "bilinear": "pil_bilinear", "nearest": "nearest",
                 "lanczos": "lanczos"}
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
SIGLIP = dict(resize="exact", size=[224, 224], crop=None, resample="bicubic",
              mean=list(image_ops.SIGLIP_MEAN), std=list(image_ops.SIGLIP_STD))
CLIP = dict(resize="shortest", size=224, crop=[224, 224], resample="bicubic",
            mean=list(image_ops.CLIP_MEAN), std=list(image_ops.CLIP_STD))


class Transform:
    """PIL image -> the float32 ``[H, W, 3]`` pixels of the checkpoint's preprocessing."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.spec = pp_string(self.settings)
        self._pipeline = image_ops.parse_image_pp(self.spec)

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.settings
        if s["crop"] is not None:
            return tuple(s["crop"])
        return tuple(s["size"]) if s["resize"] == "exact" else (s["size"], s["size"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self._pipeline(image, None)  # no random op: no generator needed

    def batch(self, images) -> np.ndarray:
        return np.stack([self(image) for image in images])


def _check(settings: dict) -> None:
    if settings["resize"] not in ("exact", "shortest") or settings["resample"] not in RESIZE_METHOD:
        raise ConfigError(f"preprocessing {settings} is unknown: resize must be 'exact' or "
                          f"'shortest' and resample one of {tuple(RESIZE_METHOD)}.")
    crop, size = settings["crop"], settings["size"]
    smallest = (size, size) if settings["resize"] == "shortest" else tuple(size)  # the resized image
    if crop is not None and (crop[0] > smallest[0] or crop[1] > smallest[1]):
        raise ConfigError(f"preprocessing crops {crop} out of an image resized to {size}; use a crop "
                          "no larger than the resize (a larger one would only add black borders).")


def from_hf_preprocessor(config: dict, family: str) -> dict:
    """Settings from a ``preprocessor_config.json`` (transformers' defaults where a key is absent)."""
    base = dict(SIGLIP if family == "siglip" else CLIP)
    size = config.get("size")
    if isinstance(size, dict) and "shortest_edge" in size:
        base.update(resize="shortest", size=int(size["shortest_edge"]))
    elif isinstance(size, dict) and "height" in size:
        base.update(resize="exact", size=[int(size["height"]), int(size["width"])])
    crop = config.get("crop_size")
    if config.get("do_center_crop", family == "clip") and crop:
        base["crop"] = [int(crop["height"]), int(crop["width"])]
    elif "do_center_crop" in config and not config["do_center_crop"]:
        base["crop"] = None
    if "resample" in config:
        base["resample"] = _HF_RESAMPLE.get(config["resample"], "bicubic")
    for key in ("image_mean", "image_std"):
        if key in config:
            base[key.removeprefix("image_")] = [float(v) for v in config[key]]
    return base


def to_hf_preprocessor(settings: dict, family: str) -> dict:
    out = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               do_convert_rgb=True, image_mean=settings["mean"], image_std=settings["std"],
               resample={v: k for k, v in _HF_RESAMPLE.items()}[settings["resample"]],
               image_processor_type="SiglipImageProcessor" if family == "siglip"
               else "CLIPImageProcessor")
    if settings["resize"] == "exact":
        out["size"] = dict(height=settings["size"][0], width=settings["size"][1])
    else:
        out["size"] = dict(shortest_edge=settings["size"])
    out["do_center_crop"] = settings["crop"] is not None
    if settings["crop"] is not None:
        out["crop_size"] = dict(height=settings["crop"][0], width=settings["crop"][1])
    return out


def pp_string(settings: dict) -> str:
    """The op string of ``data/image_ops`` that computes ``settings``' preprocessing."""
    _check(settings)
    method = RESIZE_METHOD[settings["resample"]]
    if settings["resize"] == "exact":
        ops = [f'resize(({settings["size"][0]}, {settings["size"][1]}), method="{method}")']
    else:
        ops = [f'resize_small({settings["size"]}, method="{method}")']
    if settings["crop"] is not None:
        ops.append(f"central_crop(({settings['crop'][0]}, {settings['crop'][1]}))")
    mean = tuple(float(v) for v in settings["mean"])  # repr round-trips: the exact constants
    std = tuple(float(v) for v in settings["std"])
    return "|".join(["decode", *ops, f"normalize(mean={mean}, std={std})"])
