"""`config.teacher = dict(workdir=...)`: a frozen teacher of another workdir inside the train step.

    config.loss_objective = "sigmoid + 1.0 * distill"
    config.teacher = dict(workdir="runs/large")          # + step=N (default: its newest), ema=True

The library half (`big_contrast/teacher.py`) reads the workdir and restores its parameters
sharded on the student's mesh. This module checks the config (one sentence each), loads the
teacher once per run (`load_for_run`), and binds its parameters to the jitted step as an
argument (`BoundStep`): the loop keeps calling `step(state, batch)`. The teacher is never
saved in the student's checkpoints; the student's config record names its workdir and step
(`recorded_config`), and a resume reloads that step from the teacher's workdir unless the
config pins another (`resolved_step`).
"""

from __future__ import annotations

import dataclasses
import re

import jax

from big_contrast import models
from big_contrast import teacher as frozen
from big_contrast.errors import ConfigError

KEYS = ("workdir", "step", "ema")
DATA_FIELDS = ("teacher_image", "teacher_text")  # config.teacher="data": batch fields from the data


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A frozen teacher of another workdir, as `config.teacher` gives it."""

    workdir: str
    step: int | None = None
    ema: bool = False  # the teacher run's EMA of the parameters instead of its raw parameters


def spec_of(config) -> TeacherSpec | None:
    """The config's frozen-teacher spec, or None (no teacher, "ema" or "data")."""
    value = config.get("teacher")
    if not isinstance(value, dict) and not hasattr(value, "keys"):
        return None
    value = dict(value)
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise ConfigError(f"config.teacher has unknown key(s) {unknown}; a frozen teacher is "
                          "dict(workdir=..., step=None, ema=False).")
    if not value.get("workdir"):
        raise ConfigError("config.teacher=dict(...) needs workdir=<a workdir written by `big-contrast train` or "
                          "`big-contrast import`>.")
    step = value.get("step")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ConfigError(f"config.teacher.step={step!r} must be a checkpoint step (a non-negative integer) or None.")
    return TeacherSpec(str(value["workdir"]), step, bool(value.get("ema", False)))


def validate(config, objective) -> None:
    """One sentence for a frozen teacher that cannot train with this config (read from its
    workdir's record, nothing loaded)."""
    spec = spec_of(config)
    if spec is None:
        return
    from big_contrast.data.image_ops import is_naflex

    if is_naflex(config.data.pp_train):
        raise ConfigError("a frozen teacher (config.teacher=dict(workdir=...)) with a NaFlex config.data.pp_train "
                          "is not built: the teacher reads fixed-size images; end pp_train in a resize instead.")
    record = frozen.read_record(spec.workdir)  # missing workdir / no checkpoint / no record: one sentence
    if "text" in objective.teacher_towers:
        frozen.check_reads_student_tokens(record, config.data, int(config.model.text.max_len))
    frozen.input_map(record, config.data.pp_train)  # the teacher's value op parses


def check_data_fields(config) -> None:
    """`teacher="data"` reads the batch fields `teacher_image` / `teacher_text`: the data must carry them."""
    missing = [k for k in DATA_FIELDS if k not in tuple(config.data.get("vector_keys", ()))]
    if missing:
        raise ConfigError(f"config.teacher='data' reads the batch fields {list(DATA_FIELDS)}; set "
                          f"config.data.vector_keys = {DATA_FIELDS} (columns written by "
                          "big_contrast.data.teacher_columns.write_teacher_columns).")


def check_momentum_teacher_towers(config, objective) -> None:
    """`teacher="ema"` whose every teacher tower is frozen in the student: the EMA of a frozen
    tower is the tower itself, averaged each step at the cost of a copy of the whole model."""
    if config.get("teacher") != "ema" or not config.get("ema"):
        return
    abstract = models.abstract_model(config.model)
    patterns = tuple(abstract.frozen_patterns) + tuple(config.freeze)
    from flax import nnx

    from big_contrast.sharding import path_str

    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    frozen_towers = [t for t in objective.teacher_towers
                     if all(any(re.fullmatch(x, p) for x in patterns) for p in paths if p.startswith(t + "/"))]
    if frozen_towers and len(frozen_towers) == len(objective.teacher_towers):
        raise ConfigError(
            f"config.teacher='ema' with config.ema on, but the teacher's {' and '.join(frozen_towers)} tower is frozen "
            "in the student: its EMA is the tower itself; use config.teacher=dict(workdir=<the run it came from>) "
            "(no EMA copy of the model) instead.")


def resolved_step(spec: TeacherSpec, recorded) -> int | None:
    """The step to load: the config's; else, on a resume, the one the student's record names
    for the same teacher workdir; else None (the teacher's newest)."""
    if spec.step is not None or recorded is None:
        return spec.step
    before = recorded.get("teacher")
    if hasattr(before, "keys") and frozen.read_record(spec.workdir).workdir == before.get("workdir"):
        return before.get("step")
    return None


def load_for_run(config, mesh, objective, recorded=None):
    """(FrozenTeacher, params) of the config's frozen teacher, or None; `recorded`: the student
    workdir's config record (a resume reloads the step it names)."""
    spec = spec_of(config)
    if spec is None:
        return None
    record = frozen.read_record(spec.workdir)
    return frozen.load_teacher(record, mesh, towers=objective.teacher_towers, student_pp=config.data.pp_train,
                               step=resolved_step(spec, recorded), ema=spec.ema)


def recorded_config(config, loaded):
    """The config to record in the student's workdir: the teacher's absolute workdir and the step
    that was loaded, so a resume (and a reader) know which teacher trained the run."""
    if loaded is None:
        return config
    teacher, _ = loaded
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.teacher = dict(workdir=teacher.record.workdir, step=teacher.step, ema=spec_of(config).ema)
    return out


class BoundStep:
    """A jitted `step(state, batch, teacher_params)` seen by the loop as `step(state, batch)`:
    the teacher's parameters are an argument of the compiled program, never a constant."""

    def __init__(self, jitted, teacher_params):
        self.jitted, self.teacher_params = jitted, teacher_params

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.teacher_params)

    def lower(self, state, batch):
        return _Lowered(self.jitted.lower(state, batch, self.teacher_params), self.teacher_params)


class _Lowered:
    def __init__(self, lowered, teacher_params):
        self.lowered, self.teacher_params = lowered, teacher_params

    def compile(self):
        return _Compiled(self.lowered.compile(), self.teacher_params)

    def __getattr__(self, name):
        return getattr(self.lowered, name)


class _Compiled:
    def __init__(self, compiled, teacher_params):
        self.compiled, self.teacher_params = compiled, teacher_params

    def __call__(self, state, batch):
        return self.compiled(state, batch, self.teacher_params)

    def __getattr__(self, name):  # cost_analysis, memory_analysis, as_text
        return getattr(self.compiled, name)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A frozen teacher with its parameters (traced arguments of the step), as the step's
    `loss_and_grads(frozen_teacher=...)` takes it."""

    teacher: object  # big_contrast.teacher.FrozenTeacher
    params: object

    def embeddings(self, images, texts, *, mesh, axis, microbatches):
        """({tower: [B, D_t]}, scale) of the global batch, micro-batch by micro-batch on each
        device's own rows under gradient caching (no activation kept: nothing is differentiated)."""
        embed = lambda p, images, texts: frozen.embed(self.teacher, p, images, texts)  # noqa: E731
        if microbatches <= 1 or mesh is None:
            return embed(self.params, images, texts)
        from big_contrast.train.step import _OwnRows, _from_microbatches, _microbatches, _param_specs

        t = self.teacher
        on_devices = _OwnRows(mesh, axis, _param_specs(t.graphdef, self.params, t.rest, mesh))

        def embed_all(params, images, texts):
            _, z_k = jax.lax.scan(lambda _, rows: (None, embed(params, *rows)[0]), None,
                                  (_microbatches(images, microbatches), _microbatches(texts, microbatches)))
            return jax.tree.map(_from_microbatches, z_k)

        out = on_devices(embed_all, self.params, (images, texts), reduce=False)
        return out, jax.lax.stop_gradient(frozen.embed_scale(t, self.params))


def batch_fields(config, fields):
    """The batch fields the step reads: `fields`, plus the teacher's embeddings from the data
    with `config.teacher = "data"` (columns `teacher_image` / `teacher_text`, data.vector_keys)."""
    return tuple(fields) + (DATA_FIELDS if config.get("teacher") == "data" else ())


def plan_entries(config, mesh_shape, microbatch: int, per_device_bytes) -> dict:
    """`plan`'s lines for a frozen teacher (empty without one): its parameters (count, and bytes
    per device under the same sharding rules as the student's, `per_device_bytes`) and the
    activations of its forward pass over one micro-batch (no backward: nothing is kept for a
    gradient), from XLA's memory analysis at micro-batches of 1 and 2 on one device."""
    spec = spec_of(config)
    if spec is None:
        return {}
    import jax.numpy as jnp
    from flax import nnx

    record = frozen.read_record(spec.workdir)
    abstract = models.abstract_model(record.model)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    h, w = frozen.input_map(record, config.data.pp_train).image_size
    channels, max_len = record.model["image"]["channels"], record.max_len

    def forward(p, images, tokens):
        model = nnx.merge(graphdef, p, rest)
        return model.embed_images(images), model.embed_texts(tokens)

    temps = []
    for micro in (1, 2):
        images = jax.ShapeDtypeStruct((micro, h, w, channels), jnp.float32)
        tokens = jax.ShapeDtypeStruct((micro, max_len), jnp.int32)
        temps.append(jax.jit(forward).lower(params, images, tokens).compile().memory_analysis().temp_size_in_bytes)
    per_example = max(temps[1] - temps[0], 1)
    return dict(teacher_params=models.num_params(abstract),
                teacher_param_bytes=per_device_bytes(nnx.state(abstract, nnx.Param), mesh_shape),
                teacher_activation_bytes=microbatch * per_example)
