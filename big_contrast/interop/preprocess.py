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

SigLIP 2 NaFlex (``Siglip2ImageProcessor``) has ``resize='naflex'`` with ``patch_size`` and
``max_num_patches`` instead of a size: each image keeps its aspect ratio under the patch
budget (``data/naflex.py``, pixel for pixel ``Siglip2ImageProcessorPil``), and ``Transform``
gives its ``patches`` / ``patch_mask`` / ``spatial_shape`` (``batch``: ``naflex_batch``'s
``patches`` / ``patch_mask`` / ``spatial_shapes``, the arguments of
``models.naflex.naflex_embed_images``). Its op string is ``decode|naflex(...)``, the data
pipeline's NaFlex op; ``square_equivalent`` is the fixed-resolution string that gives a square
image the same pixels at the position table's own grid.

There is one implementation: ``pp_string(settings)`` writes these steps as an op string of
``data/image_ops`` (e.g. ``decode|resize_small(224, method="bicubic")|central_crop((224, 224))
|normalize(...)``) and ``Transform`` runs it. ``big-contrast import`` writes the same string into
the workdir's ``config.data.pp_eval`` / ``pp_train``, so ``big-contrast eval`` on a dataset
preprocesses as the reference does. The normalisation constants are ``image_ops``'.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from big_contrast.data import image_ops, naflex
from big_contrast.errors import ConfigError

# settings["resample"] (transformers' names) -> the resize ops' Pillow `method`
RESIZE_METHOD = {"bicubic": "bicubic", "bilinear": "pil_bilinear", "nearest": "nearest",
                 "lanczos": "lanczos"}
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
SIGLIP = dict(resize="exact", size=[224, 224], crop=None, resample="bicubic",
              mean=list(image_ops.SIGLIP_MEAN), std=list(image_ops.SIGLIP_STD))
NAFLEX = dict(resize="naflex", patch_size=16, max_num_patches=256, resample="bilinear",
              mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # Siglip2ImageProcessor's defaults
CLIP = dict(resize="shortest", size=224, crop=[224, 224], resample="bicubic",
            mean=list(image_ops.CLIP_MEAN), std=list(image_ops.CLIP_STD))


class Transform:
    """PIL image -> the float32 ``[H, W, 3]`` pixels of the checkpoint's preprocessing."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.spec = pp_string(self.settings)
        self.naflex = self.settings["resize"] == "naflex"
        # NaFlex: data/naflex.py, which the pipeline's naflex op also runs.
        self._pipeline = None if self.naflex else image_ops.parse_image_pp(self.spec)

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.settings
        if self.naflex:
            raise ValueError("a NaFlex transform has no fixed output size: each image keeps its aspect "
                             "ratio under max_num_patches.")
        if s["crop"] is not None:
            return tuple(s["crop"])
        return tuple(s["size"]) if s["resize"] == "exact" else (s["size"], s["size"])

    def __call__(self, image: Image.Image):
        """float32 [H, W, 3] pixels, or for NaFlex ``data.naflex.naflex_image``'s dict."""
        if self.naflex:
            return naflex.naflex_image(image, **_naflex_options(self.settings))
        return self._pipeline(image, None)  # no random op: no generator needed

    def batch(self, images):
        """Stacked pixels [n, H, W, 3], or for NaFlex ``data.naflex.naflex_batch``'s dict."""
        if self.naflex:
            return naflex.naflex_batch(images, **_naflex_options(self.settings))
        return np.stack([self(image) for image in images])


def _naflex_options(settings: dict) -> dict:
    return dict(patch_size=int(settings["patch_size"]), max_num_patches=int(settings["max_num_patches"]),
                mean=tuple(float(v) for v in settings["mean"]), std=tuple(float(v) for v in settings["std"]))


def _check(settings: dict) -> None:
    if settings["resize"] == "naflex":
        if settings.get("resample", "bilinear") != "bilinear" or min(
                int(settings["patch_size"]), int(settings["max_num_patches"])) < 1:
            raise ConfigError(f"NaFlex preprocessing {settings} needs resample='bilinear' (what "
                              "Siglip2ImageProcessor does) and a positive patch_size and max_num_patches.")
        return
    if settings["resize"] not in ("exact", "shortest") or settings["resample"] not in RESIZE_METHOD:
        raise ConfigError(f"preprocessing {settings} is unknown: resize must be 'exact' or "
                          f"'shortest' (or 'naflex') and resample one of {tuple(RESIZE_METHOD)}.")
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


def from_hf_naflex_preprocessor(config: dict) -> dict:
    """NaFlex settings from a ``Siglip2ImageProcessor`` ``preprocessor_config.json``."""
    if config.get("do_resize", True) is False or config.get("do_rescale", True) is False:
        raise ConfigError("preprocessor_config.json turns off do_resize or do_rescale; the NaFlex "
                          "import reproduces Siglip2ImageProcessor's resize and 1/255 rescale only.")
    base = dict(NAFLEX)
    for key in ("patch_size", "max_num_patches"):
        base[key] = int(config.get(key, base[key]))
    if _HF_RESAMPLE.get(config.get("resample", 2)) != "bilinear":
        raise ConfigError(f"preprocessor_config.json resample={config['resample']}: the NaFlex import "
                          "resizes bilinearly (2), as Siglip2ImageProcessor does by default.")
    if config.get("do_normalize", True):
        for key in ("image_mean", "image_std"):
            if key in config:
                base[key.removeprefix("image_")] = [float(v) for v in config[key]]
    else:
        base.update(mean=[0.0] * 3, std=[1.0] * 3)
    return base


def to_hf_naflex_preprocessor(settings: dict) -> dict:
    return dict(image_processor_type="Siglip2ImageProcessor", do_resize=True, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True, resample=2,
                image_mean=settings["mean"], image_std=settings["std"],
                patch_size=int(settings["patch_size"]), max_num_patches=int(settings["max_num_patches"]))


def square_equivalent(settings: dict, image_size: int) -> dict:
    """Fixed-resolution settings that give a square image NaFlex's pixels at ``image_size`` (the
    position table's grid times the patch): Pillow bilinear to the square, the same mean / std."""
    return dict(resize="exact", size=[image_size, image_size], crop=None, resample="bilinear",
                mean=list(settings["mean"]), std=list(settings["std"]))


def to_hf_preprocessor(settings: dict, family: str) -> dict:
    if settings["resize"] == "naflex":
        return to_hf_naflex_preprocessor(settings)
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
    if settings["resize"] == "naflex":
        options = _naflex_options(settings)
        return (f"decode|naflex(patch_size={options['patch_size']}, max_num_patches={options['max_num_patches']}, "
                f"mean={options['mean']}, std={options['std']})")
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
