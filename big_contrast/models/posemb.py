"""Position embeddings for another resolution or text length: resample, recompute, truncate.

Why: a learned position embedding has one row per patch (and per text position), so the
parameters of a tower trained at 112 px do not fit the same tower at 224 px, nor a text
tower with another ``max_len``. CLIPA / FLIP-style recipes (most steps at low resolution
and short text, a short fine-tune at full size), evaluation at another resolution and
released weights used at another size all need the table mapped to the new shape, and
nothing else changed.

Rules (``adapt_params`` applies them to a whole parameter tree):

* A learned 2-D image table is resampled as big_vision's ``vit.resample_posemb`` does:
  ``scipy.ndimage.zoom(grid, zoom, order=1)``, i.e. **bilinear interpolation with aligned
  corners** (output row ``i`` of ``n_out`` samples input row ``i * (n_in - 1) / (n_out - 1)``,
  so the four corner embeddings are kept exactly; a 1-row output takes row 0, as scipy
  does). It is done here with two small interpolation matrices in float64, per axis, so a
  non-square grid (``image_size=(h, w)``) resamples each axis on its own (big_vision's
  function assumes a square one). A class-token row (``pool='tok'``: the CLIP / timm / HF
  layout, ``N + 1`` rows, the class token's row first) is kept as it is and only the
  ``N`` patch rows are resampled.
* A fixed ``'sincos2d'`` table is not a parameter: the tower recomputes it for its grid
  (``sincos_posemb`` is the same function the ViT uses).
* 2D RoPE (``rope='2d'``, ``models/rope.py``) has no parameters either: the tower computes
  its rotation angles from the new grid's patch positions, so there is nothing to resample
  (a learned table beside it is resampled as above; ``posemb='none'`` has no table at all).
  Without a learned image table the patch grid does not enter ``Geometry``, so a change of
  resolution alone is not a resampling (the restore goes through the plain path).
* A text table is truncated to the first ``max_len`` rows (exact: positions are absolute,
  so a text that fits embeds as before), or extended: the old rows are kept and the new
  rows drawn like a fresh tower's (normal, std ``text.POSEMB_STD``; big_vision re-uses the
  model's initialisation for anything the checkpoint lacks, ``common.merge_params``);
  ``text_extend='zeros'`` fills them with zeros instead (for optimizer moments, which
  ``adapt_params`` maps the same way as the parameters they belong to); with
  ``text_extend='interpolate'`` the whole table is linearly resampled to the new length
  (open_clip's ``resize_text_pos_embed``: ``F.interpolate(mode='linear',
  align_corners=False)``, which moves the old rows too).
* Any other change of shape (width, depth, vocabulary, MLP size, scan layout, a learned
  table becoming sin-cos) has no rule and fails with the sentence it fails with today.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from big_contrast.errors import ConfigError, ConfigMismatch
from big_contrast.models import registry, variants
from big_contrast.models.text import POSEMB_STD
from big_contrast.models.transformer import posemb_sincos_2d
from big_contrast.sharding import path_str

IMAGE_POSEMB, TEXT_POSEMB = "image/posemb", "text/posemb"
TEXT_EXTENDS = ("init", "zeros", "interpolate")


def aligned_linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with aligned corners (scipy's
    ``zoom(order=1)``): output ``i`` samples ``i * (n_in - 1) / (n_out - 1)``."""
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0  # scipy's zoom for a 1-row output
    return _linear_weights(np.arange(n_out) * step, n_in)


def _half_pixel_linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's ``interpolate(mode='linear', align_corners=False)``:
    output ``i`` samples ``(i + 0.5) * n_in / n_out - 0.5``, clamped at the ends."""
    return _linear_weights((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, n_in)


def _linear_weights(source: np.ndarray, n_in: int) -> np.ndarray:
    """Rows of linear-interpolation weights over ``n_in`` samples at positions ``source``
    (clamped to the ends)."""
    source = np.clip(source, 0, n_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    weights = np.zeros((len(source), n_in))
    np.add.at(weights, (np.arange(len(source)), low), 1.0 - (source - low))
    np.add.at(weights, (np.arange(len(source)), high), source - low)
    return weights


def resample_grid(grid_hwd, new_hw: tuple[int, int]) -> np.ndarray:
    """A [h, w, D] grid of embeddings resampled to [new_h, new_w, D] (bilinear, aligned
    corners: big_vision's ``resample_posemb``), in float64, returned in the input dtype."""
    grid = np.asarray(grid_hwd)
    rows = aligned_linear_weights(grid.shape[0], new_hw[0])
    cols = aligned_linear_weights(grid.shape[1], new_hw[1])
    out = np.einsum("ph,qw,hwd->pqd", rows, cols, grid.astype(np.float64))
    return out.astype(grid.dtype)


def resample_image_posemb(posemb_1nd, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          class_token: bool) -> np.ndarray:
    """A learned ViT table [1, (1 +) h*w, D] for another patch grid; the class token's row
    (first, when ``class_token``) is kept unchanged."""
    table = np.asarray(posemb_1nd)[0]
    prefix, patches = table[:int(class_token)], table[int(class_token):]
    grid = resample_grid(patches.reshape(*old_grid, -1), new_grid)
    return np.concatenate([prefix, grid.reshape(new_grid[0] * new_grid[1], -1)])[None]


def sincos_posemb(grid: tuple[int, int], width: int, class_token: bool) -> np.ndarray:
    """The fixed 'sincos2d' table [1, (1 +) h*w, width] the ViT computes for ``grid`` (the
    class token gets a zero row, as in the tower)."""
    table = posemb_sincos_2d(*grid, width)
    if class_token:
        table = np.concatenate([np.zeros((1, width), table.dtype), table])
    return table[None]


def resize_text_posemb(posemb_1ld, new_len: int, *, extend: str = "init",
                       seed: int = 0) -> np.ndarray:
    """A text table [1, L, D] for ``new_len`` positions: truncated, or extended (see the
    module docstring for ``extend`` = 'init' | 'zeros' | 'interpolate')."""
    if extend not in TEXT_EXTENDS:
        raise ConfigError(f"text_extend={extend!r} is unknown; use one of {TEXT_EXTENDS}.")
    table = np.asarray(posemb_1ld)[0]
    old_len, width = table.shape
    if new_len <= old_len:
        return table[None, :new_len]
    if extend == "interpolate":
        return (_half_pixel_linear_weights(old_len, new_len) @ table.astype(np.float64)
                ).astype(table.dtype)[None]
    if extend == "zeros":
        return np.concatenate([table, np.zeros((new_len - old_len, width), table.dtype)])[None]
    fresh = jax.random.normal(jax.random.key(seed), (new_len - old_len, width)) * POSEMB_STD
    return np.concatenate([table, np.asarray(fresh, table.dtype)])[None]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What decides the position tables' shapes in a model config (``grid`` is None when the
    image tower has no learned table: 'sincos2d', or RoPE alone)."""
    grid: tuple[int, int] | None
    class_token: bool
    image_posemb: str
    text_len: int


def geometry(config: Mapping | None) -> Geometry:
    """The patch grid, class token, image posemb kind and text length of a model config."""
    cfg = registry.resolve_config(config)
    image = cfg["image"]
    _, patch = variants.decode_image_variant(image["variant"])
    size = image["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = (size[0] // patch, size[1] // patch) if image["posemb"] == "learn" else None
    return Geometry(grid=grid, class_token=image["pool"] == "tok",
                    image_posemb=image["posemb"], text_len=cfg["text"]["max_len"])


def mismatch_sentence(path: str, stored, wanted, directory=None) -> str:
    """Today's sentence for a parameter whose shape has no rule (``train/loop.py``,
    ``_with_initial_params``); ``functools.partial(mismatch_sentence, directory=...)`` names
    the checkpoint directory as it does."""
    where = "" if directory is None else f" in {directory}"
    return (f"The step-0 checkpoint{where} holds parameter {path} with shape {stored}, this config "
            f"{wanted}: use the model config it was imported with (its config.py).")


def adapt_params(params: Any, old_config: Mapping | None, new_config: Mapping | None, *,
                 text_extend: str = "init", seed: int = 0,
                 on_mismatch: Callable[[str, Any, Any], str] = mismatch_sentence
                 ) -> tuple[Any, list[str]]:
    """``params`` of a model built with ``old_config`` mapped to ``new_config``'s shapes.

    Returns the new tree (same structure, the position tables replaced) and one line per
    table changed (for the caller to print on stderr). A parameter whose shape changes with
    no rule raises ``ConfigMismatch(on_mismatch(path, stored_shape, wanted_shape))``.
    """
    old, new = geometry(old_config), geometry(new_config)
    wanted = param_shapes(new_config)
    stored = {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    _check_paths(stored, wanted, on_mismatch)
    changes: list[str] = []

    def adapt(path, leaf):
        name, shape = path_str(path), tuple(np.shape(leaf))
        if shape == wanted[name]:
            return leaf
        resized = _resized_table(name, leaf, wanted[name], old, new, text_extend, seed, changes)
        if resized is None:
            raise ConfigMismatch(on_mismatch(name, shape, wanted[name]))
        return resized

    return jax.tree_util.tree_map_with_path(adapt, params), changes


def adapt_optimizer_state(opt_state: Any, old_config: Mapping | None,
                          new_config: Mapping | None) -> Any:
    """``opt_state`` (any optax state) with every leaf that belongs to a position table (its
    path ends in ``image/posemb`` or ``text/posemb``, e.g. Adam's ``mu`` and ``nu``) mapped by
    the same rule as the parameter, new text rows zero; every other leaf as it is (the
    caller's restore checks their shapes)."""
    old, new = geometry(old_config), geometry(new_config)
    wanted = param_shapes(new_config)

    def adapt(path, leaf):
        name = path_str(path)
        table = next((t for t in (IMAGE_POSEMB, TEXT_POSEMB) if name == t or name.endswith("/" + t)), None)
        if table is None or table not in wanted or tuple(np.shape(leaf)) == wanted[table]:
            return leaf
        resized = _resized_table(table, leaf, wanted[table], old, new, "zeros", 0, [])
        return leaf if resized is None else resized

    return jax.tree_util.tree_map_with_path(adapt, opt_state)


def adapt_table(name: str, leaf, wanted, old_config: Mapping | None, new_config: Mapping | None,
                changes: list[str], *, text_extend: str = "init", seed: int = 0):
    """One table (``name`` = 'image/posemb' | 'text/posemb') of ``old_config`` in the ``wanted``
    shape of ``new_config``, a line appended to ``changes``; None where no rule applies."""
    return _resized_table(name, leaf, wanted, geometry(old_config), geometry(new_config), text_extend,
                          seed, changes)


def _resized_table(name: str, leaf, wanted, old: Geometry, new: Geometry, text_extend: str,
                   seed: int, changes: list[str]):
    """``leaf`` (the table at param path ``name``) in the ``wanted`` shape by its rule, with a
    line appended to ``changes``; None where no rule applies."""
    shape = tuple(np.shape(leaf))
    if name == IMAGE_POSEMB and _image_rule_applies(shape, wanted, old, new):
        changes.append(f"{name}: {_grid_str(old.grid)} -> {_grid_str(new.grid)} patch grid, "
                       "resampled bilinearly (aligned corners, as big_vision's resample_posemb)"
                       + ("; class token row kept" if new.class_token else ""))
        return resample_image_posemb(leaf, old.grid, new.grid, new.class_token)
    if name == TEXT_POSEMB and shape[::2] == wanted[::2] and shape[1] == old.text_len:
        how = "truncated" if new.text_len < old.text_len else f"extended ({text_extend})"
        changes.append(f"{name}: {old.text_len} -> {new.text_len} positions, {how}")
        return resize_text_posemb(leaf, new.text_len, extend=text_extend, seed=seed)
    return None


def _image_rule_applies(shape, wanted, old: Geometry, new: Geometry) -> bool:
    """A learned table on both sides, same width and class token, and the stored rows are
    those of the old config's grid (so the reshape to it is exact)."""
    same_kind = old.image_posemb == new.image_posemb == "learn" and old.class_token == new.class_token
    if not same_kind:
        return False
    old_rows = old.grid[0] * old.grid[1] + old.class_token
    return shape[::2] == wanted[::2] and shape[1] == old_rows


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """{'image/posemb': shape, ...}: every parameter's shape in a model of ``config`` (abstract)."""
    params = nnx.state(registry.abstract_model(config), nnx.Param)
    return {path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(params)}


def _check_paths(stored: dict, wanted: dict, on_mismatch) -> None:
    """A parameter on one side only (another pool, posemb kind, depth, scan layout) has no rule."""
    unmatched = sorted(set(stored) ^ set(wanted))
    if unmatched:
        name = unmatched[0]
        raise ConfigMismatch(on_mismatch(name, stored.get(name, "absent"), wanted.get(name, "absent")))


def _grid_str(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"
