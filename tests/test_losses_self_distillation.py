"""SILC / TIPS terms against NumPy definitions written here; the teacher gets no gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.losses.self_distillation import (
    masked_patch_loss, patch_mask, self_distillation_loss, sinkhorn_targets)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sinkhorn(scores, temperature, iterations):
    """Sinkhorn-Knopp in float64 with an explicit max-shifted exp per normalisation."""
    def log_normalise(x, axis):
        m = x.max(axis=axis, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)))

    n, k = scores.shape
    log_q = scores.astype(np.float64) / temperature
    log_q = log_q - (log_q.max() + np.log(np.exp(log_q - log_q.max()).sum()))
    for _ in range(iterations):
        log_q = log_normalise(log_q, 0) - np.log(k)
        log_q = log_normalise(log_q, 1) - np.log(n)
    return np.exp(log_q) * n


def test_sinkhorn_targets_are_distributions_with_balanced_prototypes():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 8))
    targets = np.asarray(sinkhorn_targets(jnp.asarray(scores, jnp.float32), 0.5, iterations=50))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(targets.sum(0), 64 / 8, rtol=1e-3)  # balanced after convergence
    np.testing.assert_allclose(targets, np_sinkhorn(scores, 0.5, 50), rtol=1e-4, atol=1e-7)
    # DINO's temperatures: peaked scores stay finite (no underflow) and match the definition.
    peaked = scores * 3
    three = np.asarray(sinkhorn_targets(jnp.asarray(peaked, jnp.float32), 0.04))
    assert np.isfinite(three).all()
    np.testing.assert_allclose(three, np_sinkhorn(peaked, 0.04, 3), rtol=1e-3, atol=1e-6)


def test_self_distillation_loss_equals_the_numpy_definition_and_spares_the_teacher():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(4, 6, 8)).astype(np.float32)  # 4 local crops of 6 images, 8 prototypes
    teacher = rng.normal(size=(6, 8)).astype(np.float32)
    targets = np_sinkhorn(teacher, 0.05, 3)
    expected = -(targets[None] * np_log_softmax(student / 0.1)).sum(-1).mean()

    def loss(student, teacher):
        return self_distillation_loss(student, sinkhorn_targets(teacher, 0.05), 0.1)

    value, (g_student, g_teacher) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert not np.asarray(g_teacher).any()  # the EMA teacher receives no gradient
    # The student's gradient: (softmax(s / t) - target) / (t · V · B), row by row.
    p = np.exp(np_log_softmax(student / 0.1))
    np.testing.assert_allclose(g_student, (p - targets[None]) / (0.1 * 4 * 6), rtol=1e-4, atol=1e-7)


def test_masked_patch_loss_averages_only_the_masked_patches():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(3, 5, 7)).astype(np.float32)
    teacher = rng.normal(size=(3 * 5, 7)).astype(np.float32)
    targets = np_sinkhorn(teacher, 0.05, 3).reshape(3, 5, 7)
    masked = rng.random((3, 5)) < 0.5
    ce = -(targets * np_log_softmax(student / 0.1)).sum(-1)
    expected = ce[masked].mean()
    jt = sinkhorn_targets(jnp.asarray(teacher), 0.05).reshape(3, 5, 7)
    value = masked_patch_loss(jnp.asarray(student), jt, jnp.asarray(masked), 0.1)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # An unmasked patch's student scores do not move the loss.
    moved = student.copy()
    moved[~masked] += 10 * rng.normal(size=moved[~masked].shape).astype(np.float32)
    np.testing.assert_allclose(masked_patch_loss(jnp.asarray(moved), jt, jnp.asarray(masked), 0.1), value, rtol=1e-6)
    assert float(masked_patch_loss(jnp.asarray(student), jt, jnp.zeros((3, 5), bool), 0.1)) == 0.0


def test_patch_masks_hold_the_ratio_exactly_and_depend_on_the_key_alone():
    keys = jax.random.split(jax.random.key(3), 16)
    masks = np.asarray(patch_mask(keys, 49, 0.5))
    np.testing.assert_array_equal(masks.sum(1), 24)  # round(24.5) = 24, banker's rounding
    np.testing.assert_array_equal(patch_mask(keys, 49, 0.5), masks)
    assert len({m.tobytes() for m in masks}) == 16  # each row its own draw


@pytest.mark.parametrize("call, words", [
    (lambda: sinkhorn_targets(jnp.ones((2, 2)), 0.0), "teacher temperature 0.0 must be positive"),
    (lambda: self_distillation_loss(jnp.ones((1, 2, 2)), jnp.ones((2, 2)), -1.0), "student temperature"),
    (lambda: patch_mask(jax.random.split(jax.random.key(0), 2), 4, 1.0), r"ratio 1.0 must be in \(0, 1\)"),
])
def test_bad_options_fail_with_a_sentence(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_the_distill_head_scores_are_cosines_with_the_prototypes():
    from flax import nnx

    from big_contrast.models.distill_head import DistillHead, DistillHeadConfig

    head = DistillHead(DistillHeadConfig(input_width=6, hidden=12, bottleneck=5, prototypes=9), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 6)), jnp.float32)
    scores = np.asarray(head(x))
    assert scores.shape == (2, 3, 9)
    assert np.abs(scores).max() <= 1.0 + 1e-5
    # Scaling a prototype does not change its scores (weight normalisation).
    head.prototypes.set_value(head.prototypes.get_value() * jnp.arange(1.0, 10.0)[None])
    np.testing.assert_allclose(head(x), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prototypes=0 must be a positive integer"):
        DistillHeadConfig(input_width=6, prototypes=0)
