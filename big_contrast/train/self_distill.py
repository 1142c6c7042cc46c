"""SigLIP 2's self-distillation (SILC) and masked prediction (TIPS) in the train step.

    config.model.distill_head = dict(hidden=2048, bottleneck=256, prototypes=65536)  # + mask token
    config.data.local_crops = dict(count=8, size=96)           # SILC's local views (data/multicrop.py)
    config.ema = dict(decay=0.999, start_step=...)             # the teacher (train/ema.py)
    config.self_distillation = dict(silc_weight=0.25, tips_weight=0.0625,
                                    silc_start_fraction=0.8, tips_start_fraction=0.8, ...)

The EMA of the parameters is the teacher; it sees the global view (the batch's `image`) without
patch dropout and under `stop_gradient`; one forward gives its pooled feature (SILC's target) and
its patch features (TIPS's targets), each through the EMA's distill head, turned into targets by
Sinkhorn-Knopp over the whole global batch (`losses/self_distillation.py`: rows are the B images
for SILC, the B x P patches for TIPS).

* SILC: the student's pooled feature of each local crop (the image tower run on the crop's smaller
  patch grid: its position table resampled to that grid as `models/posemb.py` resamples a table,
  bilinear with aligned corners, inside the step so the table gets gradients) predicts, through the
  student's head, the teacher's target of the global view.
* TIPS: a learned mask token replaces `mask_ratio` of the student's patch embeddings (before the
  position embeddings are added, as iBOT does); the student's final-layer patch features at the
  masked positions predict, through the same head, the teacher's patch targets of the unmasked view.

Both are per-example terms like the captioning loss (`train/siglip2.py`): a row contributes
(sum of its cross-entropies, their count), so gradient caching is exact for them. The teacher's
targets need the whole global batch (Sinkhorn), and carry no gradient, so the step computes them
once, before the student's passes (micro-batch by micro-batch under gradient caching), and hands
each row its targets as an input beside its crops.

When: each term is on from `round(start_fraction * total_steps)` (SigLIP 2: the last 20 %). The
step is compiled once per phase (`PhasedStep`: at most twice when both terms start together, as in
SigLIP 2); a phase's step holds only its terms, so before the start nothing of SILC / TIPS runs
(no teacher forward, no crops through the tower) and those steps are the steps of a run without
them. A traced on/off flag would compile once but pay the teacher and crop forwards in every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.losses.self_distillation import masked_patch_sums, patch_mask, self_distillation_sums, sinkhorn_targets
from big_contrast.models import posemb as posemb_lib
from big_contrast.models import transformer as tfm
from big_contrast.sharding import constrain

TERMS = ("silc", "tips")
TIPS_STREAM = 2  # folded into the patch-dropout keys (the decoder's stream is 1)


@dataclasses.dataclass(frozen=True)
class SelfDistillConfig:
    """`config.self_distillation`. Weights: SigLIP 2's 1 and 0.25, times its B-size factor 0.25."""

    silc_weight: float = 0.25
    tips_weight: float = 0.0625
    silc_start_fraction: float = 0.8
    tips_start_fraction: float = 0.8
    mask_ratio: float = 0.5
    teacher_temperature: float = 0.04
    student_temperature: float = 0.1
    sinkhorn_iterations: int = 3

    def __post_init__(self):
        for name in ("silc_weight", "tips_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"config.self_distillation.{name}={getattr(self, name)} must be >= 0 (0 turns it off).")
        for name in ("silc_start_fraction", "tips_start_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"config.self_distillation.{name}={getattr(self, name)} must be in [0, 1) "
                                  "(SigLIP 2 starts both terms at 0.8).")
        if "tips" in self.names and not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"config.self_distillation.mask_ratio={self.mask_ratio} must be in (0, 1) (SigLIP 2: 0.5).")
        for name in ("teacher_temperature", "student_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config.self_distillation.{name}={getattr(self, name)} must be positive.")
        if not isinstance(self.sinkhorn_iterations, int) or self.sinkhorn_iterations < 1:
            raise ConfigError(f"config.self_distillation.sinkhorn_iterations={self.sinkhorn_iterations!r} "
                              "must be a positive integer (DINOv2: 3).")

    @classmethod
    def from_config(cls, section) -> "SelfDistillConfig | None":
        if not section:
            return None
        section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(section) - known:
            raise ConfigError(f"config.self_distillation has unknown fields {sorted(set(section) - known)}; "
                              f"known: {sorted(known)}.")
        return cls(**section)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in TERMS if getattr(self, f"{name}_weight") > 0)

    def start_step(self, name: str, total_steps: int) -> int:
        """The first (0-based) step that trains term `name`."""
        return int(round(getattr(self, f"{name}_start_fraction") * total_steps))


# --- the image tower at any patch grid, with an optional mask token ---------------------------

def grid_position_embedding(vit, grid: tuple[int, int]) -> jax.Array:
    """The tower's position table [1, (1 +) gh*gw, D] for another patch grid: a learned table
    resampled bilinearly with aligned corners (posemb.py's rule, as constants times the table,
    so it stays differentiable); the fixed sin-cos table recomputed."""
    class_token = vit.pool == "tok"
    if vit.posemb_kind != "learn":
        return jnp.asarray(posemb_lib.sincos_posemb(grid, vit.width, class_token))
    table = vit.posemb.get_value()
    if tuple(grid) == tuple(vit.grid):
        return table
    rows = posemb_lib.aligned_linear_weights(vit.grid[0], grid[0]).astype(np.float32)
    cols = posemb_lib.aligned_linear_weights(vit.grid[1], grid[1]).astype(np.float32)
    patches = table[0, int(class_token):].reshape(*vit.grid, vit.width).astype(jnp.float32)
    resampled = jnp.einsum("ph,qw,hwd->pqd", rows, cols, patches).reshape(1, -1, vit.width).astype(table.dtype)
    return jnp.concatenate([table[:, :int(class_token)], resampled], axis=1)


def encode_views(vit, images_bhwc, mask_bn=None, mask_token=None) -> jax.Array:
    """`ViT.encode` for images of any size that the patch divides (no patch dropout); where
    `mask_bn` is True the patch embedding is replaced by `mask_token` before the position
    embedding is added (TIPS)."""
    if getattr(vit.config, "rope", "none") != "none":  # a rotary tower needs its positions per grid
        raise NotImplementedError("SILC / TIPS on a tower with rotary embeddings (rope) are not built; "
                                  "use rope='none'.")
    x = vit.embedding(images_bhwc.astype(vit.dtype))
    grid = x.shape[1:3]
    x_bnd = x.reshape(x.shape[0], -1, vit.width)
    if mask_bn is not None:
        x_bnd = jnp.where(mask_bn[..., None], mask_token.astype(x_bnd.dtype), x_bnd)
    table = grid_position_embedding(vit, grid).astype(x_bnd.dtype)
    x_bnd = x_bnd + table[:, int(vit.pool == "tok"):]
    if vit.pool == "tok":
        cls = vit.cls.get_value().astype(x_bnd.dtype) + table[:, :1]
        x_bnd = jnp.concatenate([jnp.broadcast_to(cls, (x_bnd.shape[0], 1, vit.width)), x_bnd], axis=1)
    x_bnd = constrain(x_bnd, tfm.ACT_BLD)
    if vit.ln_pre is not None:
        x_bnd = vit.ln_pre(x_bnd)
    return vit.encoder(x_bnd)


def local_features(vit, local_bvhwc) -> jax.Array:
    """Pooled features [B, V, D] of each image's V local crops (run as B*V images)."""
    b, v = local_bvhwc.shape[:2]
    pooled = vit.pool_features(encode_views(vit, local_bvhwc.reshape(b * v, *local_bvhwc.shape[2:])))
    return pooled.reshape(b, v, -1)


# --- the terms ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SelfDistillTerms:
    """SigLIP 2's terms of one phase: `base` (the captioning `siglip2.Terms`, or None) plus the
    SILC / TIPS terms in `active`. The step calls `teacher_scores` / `row_inputs` once per step and
    `embed` / `total` as for `siglip2.Terms`."""

    base: Any
    settings: SelfDistillConfig
    active: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (() if self.base is None else self.base.names) + self.active

    def teacher_scores(self, model, images) -> dict:
        """The teacher's head scores of its rows: 'silc' [b, K] pooled, 'tips' [b, P, K] per
        patch, from one forward without gradient (`model` holds the EMA's parameters)."""
        encoded = encode_views(model.image, images)
        scores = {}
        if "silc" in self.active:
            scores["silc"] = model.distill_head(model.image.pool_features(encoded))
        if "tips" in self.active:
            scores["tips"] = model.distill_head(model.image.patch_tokens(encoded))
        return jax.lax.stop_gradient(scores)

    def row_inputs(self, batch, scores) -> dict:
        """Per-row inputs of the student's terms: the Sinkhorn targets over the global batch and,
        for SILC, the local crops."""
        s = self.settings
        targets = {}
        for name, score in scores.items():
            rows_k = score.reshape(-1, score.shape[-1])
            targets[name] = sinkhorn_targets(rows_k, s.teacher_temperature, s.sinkhorn_iterations).reshape(score.shape)
        extras = dict(targets=targets)
        if "silc" in self.active:
            extras["local_images"] = batch["local_images"]
        return extras

    def batch_fields(self, batch) -> tuple:
        """The base terms' batch fields (LocCa's decoder targets), passed to `embed` first."""
        return () if self.base is None else self.base.batch_fields(batch)

    def embed(self, model, images, texts, keys, *fields):
        """(zimg, ztxt, {term: [b, 2] per-example (numerator, denominator)}). `fields`: the base's
        batch fields, then (when the step has a teacher) this step's `row_inputs` dict."""
        extras = fields[-1] if fields and isinstance(fields[-1], dict) else None
        fields = fields[:-1] if extras is not None else fields
        if self.base is not None:
            zimg, ztxt, sums = self.base.embed(model, images, texts, keys, *fields)
        else:
            zimg, ztxt, sums = model.embed_images(images, keys), model.embed_texts(texts), {}
        if extras is not None:
            sums = {**sums, **self.student_sums(model, images, extras, keys)}
        return zimg, ztxt, sums

    def student_sums(self, model, images, extras, keys) -> dict:
        s, out = self.settings, {}
        targets = extras["targets"]
        if "silc" in self.active:
            scores_bvk = model.distill_head(local_features(model.image, extras["local_images"]))
            total_b, count_b = jax.vmap(lambda sv, t: self_distillation_sums(sv[:, None], t[None], s.student_temperature))(
                scores_bvk, targets["silc"])
            out["silc"] = jnp.stack([total_b, count_b], axis=1)
        if "tips" in self.active:
            if keys is None:
                raise ValueError("TIPS draws its masks from the step's per-example keys; call the step with step=.")
            num_patches = targets["tips"].shape[1]
            mask_bp = patch_mask(jax.vmap(lambda key: jax.random.fold_in(key, TIPS_STREAM))(keys), num_patches,
                                 s.mask_ratio)
            encoded = encode_views(model.image, images, mask_bp, model.mask_token.get_value())
            scores_bpk = model.distill_head(model.image.patch_tokens(encoded))
            total_b, count_b = jax.vmap(lambda sp, t, m: masked_patch_sums(sp, t, m, s.student_temperature))(
                scores_bpk, targets["tips"], mask_bp)
            out["tips"] = jnp.stack([total_b, count_b], axis=1)
        return out

    def total(self, sums: dict, step):
        """(sum of weighted terms, {"loss/<term>": unweighted value}) over the global batch."""
        own = {name: sums[name] for name in self.active}
        rest = {name: value for name, value in sums.items() if name not in own}
        total, metrics = (jnp.zeros((), jnp.float32), {}) if self.base is None else self.base.total(rest, step)
        for name, s in own.items():
            value = s[:, 0].sum() / jnp.maximum(s[:, 1].sum(), 1.0)
            total = total + getattr(self.settings, f"{name}_weight") * value
            metrics[f"loss/{name}"] = value
        return total, metrics


# --- one compiled step per phase ---------------------------------------------------------------

def phases(settings: SelfDistillConfig, total_steps: int) -> list[tuple[int, tuple[str, ...]]]:
    """[(first step, active terms)] in order, the first from step 0 (possibly with none)."""
    starts = {name: settings.start_step(name, total_steps) for name in settings.names}
    boundaries = sorted({0, *starts.values()})
    return [(b, tuple(name for name in settings.names if starts[name] <= b)) for b in boundaries]


class PhasedStep:
    """The jitted step of each phase, picked by the state's step. `lower(state, batch)` (what the
    loop compiles) and calls pick the phase of `state.step`; the loop compiles again at each of
    `switch_steps` (`train/loop.py`)."""

    def __init__(self, steps: list[tuple[int, Any]]):
        self.steps = steps
        self.switch_steps = tuple(start for start, _ in steps[1:])

    def at(self, step: int):
        return [fn for start, fn in self.steps if start <= step][-1]

    def lower(self, state, batch):
        return self.at(int(state.step)).lower(state, batch)

    def __call__(self, state, batch):
        return self.at(int(state.step))(state, batch)


def phased_step(config, fixed, jit):
    """`jit(fixed)` without `config.self_distillation`; else a `PhasedStep` of `jit` applied to
    `fixed` with each phase's terms."""
    settings = SelfDistillConfig.from_config(config.get("self_distillation"))
    if settings is None:
        return jit(fixed)
    steps = []
    for start, active in phases(settings, config.total_steps):
        terms = SelfDistillTerms(fixed.terms, settings, active) if active else fixed.terms
        steps.append((start, jit(dataclasses.replace(fixed, terms=terms))))
    return steps[0][1] if len(steps) == 1 and not steps[0][0] else PhasedStep(steps)


def batch_fields(config, fields: tuple[str, ...]) -> tuple[str, ...]:
    """The batch fields the step reads: `fields`, plus 'local_images' when SILC trains."""
    settings = SelfDistillConfig.from_config(config.get("self_distillation"))
    return fields + (("local_images",) if settings is not None and "silc" in settings.names else ())


def _plan_terms(config):
    settings = SelfDistillConfig.from_config(config.get("self_distillation"))
    return None if settings is None or not settings.names else SelfDistillTerms(None, settings, settings.names)


def activation_probe(config, model, images):
    """A scalar through everything SILC / TIPS run per example (the teacher's forward and targets,
    the local crops' and the masked view's student passes, the heads), for `plan` to measure the
    activations of; 0 without them. The model stands in for its EMA."""
    terms = _plan_terms(config)
    if terms is None:
        return jnp.zeros((), jnp.float32)
    crops = dict(config.data.get("local_crops") or {})
    size = crops.get("size", 96)
    h, w = (size, size) if isinstance(size, int) else size
    b = images.shape[0]
    local = jnp.zeros((b, crops.get("count", 8), h, w, images.shape[-1]), images.dtype)
    extras = terms.row_inputs(dict(local_images=local), terms.teacher_scores(model, images))
    keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.key(0), row))(jnp.arange(b))
    return sum(s.sum() for s in terms.student_sums(model, images, extras, keys).values())


def target_bytes(config, per_device_batch: int) -> int:
    """Bytes of the teacher's scores and targets of a device's rows (float32)."""
    from big_contrast.models.registry import distill_head_config, image_config

    terms = _plan_terms(config)
    if terms is None:
        return 0
    grid = image_config(config.model).grid
    per_row = ("silc" in terms.active) + ("tips" in terms.active) * grid[0] * grid[1]
    return 2 * per_device_batch * per_row * distill_head_config(config.model).prototypes * 4


def validate(config) -> None:
    """One sentence for a SILC / TIPS config that cannot train."""
    from big_contrast.models.registry import distill_head_config, image_config

    settings = SelfDistillConfig.from_config(config.get("self_distillation"))
    if settings is None or not settings.names:
        return
    if distill_head_config(config.model) is None:
        raise ConfigError("config.self_distillation needs config.model.distill_head (the head and mask token), "
                          "e.g. dict(hidden=2048, bottleneck=256, prototypes=65536).")
    if not config.get("ema"):
        raise ConfigError("config.self_distillation's teacher is the EMA of the parameters; set config.ema, "
                          "e.g. dict(decay=0.999, start_step=<the terms' start step>).")
    first = min(settings.start_step(name, config.total_steps) for name in settings.names)
    ema_start = dict(config.ema).get("start_step", 0)
    if ema_start > first:
        raise ConfigError(f"config.ema.start_step={ema_start} is after SILC / TIPS start (step {first} of "
                          f"{config.total_steps}), so their teacher would be the student itself; set it to "
                          f"{first} (SigLIP 2 starts the teacher from the student there) or less.")
    if getattr(image_config(config.model), "rope", "none") != "none":
        raise ConfigError("config.self_distillation with a rotary image tower (config.model.image.rope) is not "
                          "built: the crops' and masked views' forward adds absolute position embeddings only.")
    from big_contrast.data.image_ops import is_naflex

    if is_naflex(config.data.pp_train):
        raise ConfigError("config.self_distillation with a NaFlex config.data.pp_train is not built: the teacher "
                          "and the masked view read fixed-size images; end pp_train in a resize instead of naflex(...).")
    if "silc" in settings.names:
        _check_local_crops(config, image_config(config.model).patch_size)
    if any(source.get("kind") == "stream" for source in config.data.sources.values()):
        raise ConfigError("config.self_distillation with streaming sources (kind='stream') is not built: their "
                          "pipeline makes no local crops; use a random-access source.")


def _check_local_crops(config, patch) -> None:
    crops = config.data.get("local_crops")
    if not crops:
        raise ConfigError("config.self_distillation.silc_weight > 0 needs config.data.local_crops, e.g. "
                          "dict(count=8, size=96); or set silc_weight=0.")
    size = dict(crops).get("size", 96)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ConfigError(f"config.data.local_crops.size={size} is not a multiple of the patch size {patch}; "
                          "the tower runs on the crops' patch grid.")
