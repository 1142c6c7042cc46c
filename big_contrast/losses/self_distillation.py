"""SigLIP 2's self-supervised terms: SILC's global-from-local self-distillation and TIPS's
masked patch prediction, both against an EMA teacher.

Both are DINO-style consistency losses (Caron et al. 2021): a projection head maps features to
``K`` prototype scores; the teacher's scores become a target distribution, the student's a
prediction, and the loss is their cross-entropy.

* SILC (Naeem et al. 2023): the teacher sees the global view, the student each of the local
  crops; the student's pooled (image-level) feature of every local crop predicts the teacher's
  distribution of the global view: `self_distillation_loss`.
* TIPS (Maninis et al. 2024), as SigLIP 2 uses it: the student sees the global view with a
  fraction of its patch embeddings replaced by a learned mask token and predicts, at the masked
  positions, the teacher's per-patch distribution of the unmasked view: `masked_patch_loss`.

Targets, a deviation from SILC's DINO recipe stated here and in the README: DINO centres the
teacher's scores with an exponential moving average of their batch mean, a running state. We
use DINOv2's Sinkhorn-Knopp normalisation of the teacher's scores over the global batch instead
(`sinkhorn_targets`): stateless, so a resumed run recomputes exactly the same targets from the
teacher alone, and it prevents collapse without a centre to checkpoint. The targets carry no
gradient (the teacher is an EMA, never trained).

All terms are means over examples (and masked patches), so gradient caching evaluates them per
micro-batch as sums and divides once by the global count (`*_sums` functions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_contrast.errors import ConfigError


def sinkhorn_targets(teacher_scores_nk: jax.Array, temperature: float, iterations: int = 3) -> jax.Array:
    """Teacher target distributions [N, K] from scores [N, K] (rows: examples or patches).

    Sinkhorn-Knopp (DINOv2): start from exp(scores / temperature) and alternately make every
    prototype's total mass equal (columns sum to N / K) and every row a distribution; the rows
    of the result sum to 1. No gradient flows into the teacher."""
    if temperature <= 0:
        raise ConfigError(f"the teacher temperature {temperature} must be positive (SILC / DINO use 0.04-0.07).")
    # In the log domain: exp(scores / temperature) underflows whole columns at DINO's temperatures.
    log_q_nk = jax.lax.stop_gradient(teacher_scores_nk.astype(jnp.float32)) / temperature
    n, k = log_q_nk.shape
    log_q_nk = log_q_nk - jax.nn.logsumexp(log_q_nk)
    for _ in range(iterations):
        log_q_nk = log_q_nk - jax.nn.logsumexp(log_q_nk, axis=0, keepdims=True) - jnp.log(k)
        log_q_nk = log_q_nk - jax.nn.logsumexp(log_q_nk, axis=1, keepdims=True) - jnp.log(n)
    return jnp.exp(log_q_nk) * n


def _cross_entropy_rows(targets_nk, student_scores_nk, temperature: float) -> jax.Array:
    """−Σ_k target · log softmax(student / temperature), per row, float32."""
    if temperature <= 0:
        raise ConfigError(f"the student temperature {temperature} must be positive (DINO uses 0.1).")
    logp_nk = jax.nn.log_softmax(student_scores_nk.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(targets_nk * logp_nk, axis=-1)


def self_distillation_sums(student_local_vbk, teacher_targets_bk, student_temperature: float):
    """(sum of per-(view, example) cross-entropies, their count) for SILC's global-from-local term.

    ``student_local_vbk``: the student's head scores of V local crops of each of B images;
    ``teacher_targets_bk``: the teacher's targets of each image's global view."""
    ce_vb = _cross_entropy_rows(teacher_targets_bk[None], student_local_vbk, student_temperature)
    return ce_vb.sum(), jnp.asarray(ce_vb.size, jnp.float32)


def self_distillation_loss(student_local_vbk, teacher_targets_bk, student_temperature: float) -> jax.Array:
    total, count = self_distillation_sums(student_local_vbk, teacher_targets_bk, student_temperature)
    return total / count


def masked_patch_sums(student_patches_bpk, teacher_targets_bpk, masked_bp, student_temperature: float):
    """(sum of cross-entropies over the masked patches, number of masked patches) for TIPS."""
    ce_bp = _cross_entropy_rows(teacher_targets_bpk, student_patches_bpk, student_temperature)
    masked = masked_bp.astype(jnp.float32)
    return jnp.sum(ce_bp * masked), jnp.sum(masked)


def masked_patch_loss(student_patches_bpk, teacher_targets_bpk, masked_bp, student_temperature: float):
    total, count = masked_patch_sums(student_patches_bpk, teacher_targets_bpk, masked_bp, student_temperature)
    return total / jnp.maximum(count, 1.0)


def patch_mask(keys_b: jax.Array, num_patches: int, ratio: float) -> jax.Array:
    """bool [B, P]: exactly ``round(ratio · P)`` masked patches per image, drawn from each row's key
    (a function of (step, example), like patch dropout, so resumes and both gradient-caching
    passes mask the same patches)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"the masked-prediction ratio {ratio} must be in (0, 1) (SigLIP 2 masks 0.5).")
    count = int(round(ratio * num_patches))

    def one(key):
        order = jax.random.permutation(key, num_patches)
        return jnp.zeros((num_patches,), bool).at[order[:count]].set(True)

    return jax.vmap(one)(keys_b)
