"""Small composable image ops, configured by a big_vision-style string.

    pp = parse_image_pp("decode|random_resized_crop(224, scale=(0.5, 1))|flip_lr|value_range(-1, 1)")
    image_hw3 = pp(jpeg_bytes, rng)          # float32 [224, 224, 3] in [-1, 1]

Ops (each `op(image, rng) -> image`; arguments are python literals, checked when parsed):
  decode(fast=False)           encoded bytes -> an undecoded image (header parsed, pixels later);
                               fast=True decodes JPEGs with libjpeg's fast integer IDCT and
                               plain chroma upsampling (less exact pixels: mean abs difference
                               2-5 / 255; through Pillow, so no faster than the OpenCV default)
  resize(size, method="bilinear")
                               to exactly `size` (int or (h, w)), aspect not kept
  resize_small(size, method="bilinear")
                               shorter side to `size`, aspect kept
  central_crop(size)           the centred `size` window (int or (h, w))
  random_resized_crop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3), method="bilinear")
                               a random window of `scale` x area and `ratio` aspect, resized to
                               `size` (torchvision's RandomResizedCrop / big_vision's inception_crop);
                               size=None keeps the window's own size and aspect (before naflex)
  flip_lr(p=0.5)               horizontal flip with probability p
  value_range(vmin=-1, vmax=1) uint8 [0, 255] -> float32 [vmin, vmax]
  normalize(mean=CLIP_MEAN, std=CLIP_STD)
                               uint8 -> float32 (x / 255 - mean) / std, per channel (open_clip)
  naflex(patch_size=16, max_num_patches=256, mean=0.5s, std=0.5s)
                               SigLIP 2's NaFlex input (`data/naflex.py`): aspect kept under the
                               patch budget, the example's fields become `patches` [N, p*p*3]
                               float32, `patch_mask` [N] and `spatial_shapes` [2] instead of
                               `image`; the last op, after no value op (it normalises itself)

Pixels are uint8 `[H, W, 3]` RGB numpy arrays from decoding on; an op string without a final
`value_range` / `normalize` yields uint8 images (the trainer can apply that last op on the
device instead: `device_ops.py`). JPEGs in RGB or grey decode with OpenCV (`cv2.imdecode`,
libjpeg-turbo, EXIF orientation ignored as Pillow does), other formats and modes with Pillow.
Resizing ops ask the JPEG decoder for a reduced-size decode (DCT scaling by 1/2, 1/4 or 1/8)
whenever the output is at most half the size of the region it comes from, which skips most
of the decoding work on large images. Bytes that do not decode raise
`SkipRecord('undecodable_image')`.

Resampling `method` of the resize ops (big_vision's resize ops take one too):
  "bilinear"       the default, fast: OpenCV's SIMD `cv2.resize`, bilinear (`INTER_LINEAR`,
                   half-pixel centres, as big_vision's `tf.image.resize`) unless the region shrinks
                   by 2x or more in both directions, then area averaging (`INTER_AREA`), after a
                   reduced-size JPEG decode where one fits. Within 1 / 255 of a plain numpy
                   resampler; Pillow's bilinear differs by < 0.5 / 255 on average when enlarging
                   and by a few / 255 when shrinking (Pillow widens its filter there).
  "bicubic", "lanczos", "nearest", "pil_bilinear"
                   Pillow's filters on the fully decoded pixels (no reduced-size decode, which
                   would change them): the resampling of transformers' PIL image processors
                   (`SiglipImageProcessor`, `CLIPImageProcessor`), open_clip and torchvision,
                   pixel for pixel. With one of these, `resize_small` floors the longer side as
                   transformers and torchvision do (the default rounds it, as big_vision does).
A crop box that falls between pixels of a reduced-size decode is rounded to whole pixels.

Normalisation constants live here once: CLIP's `CLIP_MEAN` / `CLIP_STD` and SigLIP's
`SIGLIP_MEAN` / `SIGLIP_STD` (0.5, which is `value_range(-1, 1)`); the interop `Transform`
(`interop/preprocess.py`) is an op string of these ops.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import warnings

import cv2
import numpy as np
from PIL import Image

from big_contrast.data.errors import SkipRecord
from big_contrast.errors import ConfigError

# Parallelism comes from the pipeline's threads and worker processes; OpenCV's own thread pool
# would only oversubscribe the cores (and costs CPU time to wake for 224 px images).
cv2.setNumThreads(1)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# The resize methods that resample with Pillow (the rest of the docstring says why).
PIL_METHODS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
               "nearest": Image.Resampling.NEAREST, "pil_bilinear": Image.Resampling.BILINEAR}
METHODS = ("bilinear", *PIL_METHODS)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_CV2_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


def _hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"image size must be positive, got {size!r}")
    return int(h), int(w)


@dataclasses.dataclass
class Undecoded:
    """Encoded bytes and their parsed header: decoding waits until an op knows how many
    pixels it needs (a reduced-size JPEG decode for a small output)."""

    data: bytes
    header: Image.Image  # opened lazily by Pillow: size, format and mode only
    fast: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), Pillow's order."""
        return self.header.size


def _size(image) -> tuple[int, int]:
    """(width, height) of an undecoded image, a PIL image or an array."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def _reduction(image: Undecoded, box, out_wh) -> int:
    """The largest JPEG DCT scale 1/r (r in 1, 2, 4, 8) that keeps >= out_wh pixels in `box`."""
    if image.header.format != "JPEG":
        return 1
    x0, y0, x1, y1 = box
    reduction = 1
    while (reduction < 8 and (x1 - x0) / (2 * reduction) >= out_wh[0]
           and (y1 - y0) / (2 * reduction) >= out_wh[1]):
        reduction *= 2
    return reduction


def _decode_cv2(image: Undecoded, reduction: int) -> np.ndarray:
    buffer = np.frombuffer(image.data, np.uint8)
    if reduction == 1:
        pixels = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    else:
        pixels = cv2.imdecode(buffer, _CV2_REDUCED[reduction] | cv2.IMREAD_IGNORE_ORIENTATION)
        pixels = None if pixels is None else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if pixels is None:
        raise SkipRecord("undecodable_image", "OpenCV could not decode the JPEG")
    return pixels


def _decode_pil(image: Image.Image, reduction: int, fast: bool) -> np.ndarray:
    if reduction > 1 or fast:
        width, height = image.size
        image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
        if fast and image.format == "JPEG" and getattr(image, "tile", None):
            # PIL's JPEG decoder config is (scale, draft); draft=1 selects the fast IDCT
            # without fancy upsampling (what PIL itself uses for `draft` thumbnails)
            image.decoderconfig = ((image.decoderconfig or (1, 0))[0], 1)
    try:
        image.load()  # a no-op once decoded
    except _DECODE_ERRORS as e:
        raise SkipRecord("undecodable_image", str(e)) from None
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _pixels(image, box=None, out_wh=None):
    """uint8 [H, W, 3] pixels, decoded at the smallest JPEG scale that keeps >= out_wh pixels
    in `box`, and `box` in the coordinates of those pixels."""
    if isinstance(image, np.ndarray):
        return image, box
    if not isinstance(image, Undecoded):  # a PIL image handed over by the source
        pixels = _decode_pil(image, 1, False)
    else:
        reduction = 1 if box is None else _reduction(image, box, out_wh)
        if image.header.format == "JPEG" and image.header.mode in ("RGB", "L") and not image.fast:
            pixels = _decode_cv2(image, reduction)
        else:
            pixels = _decode_pil(image.header, reduction, image.fast)
    if box is not None:
        scale = image.size[0] / pixels.shape[1]
        box = tuple(v / scale for v in box)
    return pixels, box


def check_method(method) -> str:
    """`method` if the resize ops know it, else a ValueError that lists the ones they do."""
    if method not in METHODS:
        raise ConfigError(f"resize method {method!r} is unknown; use one of {', '.join(METHODS)}.")
    return method


def _crop_box(box, width, height):
    """`box` rounded to whole pixels inside a `width` x `height` image, at least 1 x 1."""
    x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
    return x0, y0, min(width, max(x0 + 1, round(box[2]))), min(height, max(y0 + 1, round(box[3])))


def _resize_box_pil(image, box, out_wh, method):
    """Pillow's resampling of the `box` region (cropped first, as torchvision's resized_crop)."""
    pixels, _ = _pixels(image)
    if pixels.dtype != np.uint8:
        raise ConfigError(f"resize method {method!r} resamples uint8 pixels; put value_range / "
                          "normalize after the resize ops in the op string.")
    x0, y0, x1, y1 = _crop_box(box, pixels.shape[1], pixels.shape[0])
    region = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
    return np.asarray(region.resize(out_wh, PIL_METHODS[method]))


def _resize_box(image, box, out_hw, method="bilinear"):
    """The `box` (x0, y0, x1, y1) region of `image` resampled to `out_hw` pixels."""
    out_wh = (out_hw[1], out_hw[0])
    if check_method(method) != "bilinear":
        return _resize_box_pil(image, box, out_wh, method)
    pixels, box = _pixels(image, box, out_wh)
    x0, y0, x1, y1 = _crop_box(box, pixels.shape[1], pixels.shape[0])
    region = pixels[y0:y1, x0:x1]
    shrink = min((x1 - x0) / out_wh[0], (y1 - y0) / out_wh[1])
    interpolation = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
    return cv2.resize(region, out_wh, interpolation=interpolation)


def decode(data, rng, *, fast=False):
    del rng
    if isinstance(data, (Image.Image, np.ndarray)):  # sources may hand over decoded images
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise SkipRecord("missing_image", f"image field is {type(data).__name__}, not encoded bytes")
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as e:
        raise SkipRecord("undecodable_image", str(e)) from None
    return Undecoded(data, header, fast)


def resize(image, rng, *, size, method="bilinear"):
    del rng
    return _resize_box(image, (0, 0, *_size(image)), _hw(size), method)


def resize_small(image, rng, *, size, method="bilinear"):
    del rng
    width, height = _size(image)
    if check_method(method) == "bilinear":  # big_vision rounds the longer side
        factor = size / min(width, height)
        out_hw = (max(1, round(height * factor)), max(1, round(width * factor)))
    else:  # transformers' and torchvision's shortest-edge resize floors it
        long_side = int(size * max(width, height) / min(width, height))
        out_hw = (size, long_side) if height <= width else (long_side, size)
    return _resize_box(image, (0, 0, width, height), out_hw, method)


def central_crop(image, rng, *, size):
    del rng
    out_h, out_w = _hw(size)
    pixels, _ = _pixels(image)
    h, w = pixels.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    if top < 0 or left < 0:
        raise ConfigError(f"central_crop({size}) is larger than the {h}x{w} image; resize first")
    return pixels[top : top + out_h, left : left + out_w]


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


def random_resized_crop(image, rng, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method="bilinear"):
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"random_resized_crop needs 0 < scale <= 1 and 0 < ratio, got {scale}, {ratio}")
    box = sample_crop_box(*_size(image), rng, scale, ratio)
    if size is None:  # NaFlex: the window at its own size and aspect (big_vision's inception_crop)
        pixels, box = _pixels(image)[0], _crop_box(box, *_size(image))
        return pixels[box[1]:box[3], box[0]:box[2]]
    return _resize_box(image, box, _hw(size), method)


def flip_lr(image, rng, *, p=0.5):
    if rng.uniform() >= p:
        return image
    return cv2.flip(_pixels(image)[0], 1)  # a contiguous copy: stacking a reversed view is slow


def to_uint8(image) -> np.ndarray:
    """Any image of the ops -> uint8 `[H, W, 3]` RGB pixels."""
    return _pixels(image)[0]


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


def naflex(image, rng, *, patch_size=16, max_num_patches=256, mean=SIGLIP_MEAN, std=SIGLIP_STD):
    """The example's NaFlex fields (`data/naflex.py`; transformers' Siglip2ImageProcessorPil)."""
    del rng
    from big_contrast.data.naflex import naflex_image  # Pillow resize; imported where used

    fields = naflex_image(to_uint8(image), patch_size=patch_size, max_num_patches=max_num_patches,
                          mean=mean, std=std)
    return dict(patches=fields["patches"], patch_mask=fields["patch_mask"],
                spatial_shapes=fields["spatial_shape"])  # stacked: [B, 2], the batch's name


OPS = {
    "decode": decode, "resize": resize, "resize_small": resize_small,
    "central_crop": central_crop, "random_resized_crop": random_resized_crop,
    "flip_lr": flip_lr, "value_range": value_range, "normalize": normalize, "naflex": naflex,
}
# The arguments each op takes positionally, in order.
_POSITIONAL = {"decode": ("fast",), "resize": ("size", "method"), "resize_small": ("size", "method"),
               "central_crop": ("size",), "random_resized_crop": ("size", "scale", "ratio", "method"),
               "flip_lr": ("p",),
               "value_range": ("vmin", "vmax"), "normalize": ("mean", "std"),
               "naflex": ("patch_size", "max_num_patches")}


def _parse_op(text: str):
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"image op {text!r} is not of the form name or name(args)") from None
    name_node, args, keywords = (node.func, node.args, node.keywords) if isinstance(node, ast.Call) \
        else (node, [], [])
    if not isinstance(name_node, ast.Name) or name_node.id not in OPS:
        raise ConfigError(f"unknown image op {text!r}; available ops: {sorted(OPS)}")
    name = name_node.id
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in keywords}
        positional = [ast.literal_eval(a) for a in args]
    except ValueError:
        raise ConfigError(f"image op {text!r}: arguments must be python literals") from None
    names = _POSITIONAL.get(name, ())
    if len(positional) > len(names):
        raise ConfigError(f"image op {text!r} takes at most {len(names)} positional arguments {names}")
    kwargs.update(zip(names, positional))
    try:
        inspect.signature(OPS[name]).bind(None, None, **kwargs)
    except TypeError as e:
        raise ConfigError(f"image op {text!r}: {e}") from None
    if "method" in kwargs:
        try:
            check_method(kwargs["method"])
        except ValueError as e:
            raise ConfigError(f"image op {text!r}: {e}") from None
    return name, kwargs


class ImagePipeline:
    """A parsed op string: `pipeline(image_bytes, rng) -> [H, W, 3]` array. Picklable."""

    def __init__(self, spec: str):
        self.spec = spec
        parts = [p for p in spec.split("|") if p.strip()]
        if not parts or _parse_op(parts[0])[0] != "decode":
            raise ConfigError(f"image pp {spec!r} must start with 'decode'")
        self.ops = [_parse_op(p) for p in parts]
        _check_naflex_last(spec, [name for name, _ in self.ops])

    def __call__(self, data, rng: np.random.Generator) -> np.ndarray | dict:
        """The image, or with a final `naflex` op its dict of NaFlex fields."""
        image = data
        for name, kwargs in self.ops:
            image = OPS[name](image, rng, **kwargs)
        return image if isinstance(image, dict) else to_uint8(image)

    def __repr__(self) -> str:
        return f"ImagePipeline({self.spec!r})"


def _check_naflex_last(spec: str, names: list[str]) -> None:
    """`naflex` ends the string (its output is patches, not an image) and follows no value op."""
    if "naflex" not in names:
        return
    if names[-1] != "naflex" or names.count("naflex") > 1:
        raise ConfigError(f"image pp {spec!r}: naflex(...) must be the last op (it turns the image into patches).")
    if {"value_range", "normalize"} & set(names):
        raise ConfigError(f"image pp {spec!r}: naflex(...) normalises the pixels itself (mean, std); "
                          "remove value_range / normalize.")


def is_naflex(spec: str) -> bool:
    """Whether the op string ends in `naflex(...)` (its batches hold NaFlex fields, not 'image')."""
    return parse_image_pp(spec).ops[-1][0] == "naflex"


def naflex_options(spec: str) -> dict:
    """patch_size and max_num_patches of a string ending in `naflex(...)` (defaults filled in)."""
    name, kwargs = parse_image_pp(spec).ops[-1]
    if name != "naflex":
        raise ConfigError(f"image pp {spec!r} does not end in naflex(...).")
    return {"patch_size": 16, "max_num_patches": 256, **kwargs}


@functools.lru_cache(maxsize=32)
def parse_image_pp(spec: str) -> ImagePipeline:
    """Parses (and checks) an op string like `"decode|resize(224)|value_range(-1, 1)"`."""
    return ImagePipeline(spec)
