"""The built-in demo dataset: coloured shapes with captions, generated deterministically in code.

Each example is one shape (6 kinds) in one colour (8), of one size (3), at one position (5),
on a muted background, drawn anti-aliased with PIL and JPEG-encoded, so it goes through the
same decode + preprocessing path as real data. Every example carries five captions in
different phrasings (the pipeline samples one per step), e.g.

    "a photo of a small red circle in the top left"    "red circle, small"
    "a small circle in red"    "a red circle at the top left"    "top left: small red circle"

and integer labels `label/shape`, `label/colour`, `label/colour_shape`, `label/size`,
`label/position` (indices into `demo_class_names(task)`).

Splits:
  * `train`: random attributes per index (seeded by the index), never one of the `HELD_OUT`
    colour-shape combinations; jittered position / size / background.
  * `eval`: all 48 colour-shape combinations in turn (so classes are balanced), including the
    6 held-out ones the model never saw as a pair in training -- a small compositional test.
    `pairs='held_out'` enumerates only those 6 (the compositional test on its own).
`group_size=G` (train only) lays the records out in groups of G consecutive indices that share
colour, size and position and differ in shape (G <= 5, the fewest training shapes of a
colour): hard negatives for shape. The pipeline keeps a source's groups together when it
shuffles (`group_size` in `sources.py`), so each batch holds about B / G such groups; without
them almost every in-batch negative already differs from its positive in colour, size or
position once those are learnt, and shape gets about one negative per row to learn from
(experiments/demo_recipe).
`boxes=True` adds the shape's bounding box, a LocCa region (`data/location_targets.py`):
`'boxes': [{'box': [ymin, xmin, ymax, xmax], 'phrase': '<colour> <shape>'}]`, fractions of the
image side, computed from the same geometry the drawing uses (`shape_box`); it holds for the
whole image, so train with a pp that does not crop (`resize`).
`captions='names'` replaces the five captions by the colour-shape class name alone ("red
circle"): 42 distinct training captions, so most in-batch negatives repeat the positive's
caption (the duplicate-caption case of experiments/loss_vs_batch). `colours=('red',)` keeps
only those colours (in both splits; held-out pairs of other colours then do not occur).
Zero-shot classification tasks: `demo_class_names('shape')` (6 classes), `'colour'` (8),
`'colour_shape'` (48, e.g. "red circle"), `'size'`, `'position'`.

Generation costs about 0.1 ms per example, done lazily in `__getitem__` (random access, no
files); the same index always gives the same bytes, and the first `CACHE_RECORDS` indices keep
their bytes once drawn (the demo trains for many epochs of a small split; about 1 KB each).
"""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

from big_contrast.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
    "pink": (240, 120, 180), "cyan": (40, 200, 210),
}
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.48}  # shape diameter / image side
POSITIONS = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "center": (0.5, 0.5),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72),
}
# Colour-shape pairs never shown in `train` (one per shape, each colour at most once).
HELD_OUT = (("green", "circle"), ("yellow", "square"), ("blue", "triangle"),
            ("orange", "diamond"), ("red", "star"), ("purple", "cross"))
CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape} in the {position}",
    "{colour} {shape}, {size}",
    "a {size} {shape} in {colour}",
    "a {colour} {shape} at the {position}",
    "{position}: {size} {colour} {shape}",
)
DEFAULT_SIZES = {"train": 10_000, "eval": 960}  # eval: 20 examples per colour-shape pair
CACHE_RECORDS = 50_000  # indices whose JPEG bytes are kept once drawn (~1 KB each at 32 px)
_SPLIT_SEEDS = {"train": 1, "eval": 2}


def demo_class_names(task: str = "shape") -> list[str]:
    """Class names for zero-shot classification on the demo data, indexed by `label/<task>`."""
    names = {
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "colour_shape": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "size": list(SIZES),
        "position": list(POSITIONS),
    }
    if task not in names:
        raise ConfigError(f"unknown demo task {task!r}; choose one of {sorted(names)}")
    return names[task]


def demo_templates(task: str = "shape", style: str = "captions") -> tuple[str, ...]:
    """Zero-shot prompt templates phrased like the captions (CLIP's prompt ensembling).

    A prompt naming one attribute alone ("a photo of a circle.") is a text the text tower never
    saw. `style="captions"` (the default) gives every training caption with the task's value
    left open -- for shape, the five templates over all colours, sizes and positions ("a photo
    of a small red {} in the top left", ..., 328 in all) -- so the averaged class embedding is
    the text embedding averaged over the captions of that class. `style="short"` gives one
    short prompt per value of the other attribute ("red {}", "green {}", ...). Tasks:
    'shape', 'colour', 'colour_shape' (templates that name "{colour} {shape}" together), 'size',
    'position'.
    """
    demo_class_names(task)  # raises on an unknown task
    if style == "short":
        if task == "shape":
            return tuple(f"{colour} {{}}" for colour in COLOURS)
        if task == "colour":
            return tuple(f"{{}} {shape}" for shape in SHAPES)
        return ("{}",)
    if style != "captions":
        raise ConfigError(f"demo template style={style!r}: use 'captions' or 'short'")
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
              "position": list(POSITIONS)}
    open_field = "{colour} {shape}" if task == "colour_shape" else "{%s}" % task
    out = []
    for template in CAPTION_TEMPLATES:
        if open_field not in template:
            continue
        template = template.replace(open_field, "{open}")
        rest = [f for f in values if "{%s}" % f in template]
        for combo in itertools.product(*(values[f] for f in rest)):
            out.append(template.format(open="{}", **dict(zip(rest, combo))))
    return tuple(dict.fromkeys(out))


def demo_vocabulary() -> list[str]:
    """Every word a demo caption can contain (for the built-in word tokenizer)."""
    words = set()
    for template in CAPTION_TEMPLATES:
        words.update(template.replace(",", " ").replace(":", " ").split())
    for group in (SHAPES, COLOURS, SIZES, POSITIONS):
        for name in group:
            words.update(name.split())
    return sorted(w for w in words if "{" not in w)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        d = r / math.sqrt(2) * 1.15
        return [(cx - d, cy - d), (cx + d, cy - d), (cx + d, cy + d), (cx - d, cy + d)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                for k in range(10)
                for a, rr in [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.42 * r)]]
    if shape == "cross":
        w = 0.36 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(shape: str, colour: str, size: str, position: str, image_size: int = 64,
               rng: np.random.Generator | None = None) -> Image.Image:
    """Draws one example (anti-aliased: drawn at 2x, then downsampled)."""
    rng = rng or np.random.default_rng(0)
    scale = 2 * image_size
    background = tuple(int(v) for v in rng.integers(30, 110) + rng.integers(-15, 16, size=3))
    canvas = Image.new("RGB", (scale, scale), background)
    draw = ImageDraw.Draw(canvas)
    fx, fy = POSITIONS[position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-0.04, 0.04, size=2)) * scale
    r = SIZES[size] * rng.uniform(0.92, 1.08) * scale / 2
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BILINEAR)


class DemoSource:
    """Random-access demo examples: `source[i]` -> raw example dict (see module docstring)."""

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 64,
                 pairs: str = "all", captions: str = "full", colours: tuple[str, ...] | None = None,
                 group_size: int = 1, boxes: bool = False):
        if split not in _SPLIT_SEEDS:
            raise ConfigError(f"demo split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
        if pairs not in ("all", "held_out") or (pairs == "held_out" and split != "eval"):
            raise ConfigError(f"demo pairs={pairs!r} must be 'all', or 'held_out' with split='eval'")
        if captions not in ("full", "names"):
            raise ConfigError(f"demo captions={captions!r} must be 'full' or 'names'")
        unknown = sorted(set(colours or ()) - set(COLOURS))
        if unknown or (colours is not None and not colours):
            raise ConfigError(f"demo colours={colours!r} must be a non-empty subset of {list(COLOURS)}")
        if size is not None and size <= 0:
            raise ConfigError(f"demo size must be positive, got {size}")
        if image_size < 16:
            raise ConfigError(f"demo image_size={image_size} is too small to draw shapes; use >= 16")
        self.split, self.image_size, self.caption_style = split, image_size, captions
        self.size = size or DEFAULT_SIZES[split]
        self.group_size = int(group_size)
        self.boxes = bool(boxes)  # LocCa regions: the shape's box (shape_box)
        self._encoded: dict[int, bytes] = {}
        held_out = set(HELD_OUT)
        all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
        if pairs == "held_out":
            self._pairs = [p for p in all_pairs if p in held_out]
        else:
            self._pairs = all_pairs if split == "eval" else [p for p in all_pairs if p not in held_out]
        if colours is not None:  # e.g. one colour: shape is then the only thing a name caption says
            self._pairs = [p for p in self._pairs if p[0] in colours]
        self._shapes_of: dict[str, list[str]] = {}  # colour -> its shapes here, in COLOURS order
        for colour, shape in self._pairs:
            self._shapes_of.setdefault(colour, []).append(shape)
        self._check_groups()

    def _check_groups(self):
        if self.group_size == 1:
            return
        if self.split != "train":
            raise ConfigError(f"demo group_size={self.group_size} applies to split='train' only; "
                             "the eval split enumerates every pair in turn")
        fewest = min(len(shapes) for shapes in self._shapes_of.values())
        if not 1 < self.group_size <= fewest:
            raise ConfigError(f"demo group_size={self.group_size} must lie in [1, {fewest}]: a group "
                             f"holds one example of each of up to {fewest} shapes of one colour")
        if self.size % self.group_size:
            raise ConfigError(f"demo size={self.size} is not a multiple of group_size="
                             f"{self.group_size}; make it one so that every group is whole")

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> tuple[str, str, str, str, np.random.Generator]:
        """(colour, shape, size, position, rng for the jitter) of example `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"demo index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([_SPLIT_SEEDS[self.split], index])
        if self.group_size > 1:
            return (*self._group_member(index), rng)
        if self.split == "eval":  # enumerate pairs (balanced classes), then sizes x positions
            colour, shape = self._pairs[index % len(self._pairs)]
            layout = index // len(self._pairs)
            size = list(SIZES)[layout % len(SIZES)]
            position = list(POSITIONS)[(layout // len(SIZES)) % len(POSITIONS)]
        else:
            colour, shape = self._pairs[rng.integers(len(self._pairs))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        return colour, shape, size, position, rng

    def _group_member(self, index: int) -> tuple[str, str, str, str]:
        """Member `index % G` of group `index // G`: the group's colour, size and position, and
        the member's place in the group's random order of that colour's shapes."""
        group, member = divmod(index, self.group_size)
        rng = np.random.default_rng([_SPLIT_SEEDS[self.split], 1 << 31, group])
        colours = list(self._shapes_of)
        colour = colours[rng.integers(len(colours))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        shapes = self._shapes_of[colour]
        return colour, shapes[rng.permutation(len(shapes))[member]], size, position

    def captions(self, index: int) -> list[str]:
        """The example's captions, without drawing its image."""
        colour, shape, size, position, _ = self.attributes(int(index))
        return self._captions(colour, shape, size, position)

    def _captions(self, colour: str, shape: str, size: str, position: str) -> list[str]:
        if self.caption_style == "names":
            return [f"{colour} {shape}"]
        return [t.format(colour=colour, shape=shape, size=size, position=position)
                for t in CAPTION_TEMPLATES]

    def _encoded_image(self, index: int, attributes) -> bytes:
        """The example's JPEG bytes, drawn once and kept for the first `CACHE_RECORDS` indices."""
        if index in self._encoded:
            return self._encoded[index]
        colour, shape, size, position, rng = attributes
        buffer = io.BytesIO()
        draw_shape(shape, colour, size, position, self.image_size, rng).save(buffer, format="JPEG", quality=92)
        if index < CACHE_RECORDS:  # a dict write is atomic, so grain's reader threads may share it
            self._encoded[index] = buffer.getvalue()
        return buffer.getvalue()

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        attributes = self.attributes(index)
        colour, shape, size, position, _ = attributes
        regions = {"boxes": [{"box": shape_box(self, index), "phrase": f"{colour} {shape}"}]} if self.boxes else {}
        return {**regions,
            "image": self._encoded_image(index, attributes),
            "captions": self._captions(colour, shape, size, position),
            "key": f"demo-{self.split}-{index}",
            "label/shape": SHAPES.index(shape),
            "label/colour": list(COLOURS).index(colour),
            "label/colour_shape": demo_class_names("colour_shape").index(f"{colour} {shape}"),
            "label/size": list(SIZES).index(size),
            "label/position": list(POSITIONS).index(position),
        }

    def __repr__(self) -> str:
        groups = f", groups of {self.group_size}" if self.group_size > 1 else ""
        return f"DemoSource(split={self.split!r}, {self.size} examples, {self.image_size}px{groups})"


def demo_source(split: str = "train", size: int | None = None, image_size: int = 64,
                pairs: str = "all", captions: str = "full",
                colours: tuple[str, ...] | None = None, group_size: int = 1, boxes: bool = False) -> DemoSource:
    """The demo data as a random-access source (`len`, `[i]`)."""
    return DemoSource(split, size, image_size, pairs, captions, colours, group_size, boxes)


# Per-patch labels for dense-feature probes (evaluate/dense_probe.py). Added beside the drawing
# code rather than into it so that the demo's images stay byte for byte what they were.
PATCH_TASKS = ("shape", "colour", "colour_shape", "foreground")


def shape_geometry(source: DemoSource, index: int) -> tuple[str, float, float, float]:
    """(shape, cx, cy, r) of example `index`: centre and radius as fractions of the image side.

    Replays `draw_shape`'s random draws in its order (background, centre jitter, radius jitter;
    the fill colour is drawn last and does not move the shape)."""
    colour, shape, size, position, rng = source.attributes(int(index))
    del colour
    rng.integers(30, 110)
    rng.integers(-15, 16, size=3)
    cx, cy = np.array(POSITIONS[position]) + rng.uniform(-0.04, 0.04, size=2)
    r = SIZES[size] * rng.uniform(0.92, 1.08) / 2
    return shape, float(cx), float(cy), float(r)


def shape_box(source: DemoSource, index: int) -> list[float]:
    """[ymin, xmin, ymax, xmax] of example `index`'s shape, fractions of the image side: the
    extent of the circle or polygon `draw_shape` fills, clipped to the image."""
    shape, cx, cy, r = shape_geometry(source, index)
    if shape == "circle":
        xs, ys = [cx - r, cx + r], [cy - r, cy + r]
    else:
        xs, ys = zip(*_polygon(shape, cx, cy, r))
    clip = lambda v: float(min(max(v, 0.0), 1.0))  # noqa: E731
    return [clip(min(ys)), clip(min(xs)), clip(max(ys)), clip(max(xs))]


def shape_coverage(source: DemoSource, index: int, grid: int | tuple[int, int]) -> np.ndarray:
    """float32 [gh, gw]: the fraction of each grid cell's area the example's shape covers.

    The shape is rasterised as `draw_shape` draws it (at 2x the image size, the same polygon),
    as a 0/1 mask, then averaged over each cell (`cv2.INTER_AREA`, exact for fractional cells)."""
    import cv2

    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"patch grid {grid!r} must be positive, e.g. image_size // patch_size.")
    shape, cx, cy, r = shape_geometry(source, index)
    scale = 2 * source.image_size
    cx, cy, r = cx * scale, cy * scale, r * scale
    canvas = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    mask = np.asarray(canvas, np.float32) / 255.0
    return cv2.resize(mask, (gw, gh), interpolation=cv2.INTER_AREA)


def demo_patch_labels(source: DemoSource, index: int, grid: int | tuple[int, int], task: str = "shape",
                      min_coverage: float = 0.5) -> np.ndarray:
    """int32 [gh, gw], row-major like a ViT's patch tokens: 0 where the shape covers less than
    `min_coverage` of the patch (background), else 1 + the example's class index for `task`
    ('shape' 6 classes, 'colour' 8, 'colour_shape' 48, 'foreground' 1). The grid spans the whole
    image, so it matches the tokens of an image preprocessed without cropping (`resize`)."""
    if task not in PATCH_TASKS:
        raise ValueError(f"demo patch task {task!r} is not one of {PATCH_TASKS}.")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage={min_coverage} must be in (0, 1]: the covered fraction of a shape patch.")
    colour, shape = source.attributes(int(index))[:2]
    label = {"shape": SHAPES.index(shape), "colour": list(COLOURS).index(colour), "foreground": 0,
             "colour_shape": demo_class_names("colour_shape").index(f"{colour} {shape}")}[task]
    covered = shape_coverage(source, index, grid) >= min_coverage
    return np.where(covered, 1 + label, 0).astype(np.int32)


def demo_patch_classes(task: str = "shape") -> list[str]:
    """Class names of `demo_patch_labels(..., task)`: 'background' first."""
    if task == "foreground":
        return ["background", "shape"]
    if task not in PATCH_TASKS:
        raise ValueError(f"demo patch task {task!r} is not one of {PATCH_TASKS}.")
    return ["background", *demo_class_names(task)]
