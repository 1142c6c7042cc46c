"""A frozen teacher: the model of another workdir, loaded once, sharded like a tower, embedding
the student's batch without gradient (the teacher of distillation and CWCL terms, issue 23).

    teacher, params = load_teacher("runs/large", mesh, towers=("image", "text"))
    embeddings, scale = embed(teacher, params, images, tokens)   # {"image": [b, D_t], "text": ...}

The workdir is one `big-contrast train` wrote (its `config.json` records the model and the data
settings) or one `big-contrast import` wrote (`interop.json` and `tokenizer/`). Only its
parameters are read (orbax partial restore of `params`, or of `ema` with `ema=True`), each
placed with the sharding the logical-axis rules give it on the student's mesh, so the teacher
is laid out like a tower of the student's and never costs a host copy of the whole model.

Why the step passes `params` in (not a closure): a closed-over array would be baked into the
compiled program as a constant (slow to compile, one more copy per device); as an argument it
is sharded and donated nowhere, and the step never returns it, so it stays what was loaded.

The teacher sees the student's batch through its own input conventions (`InputMap`):
* pixels: the student's normalised images are mapped back to [0, 255] through the student's
  final value op (`value_range` / `normalize` of `data.pp_train`) and forward through the
  teacher's (of its recorded `pp_eval`, or of the imported checkpoint's preprocessing): one
  per-channel affine map on the device;
* size: when the teacher's `image_size` differs from the student's, the (augmented) student
  crop is resized bilinearly (antialiased) to it on the device. That is the student's view at
  the teacher's resolution, not the teacher's own resize of the decoded image;
* text: the teacher's text tower reads the student's token ids, so its tokenizer and text
  length must be the student's (`check_reads_student_tokens`: one sentence otherwise). A
  teacher with another tokenizer feeds its embeddings through the data instead
  (`config.teacher = "data"`, `data/teacher_columns.py`), or distils its image tower only
  (`cwcl(tower=image)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from big_contrast import models, sharding
from big_contrast.data.device_ops import device_normalization
from big_contrast.errors import ConfigError, MissingFileError
from big_contrast.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """What a teacher workdir says about its model and inputs (read without loading weights)."""

    workdir: str  # absolute
    model: dict  # the model config, resolved over the defaults (`models.resolve_config`)
    pp: str | None  # the op string whose final value op the teacher's pixels went through
    tokenizer: str | None  # the data.tokenizer it read its captions with (None: unknown)
    lowercase: bool | None
    max_len: int


def read_record(location) -> TeacherRecord:
    """The teacher workdir's model and input settings; one sentence when it holds no checkpoint
    or no record of its model."""
    workdir = Workdir.of(location).absolute()
    if not workdir.path.exists():
        raise MissingFileError(f"config.teacher.workdir={str(workdir)!r} does not exist; give a workdir written by "
                               "`big-contrast train` or `big-contrast import`.")
    if not workdir.has_checkpoints():
        raise MissingFileError(f"config.teacher.workdir={str(workdir)!r} holds no checkpoint; train or import the "
                               "teacher there first.")
    recorded = workdir.read_config()
    if recorded is not None and "model" in recorded:
        data = recorded.get("data", {})
        model = models.resolve_config(recorded.model)
        return TeacherRecord(str(workdir), model, data.get("pp_eval"), data.get("tokenizer"),
                             data.get("lowercase"), int(model["text"]["max_len"]))
    if workdir.interop.exists():  # `big-contrast import`: interop.json + tokenizer/
        from big_contrast.interop import preprocess

        info = json.loads(workdir.interop.read_text())
        tokenizer = str(workdir.tokenizer) if workdir.tokenizer.exists() else None
        model = models.resolve_config(info["model"])
        return TeacherRecord(str(workdir), model, preprocess.pp_string(info["preprocess"]), tokenizer, False,
                             int(model["text"]["max_len"]))
    raise MissingFileError(f"config.teacher.workdir={str(workdir)!r} records no model (no config.json or "
                           "interop.json); give a workdir written by `big-contrast train` or `big-contrast import`.")


def check_reads_student_tokens(record: TeacherRecord, data_config, student_max_len: int) -> None:
    """The teacher's text tower reads the student's token ids: same tokenizer, same length."""
    same = (record.tokenizer is not None and _same_tokenizer(record.tokenizer, data_config.tokenizer)
            and (record.lowercase is None or bool(record.lowercase) == bool(data_config.get("lowercase", False))))
    if not same:
        raise ConfigError(
            f"The teacher in {record.workdir} tokenizes with {record.tokenizer!r}, the student with "
            f"{data_config.tokenizer!r} (or another lowercasing): its text tower cannot read the student's tokens; "
            "use config.teacher='data' with precomputed teacher embeddings, or an image-only term (cwcl(tower=image)).")
    if record.max_len != student_max_len:
        raise ConfigError(
            f"The teacher in {record.workdir} reads texts of {record.max_len} tokens, the student {student_max_len}: "
            "set config.model.text.max_len (and config.data.max_len) to the teacher's, or use config.teacher='data'.")


def _same_tokenizer(a, b) -> bool:
    if a == b:
        return True
    local = lambda t: isinstance(t, str) and "://" not in t and os.path.exists(t)  # noqa: E731
    return local(a) and local(b) and os.path.samefile(a, b)


@dataclasses.dataclass(frozen=True)
class InputMap:
    """The student's pixels -> the teacher's: a per-channel affine map, then a resize."""

    scale: tuple  # per channel: teacher = student * scale + shift
    shift: tuple
    image_size: tuple  # the teacher's (h, w)

    def __call__(self, images_bhwc):
        x = images_bhwc.astype(jnp.float32)
        if self.scale != (1.0,) * 3 or self.shift != (0.0,) * 3:
            x = x * np.asarray(self.scale, np.float32) + np.asarray(self.shift, np.float32)
        if tuple(x.shape[1:3]) != self.image_size:
            x = jax.image.resize(x, (x.shape[0], *self.image_size, x.shape[3]), "bilinear", antialias=True)
        return x


def _affine(norm) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) with normalised = pixel_0_255 * a + c, per channel (identity without a value op)."""
    if norm is None:
        return np.ones(3), np.zeros(3)
    if norm.name == "value_range":
        vmin, vmax = norm.params
        return np.full(3, (vmax - vmin) / 255.0), np.full(3, vmin)
    mean, std = (np.asarray(p, np.float64) for p in norm.params)
    return 1.0 / (std * 255.0), -mean / std


def input_map(record: TeacherRecord, student_pp: str) -> InputMap:
    """How the student's batch images become the teacher's input."""
    a_s, c_s = _affine(device_normalization(student_pp))
    a_t, c_t = _affine(device_normalization(record.pp) if record.pp else None)
    scale = a_t / a_s  # pixel = (x - c_s) / a_s; teacher = pixel * a_t + c_t
    shift = c_t - c_s * scale
    size = _image_size(record.model)
    return InputMap(tuple(float(v) for v in scale), tuple(float(v) for v in shift), size)


def _image_size(model: dict) -> tuple[int, int]:
    size = model["image"]["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenTeacher:
    """The static half of a frozen teacher (its parameters travel separately, as an argument)."""

    record: TeacherRecord
    step: int
    graphdef: Any
    rest: Any
    towers: tuple  # the towers the objective needs ("image", "text")
    inputs: InputMap
    param_count: int
    param_shardings: Any  # like the params: NamedShardings on the student's mesh


def newest_step(record: TeacherRecord) -> int:
    return max(int(p.name) for p in Workdir(record.workdir).checkpoints.iterdir() if p.name.isdigit())


def load_teacher(record: TeacherRecord, mesh, *, towers, student_pp: str, step: int | None = None,
                 ema: bool = False) -> tuple[FrozenTeacher, Any]:
    """(teacher, params): the teacher's parameters of checkpoint `step` (default: the newest), or
    of its EMA with `ema=True`, restored straight into their shardings on `mesh`."""
    step = newest_step(record) if step is None else int(step)
    abstract = models.abstract_model(record.model)
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    shapes = nnx.to_pure_dict(abstract_params)
    params = _restore_params(record, step, "ema" if ema else "params", shapes, shardings)
    teacher = FrozenTeacher(record, step, graphdef, rest, tuple(towers), input_map(record, student_pp),
                            models.num_params(abstract), shardings)
    return teacher, params


def _restore_params(record, step, field, shapes, shardings):
    """The `field` subtree of the checkpoint's state, and nothing else, with these shardings."""
    directory = Workdir(record.workdir).checkpoints / str(step) / "state"
    if not directory.exists():
        raise MissingFileError(f"config.teacher: no checkpoint of step {step} in {record.workdir}; its steps are "
                               f"{sorted(int(p.name) for p in directory.parent.parent.iterdir() if p.name.isdigit())}.")
    checkpointer = ocp.PyTreeCheckpointer()
    # The handler's metadata, not the checkpointer's: the latter looks for a step-level metadata
    # file inside the item folder and logs a warning that it is missing (it never is there).
    stored = ocp.PyTreeCheckpointHandler().metadata(directory)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if field not in stored:
        raise ConfigError(f"config.teacher.ema=True but the checkpoint of step {step} in {record.workdir} holds no "
                          "EMA of the parameters; drop ema or pick a run trained with config.ema.")
    wanted = {sharding.path_str(p): (x, s) for (p, x), s in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings))}
    flat_stored = {sharding.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored[field])[0]}
    for path, (x, _) in wanted.items():
        if path not in flat_stored or tuple(flat_stored[path].shape) != tuple(x.shape):
            found = tuple(flat_stored[path].shape) if path in flat_stored else "absent"
            raise ConfigError(f"The checkpoint of step {step} in {record.workdir} holds {field}/{path} with shape "
                              f"{found}, its recorded model {tuple(x.shape)}: the workdir's record and checkpoint "
                              "disagree; pick another teacher workdir.")
    target = {field: jax.tree_util.tree_map_with_path(
        lambda p, _m: jax.ShapeDtypeStruct(wanted[sharding.path_str(p)][0].shape,
                                           wanted[sharding.path_str(p)][0].dtype,
                                           sharding=wanted[sharding.path_str(p)][1]), stored[field])}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    by_path = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored[field])[0]}
    return jax.tree_util.tree_map_with_path(lambda p, _x: by_path[sharding.path_str(p)], shapes)


def embed(teacher: FrozenTeacher, params, images, texts) -> tuple[dict, jax.Array]:
    """({tower: [b, D_t]} of the towers the objective needs, the teacher's logit scale), with
    no gradient to anything: the teacher is a constant of the student's loss."""
    params = jax.lax.stop_gradient(params)
    model = nnx.merge(teacher.graphdef, params, teacher.rest)
    out = {}
    if "image" in teacher.towers:
        out["image"] = model.embed_images(teacher.inputs(images))
    if "text" in teacher.towers:
        out["text"] = model.embed_texts(texts)
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(model.scale())



def embed_scale(teacher: FrozenTeacher, params) -> jax.Array:
    """The teacher's logit scale (a constant of the student's loss)."""
    return jax.lax.stop_gradient(nnx.merge(teacher.graphdef, params, teacher.rest).scale())
