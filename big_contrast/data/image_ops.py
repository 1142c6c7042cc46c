"""Small composable image ops, configured by a big_vision-style string.

    pp = parse_image_pp("decode|random_resized_crop(224, scale=(0.5, 1))|flip_lr|value_range(-1, 1)")
    image_hw3 = pp(jpeg_bytes, rng)          # float32 [224, 224, 3] in [-1, 1]

Ops (each `op(image, rng) -> image`; arguments are python literals, checked when parsed):
  decode(fast=False)           encoded bytes -> PIL image, opened lazily (header only);
                               fast=True decodes JPEGs with libjpeg's fast integer IDCT and
                               plain chroma upsampling (about 30% less decode time, slightly
                               less exact pixels: mean abs difference 2-5 / 255)
  resize(size)                 to exactly `size` (int or (h, w)), aspect not kept
  resize_small(size)           shorter side to `size`, aspect kept
  central_crop(size)           the centred `size` window (int or (h, w))
  random_resized_crop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))
                               a random window of `scale` x area and `ratio` aspect, resized to
                               `size` (torchvision's RandomResizedCrop / big_vision's inception_crop)
  flip_lr(p=0.5)               horizontal flip with probability p
  value_range(vmin=-1, vmax=1) uint8 [0, 255] -> float32 [vmin, vmax]
  normalize(mean=CLIP_MEAN, std=CLIP_STD)
                               uint8 -> float32 (x / 255 - mean) / std, per channel (open_clip)

An image left as PIL at the end becomes a uint8 `[H, W, 3]` array. Images are converted to
RGB. Resizing ops ask the JPEG decoder for a reduced-size decode (`PIL.Image.draft`, DCT
scaling by 1/2, 1/4 or 1/8) whenever the output is at most half the size of the region it
comes from, which skips most of the decoding work on large images. Bytes that do not decode
raise `SkipRecord('undecodable_image')`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import math
import warnings

import numpy as np
from PIL import Image

from big_contrast.data.errors import SkipRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_FAST_JPEG = "big_contrast_fast_jpeg"  # image.info flag set by decode(fast=True)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(h), int(w)


def _draft(image: Image.Image, box: tuple[float, float, float, float], out_wh: tuple[int, int]):
    """Reduced-size JPEG decode that keeps >= out_wh pixels in `box`; returns the rescaled box."""
    x0, y0, x1, y1 = box
    width, height = image.size
    request = (math.ceil(width * out_wh[0] / max(x1 - x0, 1e-6)),
               math.ceil(height * out_wh[1] / max(y1 - y0, 1e-6)))
    drafted = image.draft("RGB", request)  # None unless a not-yet-decoded JPEG
    if not drafted:
        return box
    scale = width / drafted[1][2]
    _set_fast_jpeg(image)
    return tuple(v / scale for v in box)


def _set_fast_jpeg(image: Image.Image) -> None:
    """For decode(fast=True): PIL's JPEG decoder config is (scale, draft); draft=1 selects the
    fast IDCT without fancy upsampling (what PIL itself uses for `draft` thumbnails)."""
    if image.info.get(_FAST_JPEG) and image.format == "JPEG" and getattr(image, "tile", None):
        image.decoderconfig = ((image.decoderconfig or (1, 0))[0], 1)


def _pixels(image: Image.Image) -> Image.Image:
    """Decodes now (mapping decoder errors to a skip) and returns an RGB image."""
    _set_fast_jpeg(image)
    try:
        image.load()  # a no-op once decoded
    except _DECODE_ERRORS as e:
        raise SkipRecord("undecodable_image", str(e)) from None
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_box(image, box, out_hw):
    out_wh = (out_hw[1], out_hw[0])
    box = _draft(image, box, out_wh)
    return _pixels(image).resize(out_wh, Image.Resampling.BILINEAR, box=box)


def decode(data, rng, *, fast=False):
    del rng
    if isinstance(data, Image.Image):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise SkipRecord("missing_image", f"image field is {type(data).__name__}, not encoded bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as e:
        raise SkipRecord("undecodable_image", str(e)) from None
    if fast:
        image.info[_FAST_JPEG] = True
    if image.mode not in ("RGB", "L"):  # palette / alpha / CMYK: resample in RGB, not in P
        image = _pixels(image)
    return image


def resize(image, rng, *, size):
    del rng
    return _resize_box(image, (0, 0, *image.size), _hw(size))


def resize_small(image, rng, *, size):
    del rng
    width, height = image.size
    factor = size / min(width, height)
    out_hw = (max(1, round(height * factor)), max(1, round(width * factor)))
    return _resize_box(image, (0, 0, width, height), out_hw)


def central_crop(image, rng, *, size):
    del rng
    out_h, out_w = _hw(size)
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
        top, left = (h - out_h) // 2, (w - out_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"central_crop({size}) is larger than the {h}x{w} image; resize first")
        return image[top : top + out_h, left : left + out_w]
    width, height = image.size
    if out_w > width or out_h > height:
        raise ValueError(
            f"central_crop({size}) is larger than the {height}x{width} image; resize first")
    left, top = (width - out_w) // 2, (height - out_h) // 2
    return _pixels(image).crop((left, top, left + out_w, top + out_h))


def sample_crop_box(width, height, rng, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (10 tries, then a clamped central window)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def random_resized_crop(image, rng, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop needs 0 < scale <= 1 and 0 < ratio, got {scale}, {ratio}")
    box = sample_crop_box(*image.size, rng, scale, ratio)
    return _resize_box(image, box, _hw(size))


def flip_lr(image, rng, *, p=0.5):
    if rng.uniform() >= p:
        return image
    if isinstance(image, np.ndarray):
        return image[:, ::-1]
    return _pixels(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_uint8(image) -> np.ndarray:
    """PIL image -> uint8 `[H, W, 3]` (arrays pass through)."""
    if isinstance(image, np.ndarray):
        return image
    return np.asarray(_pixels(image))


def value_range(image, rng, *, vmin=-1.0, vmax=1.0):
    del rng
    x = to_uint8(image).astype(np.float32)
    x *= np.float32((vmax - vmin) / 255.0)  # in place: one float32 buffer per image
    x += np.float32(vmin)
    return x


def normalize(image, rng, *, mean=CLIP_MEAN, std=CLIP_STD):
    del rng
    x = to_uint8(image).astype(np.float32)
    x -= np.asarray(mean, np.float32) * 255.0
    x /= np.asarray(std, np.float32) * 255.0
    return x


OPS = {
    "decode": decode, "resize": resize, "resize_small": resize_small,
    "central_crop": central_crop, "random_resized_crop": random_resized_crop,
    "flip_lr": flip_lr, "value_range": value_range, "normalize": normalize,
}
# Ops whose first positional argument is `size`.
_POSITIONAL = {"decode": ("fast",), "resize": ("size",), "resize_small": ("size",), "central_crop": ("size",),
               "random_resized_crop": ("size", "scale", "ratio"), "flip_lr": ("p",),
               "value_range": ("vmin", "vmax"), "normalize": ("mean", "std")}


def _parse_op(text: str):
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"image op {text!r} is not of the form name or name(args)") from None
    name_node, args, keywords = (node.func, node.args, node.keywords) if isinstance(node, ast.Call) \
        else (node, [], [])
    if not isinstance(name_node, ast.Name) or name_node.id not in OPS:
        raise ValueError(f"unknown image op {text!r}; available ops: {sorted(OPS)}")
    name = name_node.id
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in keywords}
        positional = [ast.literal_eval(a) for a in args]
    except ValueError:
        raise ValueError(f"image op {text!r}: arguments must be python literals") from None
    names = _POSITIONAL.get(name, ())
    if len(positional) > len(names):
        raise ValueError(f"image op {text!r} takes at most {len(names)} positional arguments {names}")
    kwargs.update(zip(names, positional))
    try:
        inspect.signature(OPS[name]).bind(None, None, **kwargs)
    except TypeError as e:
        raise ValueError(f"image op {text!r}: {e}") from None
    return name, kwargs


class ImagePipeline:
    """A parsed op string: `pipeline(image_bytes, rng) -> [H, W, 3]` array. Picklable."""

    def __init__(self, spec: str):
        self.spec = spec
        parts = [p for p in spec.split("|") if p.strip()]
        if not parts or _parse_op(parts[0])[0] != "decode":
            raise ValueError(f"image pp {spec!r} must start with 'decode'")
        self.ops = [_parse_op(p) for p in parts]

    def __call__(self, data, rng: np.random.Generator) -> np.ndarray:
        image = data
        for name, kwargs in self.ops:
            image = OPS[name](image, rng, **kwargs)
        return to_uint8(image)

    def __repr__(self) -> str:
        return f"ImagePipeline({self.spec!r})"


@functools.lru_cache(maxsize=32)
def parse_image_pp(spec: str) -> ImagePipeline:
    """Parses (and checks) an op string like `"decode|resize(224)|value_range(-1, 1)"`."""
    return ImagePipeline(spec)
