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
`captions='names'` replaces the five captions by the colour-shape class name alone ("red
circle"): 42 distinct training captions, so most in-batch negatives repeat the positive's
caption (the duplicate-caption case of experiments/loss_vs_batch). `colours=('red',)` keeps
only those colours (in both splits; held-out pairs of other colours then do not occur).
Zero-shot classification tasks: `demo_class_names('shape')` (6 classes), `'colour'` (8),
`'colour_shape'` (48, e.g. "red circle"), `'size'`, `'position'`.

Generation costs about 0.1 ms per example, done lazily in `__getitem__` (random access, no
files); the same index always gives the same bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

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
        raise ValueError(f"unknown demo task {task!r}; choose one of {sorted(names)}")
    return names[task]


def demo_templates(task: str = "shape") -> tuple[str, ...]:
    """Zero-shot prompt templates phrased like the captions, one per value of the other attribute.

    Every training caption names colour *and* shape, so a prompt naming one of them alone
    ("a photo of a circle.") is a text the text tower never saw. Averaging "red {}", "green {}",
    ... over the colours (CLIP's prompt ensembling) gives a shape classifier made of texts of
    the training distribution, with colour averaged out; and the same over shapes for colour.
    """
    if task == "shape":
        return tuple(f"{colour} {{}}" for colour in COLOURS)
    if task == "colour":
        return tuple(f"{{}} {shape}" for shape in SHAPES)
    demo_class_names(task)  # raises on an unknown task
    return ("{}",)


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
                 pairs: str = "all", captions: str = "full", colours: tuple[str, ...] | None = None):
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"demo split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
        if pairs not in ("all", "held_out") or (pairs == "held_out" and split != "eval"):
            raise ValueError(f"demo pairs={pairs!r} must be 'all', or 'held_out' with split='eval'")
        if captions not in ("full", "names"):
            raise ValueError(f"demo captions={captions!r} must be 'full' or 'names'")
        unknown = sorted(set(colours or ()) - set(COLOURS))
        if unknown or (colours is not None and not colours):
            raise ValueError(f"demo colours={colours!r} must be a non-empty subset of {list(COLOURS)}")
        if size is not None and size <= 0:
            raise ValueError(f"demo size must be positive, got {size}")
        if image_size < 16:
            raise ValueError(f"demo image_size={image_size} is too small to draw shapes; use >= 16")
        self.split, self.image_size, self.caption_style = split, image_size, captions
        self.size = size or DEFAULT_SIZES[split]
        held_out = set(HELD_OUT)
        all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
        if pairs == "held_out":
            self._pairs = [p for p in all_pairs if p in held_out]
        else:
            self._pairs = all_pairs if split == "eval" else [p for p in all_pairs if p not in held_out]
        if colours is not None:  # e.g. one colour: shape is then the only thing a name caption says
            self._pairs = [p for p in self._pairs if p[0] in colours]

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> tuple[str, str, str, str, np.random.Generator]:
        """(colour, shape, size, position, rng for the jitter) of example `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"demo index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([_SPLIT_SEEDS[self.split], index])
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

    def captions(self, index: int) -> list[str]:
        """The example's captions, without drawing its image."""
        colour, shape, size, position, _ = self.attributes(int(index))
        if self.caption_style == "names":
            return [f"{colour} {shape}"]
        return [t.format(colour=colour, shape=shape, size=size, position=position)
                for t in CAPTION_TEMPLATES]

    def __getitem__(self, index: int) -> dict:
        colour, shape, size, position, rng = self.attributes(int(index))
        image = draw_shape(shape, colour, size, position, self.image_size, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        return {
            "image": buffer.getvalue(),
            "captions": self.captions(index),
            "key": f"demo-{self.split}-{index}",
            "label/shape": SHAPES.index(shape),
            "label/colour": list(COLOURS).index(colour),
            "label/colour_shape": demo_class_names("colour_shape").index(f"{colour} {shape}"),
            "label/size": list(SIZES).index(size),
            "label/position": list(POSITIONS).index(position),
        }

    def __repr__(self) -> str:
        return f"DemoSource(split={self.split!r}, {self.size} examples, {self.image_size}px)"


def demo_source(split: str = "train", size: int | None = None, image_size: int = 64,
                pairs: str = "all", captions: str = "full",
                colours: tuple[str, ...] | None = None) -> DemoSource:
    """The demo data as a random-access source (`len`, `[i]`)."""
    return DemoSource(split, size, image_size, pairs, captions, colours)
