"""The image preprocessing a released checkpoint expects, pixel-exact with transformers'.

``Transform(settings)(pil_image)`` -> float32 ``[H, W, 3]``, the same steps as the PIL
backend of transformers' ``SiglipImageProcessor`` / ``CLIPImageProcessor`` (and open_clip's
eval transform for SigLIP, which resizes straight to the square): convert to RGB, resize
the uint8 image with PIL (to an exact size, or the shorter side to ``size`` with the longer
side floored, as transformers does), centre-crop, scale by ``1/255``, subtract the mean and
divide by the std per channel. ``settings`` is a dict:

    resize     'exact' (SigLIP) | 'shortest' (CLIP)
    size       [h, w] for 'exact', an int for 'shortest'
    crop       [h, w] or None
    resample   'bicubic' | 'bilinear' | 'nearest' | 'lanczos'
    mean, std  three floats each

``pp_string(settings)`` is the nearest op string of the data pipeline (``data/image_ops``),
which resizes bilinearly: ``big-contrast eval`` on a dataset uses it; ``transform`` is exact.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
SIGLIP = dict(resize="exact", size=[224, 224], crop=None, resample="bicubic",
              mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
CLIP = dict(resize="shortest", size=224, crop=[224, 224], resample="bicubic",
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])


class Transform:
    """PIL image -> the float32 ``[H, W, 3]`` pixels of the checkpoint's preprocessing."""

    def __init__(self, settings: dict):
        if settings["resize"] not in ("exact", "shortest") or settings["resample"] not in RESAMPLE:
            raise ValueError(f"preprocessing {settings} is unknown: resize must be 'exact' or "
                             f"'shortest' and resample one of {tuple(RESAMPLE)}.")
        self.settings = dict(settings)

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.settings
        if s["crop"] is not None:
            return tuple(s["crop"])
        return tuple(s["size"]) if s["resize"] == "exact" else (s["size"], s["size"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        s = self.settings
        image = image.convert("RGB")
        width, height = image.size
        if s["resize"] == "exact":
            out_h, out_w = s["size"]
        else:
            short, long = min(width, height), max(width, height)
            new_long = int(s["size"] * long / short)
            out_h, out_w = (s["size"], new_long) if height <= width else (new_long, s["size"])
        x = np.asarray(image.resize((out_w, out_h), RESAMPLE[s["resample"]]))
        if s["crop"] is not None:
            x = _center_crop(x, *s["crop"])
        x = x.astype(np.float32) * np.float32(1 / 255)
        return ((x - np.asarray(s["mean"], np.float32)) / np.asarray(s["std"], np.float32))

    def batch(self, images) -> np.ndarray:
        return np.stack([self(image) for image in images])


def _center_crop(x: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``center_crop``: zero-pads an image smaller than the crop, then cuts."""
    h, w = x.shape[:2]
    if h < crop_h or w < crop_w:
        new_h, new_w = max(h, crop_h), max(w, crop_w)
        padded = np.zeros((new_h, new_w, x.shape[2]), x.dtype)
        top, left = (new_h - h + 1) // 2, (new_w - w + 1) // 2  # ceil, as transformers
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, new_h, new_w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return x[top:top + crop_h, left:left + crop_w]


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
    """The data pipeline's nearest op string (bilinear resize) for evaluation on a dataset."""
    if settings["resize"] == "exact":
        ops = [f"resize(({settings['size'][0]}, {settings['size'][1]}))"]
    else:
        ops = [f"resize_small({settings['size']})"]
    if settings["crop"] is not None:
        ops.append(f"central_crop(({settings['crop'][0]}, {settings['crop'][1]}))")
    mean = tuple(round(v, 8) for v in settings["mean"])
    std = tuple(round(v, 8) for v in settings["std"])
    return "|".join(["decode", *ops, f"normalize(mean={mean}, std={std})"])
