"""The training objective of a config: the plain loss, or a weighted sum of contrastive terms
with an optional teacher, checked before anything compiles.

    config.loss_objective = "sigmoid + 0.5 * distill"   # None: config.model.loss alone
    config.ema = dict(decay=0.999)                        # the momentum teacher's weights
    config.teacher = "ema"                                # teacher of distill / cwcl terms

`loss_objective=None` keeps the step's original softmax / sigmoid path (the same figures as
before this option existed). With an objective the step calls `losses.combined_loss` and logs
each term's unweighted value as `loss/<term>`. The teacher terms (distill, cwcl) compare the
teacher's similarities with each other (teacher image vs teacher text, or teacher vs teacher
of one modality), never a teacher embedding with a student one, so a teacher's width need not
be the student's. The momentum teacher is the EMA of the parameters (`config.ema`), embedded
in the step without gradient and without patch dropout; its logit scale is the EMA's scale.
`config.teacher = dict(workdir=...)`: a frozen teacher of another workdir, run inside the step
(train/teacher.py); `config.teacher = "data"`: teacher embeddings stored beside the data (the
batch fields `teacher_image` / `teacher_text`, `data.vector_keys`).
"""

from __future__ import annotations

from big_contrast import losses
from big_contrast.errors import ConfigError
from big_contrast.train import teacher as train_teacher

TEACHERS = ("ema", "data")  # or dict(workdir=...): a frozen teacher (train/teacher.py)


def objective_of(config):
    """The config's `losses.Objective`, or None for the plain `config.model.loss`."""
    spec = config.get("loss_objective")
    return None if spec in (None, "") else losses.parse_objective(spec)


def teacher_of(config) -> str | None:
    """The teacher kind: None, "ema", "data" or "frozen" (config.teacher=dict(workdir=...))."""
    value = config.get("teacher") or None
    return "frozen" if value is not None and not isinstance(value, str) else value


def validate(config) -> None:
    """One sentence for an objective, teacher or EMA combination that cannot train."""
    objective = objective_of(config)  # weights, temperatures, beta out of range: parse_objective's sentences
    teacher = teacher_of(config)
    raw = config.get("teacher") or None
    if raw is not None and (isinstance(raw, str) and raw not in TEACHERS or not isinstance(raw, str)
                            and not hasattr(raw, "keys")):
        raise ConfigError(f"config.teacher={raw!r} is unknown; use None, 'ema' (the EMA of the parameters, "
                          "which needs config.ema), 'data' (teacher_image / teacher_text batch fields) or "
                          "dict(workdir=...) (a frozen teacher).")
    needs_teacher = objective is not None and bool(objective.teacher_towers)
    if needs_teacher and teacher is None:
        raise ConfigError(f"config.loss_objective={config.loss_objective!r} has teacher terms; set "
                          "config.teacher='ema' (with config.ema), 'data' or dict(workdir=...), or drop them.")
    if teacher is not None and not needs_teacher:
        raise ConfigError(f"config.teacher={config.teacher!r} is set but config.loss_objective has no teacher term "
                          "(distill, cwcl); add one or set config.teacher=None.")
    if teacher == "ema" and not config.get("ema"):
        raise ConfigError("config.teacher='ema' needs config.ema, e.g. config.ema = dict(decay=0.999).")
    if teacher == "data":
        train_teacher.check_data_fields(config)
    if teacher == "frozen":
        train_teacher.validate(config, objective)  # workdir, checkpoint, record, tokens: one sentence each
    if needs_teacher:
        train_teacher.check_momentum_teacher_towers(config, objective)
