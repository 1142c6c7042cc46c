"""Objectives in the train step: `config.loss_objective` through `losses.combined_loss` in one
pass and with gradient caching, per-term metrics, the EMA as momentum teacher (no gradient
through it), and the config's one-sentence checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import losses, sharding
from big_contrast.errors import ConfigError
from big_contrast.train import train, validate
from big_contrast.train.metrics import read_metrics
from big_contrast.train.step import LossSpec, loss_and_grads
from conftest import random_model, rel_err
from test_train import tiny_config as train_config
from test_train_step import B, FAST, flat, tiny_config


def setup(objective, loss="sigmoid"):
    """(step(microbatches) -> jitted (params, batch, teacher_params) -> (loss, aux, grads)), params, batch."""
    config = tiny_config(loss)
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    graphdef, params, rest = nnx.split(random_model(config), nnx.Param, ...)
    params = nnx.to_pure_dict(sharding.shard_state(params, mesh))
    rng = np.random.default_rng(2)
    batch = dict(image=rng.normal(size=(B, 16, 16, 3)).astype(np.float32),
                 text=rng.integers(2, 50, size=(B, 8)).astype(np.int32))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    spec = LossSpec(loss, objective=None if objective is None else losses.parse_objective(objective))

    @functools.lru_cache(maxsize=None)
    def step(microbatches, with_teacher):
        """with_teacher: False, True (t: teacher params) or "embeddings" (t: {"image", "text"})."""
        fn = functools.partial(loss_and_grads, graphdef, rest=rest, loss=spec, mesh=mesh,
                               axis=sharding.batch_axes(mesh), microbatches=microbatches)
        teacher = lambda t: (dict(teacher_embeddings=t) if with_teacher == "embeddings"  # noqa: E731
                             else dict(teacher_params=t if with_teacher else None))
        return jax.jit(lambda p, b, t: fn(p, batch=b, step=jnp.int32(1), **teacher(t)), compiler_options=FAST)

    return step, params, batch


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_objective_sigmoid_equals_the_plain_sigmoid_step(microbatches):
    plain, params, batch = setup(None)
    combined, _, _ = setup("sigmoid")
    loss_p, aux_p, grads_p = plain(microbatches, False)(params, batch, None)
    loss_c, aux_c, grads_c = combined(microbatches, False)(params, batch, None)
    assert aux_p["terms"] == {} and set(aux_c["terms"]) == {"loss/sigmoid"}
    assert rel_err(loss_c, loss_p) <= 1e-5 and rel_err(aux_c["terms"]["loss/sigmoid"], loss_p) <= 1e-5
    assert rel_err(flat(grads_c), flat(grads_p)) <= 1e-5


def test_gradient_caching_with_a_momentum_teacher_equals_one_pass():
    step, params, batch = setup("sigmoid + 0.5 * distill")
    rng = np.random.default_rng(3)  # an EMA that lags the parameters: a perturbed copy
    teacher = jax.tree.map(lambda x: x + jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype), params)
    loss_1, aux_1, grads_1 = step(1, True)(params, batch, teacher)
    loss_k, aux_k, grads_k = step(2, True)(params, batch, teacher)
    assert float(aux_1["terms"]["loss/distill"]) > 1e-4  # the teacher differs: a real KL
    assert rel_err(loss_k, loss_1) <= 1e-5 and rel_err(flat(grads_k), flat(grads_1)) <= 1e-5
    # The teacher term's weight shows: the loss is sigmoid + 0.5 * distill.
    np.testing.assert_allclose(loss_1, aux_1["terms"]["loss/sigmoid"] + 0.5 * aux_1["terms"]["loss/distill"], rtol=1e-5)


def test_precomputed_teacher_embeddings_of_another_width_with_gradient_caching_equal_one_pass():
    step, params, batch = setup("softmax + 0.5 * distill + 0.5 * cwcl(tower=text)")
    rng = np.random.default_rng(4)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    teacher = {k: jax.device_put(unit(rng.normal(size=(B, 24))).astype(np.float32), batch["image"].sharding)
               for k in ("image", "text")}  # width 24, the student's 16: teacher-teacher similarities only
    loss_1, aux_1, grads_1 = step(1, "embeddings")(params, batch, teacher)
    loss_k, _, grads_k = step(2, "embeddings")(params, batch, teacher)
    assert set(aux_1["terms"]) == {"loss/softmax", "loss/distill", "loss/cwcl"}
    assert rel_err(loss_k, loss_1) <= 1e-5 and rel_err(flat(grads_k), flat(grads_1)) <= 1e-5


@pytest.mark.parametrize("microbatches", [1, 2])
def test_distillation_from_the_parameters_themselves_has_zero_gradient(microbatches):
    step, params, batch = setup("distill")
    value, _, grads = step(microbatches, True)(params, batch, params)
    assert abs(float(value)) <= 1e-5
    assert np.max(np.abs(flat(grads))) <= 1e-5


def test_training_with_a_momentum_teacher_logs_each_term(tmp_path):
    config = train_config(total_steps=3, checkpoint_every=100, ema=dict(decay=0.9),
                          loss_objective="sigmoid + 0.5 * distill", teacher="ema")
    train(config, tmp_path, progress=False)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        np.testing.assert_allclose(r["loss"], r["loss/sigmoid"] + 0.5 * r["loss/distill"], rtol=1e-4)
    # Step 1 (and 2: warm-up from lr 0 leaves the parameters) distils from the parameters themselves.
    assert rows[0]["loss/distill"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss/distill"] > 1e-7  # then the EMA lags them


@pytest.mark.parametrize("overrides, words", [
    (dict(loss_objective="sigmoid + 0.5 * distill"), "has teacher terms"),
    (dict(loss_objective="sigmoid + 0.5 * distill", teacher="ema"), "needs config.ema"),
    (dict(loss_objective="sigmoid", teacher="ema", ema=dict(decay=0.9)), "no teacher term"),
    (dict(loss_objective="sigmoid + 0.5 * distill", teacher="frozen"), "config.teacher='frozen' is unknown"),
    (dict(loss_objective="sigmoid + -1 * dcl"), "weight"),
    (dict(loss_objective="hard_negatives(beta=-1)"), "beta"),
])
def test_a_bad_objective_or_teacher_is_one_sentence(overrides, words):
    with pytest.raises(ConfigError, match=words):
        validate(train_config(**overrides), 8)
