"""Train states across position-table shapes: restore with the saved shapes, then resample.

Why: a learned position embedding has one row per patch (and per text position), so a
checkpoint written at one ``image_size`` (or text ``max_len``) does not restore into a model
built at another. Resume, evaluation, step-0 imports and ``config.init_towers`` all load
parameters; each of them, when the config that wrote the checkpoint had another patch grid or
text length, restores the arrays in the *saved* shapes (the workdir records that config:
``config.json`` for a run, ``interop.json`` for an import, ``big_contrast/workdir.py``) and
maps the position tables with ``models.posemb.adapt_params`` (bilinear with aligned corners,
as big_vision's ``resample_posemb``; text tables truncated or extended), Adam's moments with
``adapt_optimizer_state``. One line on stderr says what was resampled. Every other change of
shape (width, depth, vocabulary) still fails with the sentence it fails with today.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from big_contrast.checkpoint import abstract_like
from big_contrast.models import posemb
from big_contrast.sharding import path_str
from big_contrast.workdir import Workdir

TABLES = (posemb.IMAGE_POSEMB, posemb.TEXT_POSEMB)


def saved_model_config(workdir):
    """The model config that wrote ``workdir``'s checkpoints: the recorded run config's, else the
    imported one's (``interop.json``), else None (unknown: shapes must then match exactly)."""
    workdir = Workdir.of(workdir)
    recorded = workdir.read_config()
    if recorded is not None and "model" in recorded:
        return recorded.model
    if workdir.interop.exists():
        return json.loads(workdir.interop.read_text()).get("model")
    return None


def needs_resampling(saved_model, model) -> bool:
    """Whether the position tables of ``saved_model`` differ in shape from ``model``'s."""
    if saved_model is None:
        return False
    try:
        return posemb.geometry(saved_model) != posemb.geometry(model)
    except Exception:  # noqa: BLE001 - an unreadable record: restore as today (its sentence)
        return False


def table_of(path: str) -> str | None:
    """'image/posemb' or 'text/posemb' when ``path`` (of a param or optimizer leaf) ends in one."""
    return next((t for t in TABLES if path == t or path.endswith("/" + t)), None)


def abstract_saved_state(state, shardings, saved_model):
    """The abstract train state of ``state`` with its position tables (parameters and the
    optimizer moments that mirror them) in ``saved_model``'s shapes: the restore target."""
    saved = posemb.param_shapes(saved_model)
    abstract = abstract_like(state, shardings)

    def with_saved_shape(path, leaf):
        table = table_of(path_str(path))
        if table is None or table not in saved or leaf.ndim != len(saved[table]):
            return leaf
        return jax.ShapeDtypeStruct(saved[table], leaf.dtype, sharding=leaf.sharding)

    return jax.tree_util.tree_map_with_path(with_saved_shape, abstract)


def _on_host(tree):
    """The position tables of ``tree`` as numpy arrays (gathered over processes when sharded
    across them); every other leaf as it is."""
    def host(path, leaf):
        if table_of(path_str(path)) is None or not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map_with_path(host, tree)


def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s),
                        tree, shardings)


def resampled_state(state, shardings, saved_model, model, *, directory=None):
    """``state`` (restored in ``saved_model``'s shapes) mapped to ``model``'s, placed with
    ``shardings``; returns (state, the line to print)."""
    on_mismatch = functools.partial(posemb.mismatch_sentence, directory=directory)
    params, changes = posemb.adapt_params(_on_host(state.params), saved_model, model, on_mismatch=on_mismatch)
    opt_state = posemb.adapt_optimizer_state(_on_host(state.opt_state), saved_model, model)
    state = dataclasses.replace(state, params=_placed(params, shardings.params),
                                opt_state=_placed(opt_state, shardings.opt_state))
    return state, describe(changes)


def describe(changes) -> str:
    return "Resampled the position embeddings to this config's shapes: " + "; ".join(changes) + "."


def restore(ckpt, state, shardings, saved_model, model, *, step=None, accept=None, warn=print):
    """``ckpt.restore_newest`` (``step`` None) or ``ckpt.restore(step)`` into ``model``'s shapes,
    through the saved shapes and ``resampled_state`` when ``saved_model``'s tables differ.
    ``saved_model`` may be a function of the step (``config.stages``: each stage's shapes).
    Returns (state, meta, step, accepted)."""
    saved_at = saved_model if callable(saved_model) else (lambda _step: saved_model)

    def target(at_step):
        if needs_resampling(saved_at(at_step), model):
            return abstract_saved_state(state, shardings, saved_at(at_step))
        return abstract_like(state, shardings)

    if step is None:
        restored = ckpt.restore_newest(target, accept=accept, warn=warn)
        if restored is None:
            return None
        restored_state, meta, step, accepted = restored
    else:
        restored_state, meta, step = ckpt.restore(target(step), step)
        accepted = None
    if needs_resampling(saved_at(step), model):
        restored_state, line = resampled_state(restored_state, shardings, saved_at(step), model,
                                               directory=ckpt.directory)
        warn(line)
    return restored_state, meta, step, accepted


def adapt_tower(tower: str, params, source_model, model):
    """``params`` of one tower (``config.init_towers``) written by ``source_model`` mapped to
    ``model``'s position-table shapes; (params, line or None). Other shape differences are left
    for ``load_tower_params`` to refuse with its sentence."""
    if source_model is None:
        return params, None
    mixed = _with_tower(model, source_model, tower)
    if not needs_resampling(mixed, model):
        return params, None
    wanted = posemb.param_shapes(model)
    changes: list[str] = []

    def adapt(path, leaf):
        name = f"{tower}/{path_str(path)}"
        if table_of(name) != name or tuple(np.shape(leaf)) == wanted.get(name):
            return leaf
        resized = posemb.adapt_table(name, np.asarray(leaf), wanted[name], mixed, model, changes)
        return leaf if resized is None else resized

    adapted = jax.tree_util.tree_map_with_path(adapt, params)
    return adapted, describe(changes) if changes else None


def _with_tower(model, source_model, tower):
    """``model`` with the geometry keys of ``source_model``'s ``tower`` (what its tables' shapes
    depend on)."""
    out = model.copy_and_resolve_references()
    keys = ("image_size", "pool", "posemb") if tower == "image" else ("max_len",)
    with out.unlocked(), out.ignore_type():
        for key in keys:
            if key in source_model[tower]:
                out[tower][key] = source_model[tower][key]
    return out


def print_line(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
