"""Contrastive objectives as data: elementwise fields, the per-row statistics they need, and a
finishing formula. The engine (engine.py) evaluates any weighted sum of them with the dense,
all-gather or ring scheme, and in the ring all terms share ONE traversal: every statistic of
every term is folded tile by tile in the same pass, and the backward pass is one more ring.

Notation: x_i, y_j the student image / text embeddings of the global batch (B rows), c_ij =
<x_i, y_j>, L_ij = scale * c_ij, positives on i == j. A teacher brings u_i (image) and v_j
(text) embeddings (frozen tower, imported model or EMA of the student; no gradient ever
reaches them) and `teacher_scale` T: L^t_ij = T * <u_i, v_j>. Every loss averages its
image->text (row) and text->image (column) directions, 1/2 each, over the B rows.

* softmax: CLIP, lse_j L_ij - L_ii.
* sigmoid: SigLIP, (1/B) sum_ij softplus(-s_ij (L_ij + bias)).
* dcl: decoupled contrastive (Yeh et al., ECCV 2022), the positive removed from the
  denominator: lse_{j != i} L_ij - L_ii.
* hard_negatives (alpha, beta): DiHT's HN-NCE (Radenovic et al., "Filtering, Distillation,
  and Hard Negatives for Vision-Language Pre-Training", CVPR 2023, arXiv:2301.02280, eq. 3,
  after Robinson et al. 2021):
      l_i = -log( e^{L_ii} / (alpha e^{L_ii} + sum_{j != i} w_ij e^{L_ij}) ),
      w_ij = (B - 1) e^{beta L_ij} / sum_{k != i} e^{beta L_ik},
  so log sum_{j != i} w_ij e^{L_ij} = log(B - 1) + lse_{j != i} (1 + beta) L_ij
  - lse_{j != i} beta L_ij: two log-sum-exps per row (and per column). The gradient is that
  of this formula as written (the weights are not detached). beta = 0, alpha = 1 is CLIP.
* cwcl (tower): CWCL (Srinivasa et al., NeurIPS 2023): soft targets from the frozen tower's
  intra-modal similarity, w_ij = (1 + <u_i, u_j>) / 2 (tower="image") or (1 + <v_i, v_j>) / 2
  ("text"), unit-norm teacher embeddings assumed (w in [0, 1]); l_i = lse_j L_ij -
  sum_j w_ij L_ij / sum_j w_ij: three statistics per row, the weights never a B x B tensor.
* distill: KL(teacher || student) of the row (and column) distributions softmax_j(L^t_ij)
  and softmax_j(L_ij) over the whole global batch (CLIP-KD, DiHT, MobileCLIP; with an EMA
  teacher, momentum distillation as in ALBEF): KL_i = E_{p^t_i}[L^t_ij - L_ij] - lse_j L^t_ij
  + lse_j L_ij. The teacher expectation is folded online (statistics.Expect).
* align_uniform (alpha, t, uniformity_weight): Wang & Isola (ICML 2020) as an objective:
  (1/B) sum_i ||x_i - y_i||^alpha + uniformity_weight * log( (1/B^2) sum_ij exp(-t ||x_i -
  y_j||^2) ). The uniformity is CROSS-modal over every (image i, text j) pair of the global
  batch, positives included, and uses ||x - y||^2 = 2 - 2 <x, y>, exact for the unit-norm
  embeddings the towers emit (off the sphere it is the gradient of this inner-product form).
  The paper's intra-modal uniformities would need the image block to travel too: not built.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp

from big_contrast.errors import ConfigError

F32 = jnp.float32


# ----------------------------------------------------------------------------- fields
# A field is an elementwise function of one tile, keyed by a hashable tuple (name, *params).
# `view` exposes the tile's positives and (lazily) its teacher similarities; `cos`, `scale`
# and `bias` are the differentiated inputs.


def _logits(view, cos, scale, bias):
    return scale * cos


def _negatives(view, cos, scale, bias, factor):
    return jnp.where(view.positive, -jnp.inf, factor * scale * cos)


def _siglip(view, cos, scale, bias):
    # softplus(m) with m = -s u, in the single-exp form that is exact up to float32 range.
    u = scale * cos + bias
    m = jnp.where(view.positive, -u, u)
    return jnp.maximum(m, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(m)))


def _teacher_logits(view, cos, scale, bias):
    return view.teacher_logits


def _teacher_minus_student(view, cos, scale, bias):
    return view.teacher_logits - scale * cos


def _cwcl_weight(view, cos, scale, bias, tower):
    return 0.5 * (1.0 + view.intra(tower))


def _cwcl_weighted_logits(view, cos, scale, bias, tower):
    return 0.5 * (1.0 + view.intra(tower)) * (scale * cos)


def _uniformity(view, cos, scale, bias, t):
    return 2.0 * t * (cos - 1.0)  # -t ||x - y||^2 on the unit sphere, <= 0 there


FIELDS = {
    "logits": _logits,
    "negatives": _negatives,
    "siglip": _siglip,
    "teacher_logits": _teacher_logits,
    "teacher_minus_student": _teacher_minus_student,
    "cwcl_weight": _cwcl_weight,
    "cwcl_weighted_logits": _cwcl_weighted_logits,
    "uniformity": _uniformity,
}


def eval_fields(keys, view, cos, scale, bias):
    """{key: F_tt} for every field key (name, *params)."""
    return {key: FIELDS[key[0]](view, cos, scale, bias, *key[1:]) for key in keys}


@dataclasses.dataclass(frozen=True)
class Stat:
    """A reduction of fields over a row (direction "row": over j) or a column ("col": over i)."""

    kind: str  # a key of statistics.KINDS
    fields: tuple  # field keys, one per field of the kind
    direction: str

    @property
    def key(self) -> str:
        return f"{self.direction}:{self.kind}:{self.fields}"


def both(kind, *fields):
    return Stat(kind, fields, "row"), Stat(kind, fields, "col")


@dataclasses.dataclass(frozen=True)
class Local:
    """What a device's own rows contribute beyond the statistics: its embeddings (float32)
    and the scalars, all differentiated."""

    x: object
    y: object
    scale: object
    bias: object
    batch: int  # the global batch B

    @property
    def positive_logits(self):
        return self.scale * jnp.sum(self.x * self.y, axis=1)


# ----------------------------------------------------------------------------- terms
# Each term: `stats()` the statistics it needs, `partials(stats, local)` its per-device sums
# (1-D, summed over devices by the engine) and `combine(totals, batch)` the term's value.


class _Term:
    teacher_towers: tuple = ()

    def combine(self, totals, batch):
        return totals[0] / batch


@dataclasses.dataclass(frozen=True)
class Softmax(_Term):
    def stats(self):
        return both("lse", ("logits",))

    def partials(self, stats, local):
        row, col = self.stats()
        return jnp.sum(0.5 * (stats[row.key] + stats[col.key]) - local.positive_logits)[None]


@dataclasses.dataclass(frozen=True)
class Sigmoid(_Term):
    def stats(self):
        return (Stat("sum", (("siglip",),), "row"),)

    def partials(self, stats, local):
        return jnp.sum(stats[self.stats()[0].key])[None]


@dataclasses.dataclass(frozen=True)
class DCL(_Term):
    def stats(self):
        return both("lse", ("negatives", 1.0))

    def partials(self, stats, local):
        row, col = self.stats()
        return jnp.sum(0.5 * (stats[row.key] + stats[col.key]) - local.positive_logits)[None]


@dataclasses.dataclass(frozen=True)
class HardNegatives(_Term):
    alpha: float = 1.0
    beta: float = 0.5

    def stats(self):
        return both("lse", ("negatives", 1.0 + self.beta)) + both("lse", ("negatives", self.beta))

    def partials(self, stats, local):
        hard_row, hard_col, base_row, base_col = self.stats()
        batch_log = math.log(local.batch - 1)
        pos = local.positive_logits
        total = 0.0
        for hard, base in ((hard_row, base_row), (hard_col, base_col)):
            negatives = batch_log + stats[hard.key] - stats[base.key]
            total += 0.5 * (jnp.logaddexp(math.log(self.alpha) + pos, negatives) - pos)
        return jnp.sum(total)[None]


@dataclasses.dataclass(frozen=True)
class CWCL(_Term):
    tower: str = "image"

    @property
    def teacher_towers(self):
        return (self.tower,)

    def stats(self):
        return (both("lse", ("logits",)) + both("sum", ("cwcl_weighted_logits", self.tower))
                + both("sum", ("cwcl_weight", self.tower)))

    def partials(self, stats, local):
        lse_r, lse_c, wl_r, wl_c, w_r, w_c = self.stats()
        total = 0.0
        for lse, weighted, weight in ((lse_r, wl_r, w_r), (lse_c, wl_c, w_c)):
            total += 0.5 * (stats[lse.key] - stats[weighted.key] / stats[weight.key])
        return jnp.sum(total)[None]


@dataclasses.dataclass(frozen=True)
class Distill(_Term):
    teacher_towers = ("image", "text")

    def stats(self):
        return both("lse", ("logits",)) + both("expect", ("teacher_logits",), ("teacher_minus_student",))

    def partials(self, stats, local):
        lse_r, lse_c, tea_r, tea_c = self.stats()
        total = 0.0
        for lse, teacher in ((lse_r, tea_r), (lse_c, tea_c)):
            teacher_lse, expected_gap = stats[teacher.key]
            total += 0.5 * (expected_gap - teacher_lse + stats[lse.key])
        return jnp.sum(total)[None]


@dataclasses.dataclass(frozen=True)
class AlignUniform(_Term):
    alpha: float = 2.0
    t: float = 2.0
    uniformity_weight: float = 1.0

    def stats(self):
        return (Stat("lse", (("uniformity", self.t),), "row"),)

    def partials(self, stats, local):
        gap_sq = jnp.sum(jnp.square(local.x - local.y), axis=1)
        # ||.||^alpha as (||.||^2)^(alpha/2); a zero gap has zero gradient for alpha >= 1.
        alignment = jnp.where(gap_sq > 0, jnp.maximum(gap_sq, 1e-30) ** (0.5 * self.alpha), 0.0)
        return jnp.stack([jnp.sum(alignment), jnp.sum(jnp.exp(stats[self.stats()[0].key]))])

    def combine(self, totals, batch):
        # log(total / B^2), with B^2 kept out of int32 (B = 65,536 squares to 2^32)
        return totals[0] / batch + self.uniformity_weight * (jnp.log(totals[1]) - 2.0 * math.log(batch))


TERMS = {"softmax": Softmax, "sigmoid": Sigmoid, "dcl": DCL, "hard_negatives": HardNegatives,
         "cwcl": CWCL, "distill": Distill, "align_uniform": AlignUniform}


# ----------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of terms: ((weight, term), ...)."""

    terms: tuple

    @property
    def names(self):
        return tuple(_name_of(term) for _, term in self.terms)

    @property
    def weights(self):
        return tuple(weight for weight, _ in self.terms)

    @property
    def stats(self):
        """Every statistic any term needs, each once (terms share them), in a fixed order."""
        seen = {}
        for _, term in self.terms:
            for stat in term.stats():
                seen.setdefault(stat.key, stat)
        return tuple(seen.values())

    @property
    def teacher_towers(self):
        return tuple(t for t in ("image", "text") if any(t in term.teacher_towers for _, term in self.terms))

    def __str__(self):
        return " + ".join(f"{w:g} * {_describe(term)}" for w, term in self.terms)


def _name_of(term):
    return next(name for name, cls in TERMS.items() if isinstance(term, cls))


def _describe(term):
    options = ", ".join(f"{f.name}={getattr(term, f.name)}" for f in dataclasses.fields(term))
    return _name_of(term) + (f"({options})" if options else "")


def _check(ok, sentence):
    if not ok:
        raise ConfigError(sentence)


def make_term(name, **options):
    """One term from its name and options, every option checked."""
    _check(name in TERMS, f"Unknown objective term {name!r}; choose one of {', '.join(TERMS)}.")
    cls = TERMS[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    _check(not unknown, f"Objective term {name!r} has no option {unknown[0] if unknown else ''!r}; "
                        f"its options are {sorted(allowed) or 'none'}.")
    for key, value in options.items():
        _check(key == "tower" or isinstance(value, (int, float)),
               f"Objective term {name!r} option {key} must be a number, got {value!r}.")
    term = cls(**{k: (v if k == "tower" else float(v)) for k, v in options.items()})
    _check_options(name, term)
    return term


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def _check_options(name, term):
    if name == "hard_negatives":
        _check(_finite(term.beta) and term.beta >= 0,
               f"hard_negatives beta must be a finite number >= 0 (0 weights all negatives equally), got {term.beta}.")
        _check(_finite(term.alpha) and 0 < term.alpha <= 1,
               f"hard_negatives alpha must be in (0, 1] (1 keeps the positive in the denominator), got {term.alpha}.")
    if name == "cwcl":
        _check(term.tower in ("image", "text"), f"cwcl tower must be 'image' or 'text', got {term.tower!r}.")
    if name == "align_uniform":
        _check(_finite(term.alpha) and term.alpha > 0, f"align_uniform alpha must be a finite number > 0, got {term.alpha}.")
        _check(_finite(term.t) and term.t > 0, f"align_uniform t must be a finite number > 0 (2 in the paper), got {term.t}.")
        _check(_finite(term.uniformity_weight) and term.uniformity_weight >= 0,
               f"align_uniform uniformity_weight must be a finite number >= 0, got {term.uniformity_weight}.")


_TERM_RE = re.compile(r"^\s*(?:(?P<weight>[0-9.eE\-]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*(?:\((?P<opts>[^()]*)\))?\s*$")


def _parse_string(text):
    pieces = re.split(r"\+(?![^()]*\))", text)
    out = []
    for piece in pieces:
        match = _TERM_RE.match(piece)
        _check(match is not None, f"Cannot read objective term {piece.strip()!r}; write e.g. "
                                  f"'sigmoid + 0.5 * distill' or '1.0 * hard_negatives(beta=0.5)'.")
        options = {}
        for item in filter(None, (s.strip() for s in (match["opts"] or "").split(","))):
            key, _, value = item.partition("=")
            options[key.strip()] = _number_or_word(value.strip())
        out.append((match["name"], float(match["weight"] or 1.0), options))
    return out


def _number_or_word(text):
    try:
        return float(text)
    except ValueError:
        return text.strip("'\"")


def parse_objective(spec) -> Objective:
    """An Objective from a string ('sigmoid + 0.5 * distill', options in parentheses), a list
    of (name, weight[, options]) or {"name", "weight", **options} items, or an Objective."""
    if isinstance(spec, Objective):
        return spec
    items = _parse_string(spec) if isinstance(spec, str) else [_item(entry) for entry in spec]
    _check(len(items) > 0, "The objective has no terms; give at least one, e.g. 'softmax'.")
    terms = []
    for name, weight, options in items:
        _check(_finite(weight) and weight > 0,
               f"The weight of objective term {name!r} must be a finite number > 0, got {weight}.")
        terms.append((float(weight), make_term(name, **options)))
    return Objective(tuple(terms))


def _item(entry):
    if isinstance(entry, dict):
        entry = dict(entry)
        return entry.pop("name"), entry.pop("weight", 1.0), entry
    name, weight, *rest = entry
    return name, weight, (rest[0] if rest else {})
