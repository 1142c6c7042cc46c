"""The EMA of the parameters: the update rule against a loop written here, decay 0, the start
step and the update period, shardings kept, and the config's sentences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_contrast.train.ema import EmaConfig, ema_init, ema_update


def params_at(step):
    rng = np.random.default_rng(step)
    return {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


def run(config, steps):
    ema = ema_init(params_at(0))
    update = jax.jit(lambda e, p, s: ema_update(e, p, s, config))
    for step in range(1, steps + 1):
        ema = update(ema, params_at(step), jnp.asarray(step))
    return ema


def test_the_average_follows_its_definition_with_start_and_period():
    config = EmaConfig(decay=0.9, start_step=3, every=2)
    expected = {k: np.asarray(v, np.float64) for k, v in params_at(0).items()}
    for step in range(1, 10):
        p = {k: np.asarray(v, np.float64) for k, v in params_at(step).items()}
        if step < 3:
            expected = p
        elif step % 2 == 0:
            expected = {k: 0.9 * expected[k] + 0.1 * p[k] for k in p}
    got = run(config, 9)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_decay_zero_equals_the_parameters():
    got = run(EmaConfig(decay=0.0), 5)
    for k, v in params_at(5).items():
        np.testing.assert_array_equal(got[k], v)


def test_the_average_keeps_the_parameters_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharded = NamedSharding(mesh, P("fsdp", None))
    params = {"w": jax.device_put(params_at(1)["w"], sharded)}
    ema = ema_init(params)
    out = jax.jit(lambda e, p: ema_update(e, p, jnp.asarray(1), EmaConfig()))(ema, params)
    assert out["w"].sharding.is_equivalent_to(sharded, 2)


@pytest.mark.parametrize("fields, words", [
    (dict(decay=1.0), r"decay=1.0 must be in \[0, 1\)"),
    (dict(every=0), "every=0 must be a positive integer"),
    (dict(start_step=-1), "start_step=-1 must be a non-negative integer"),
    (dict(decy=0.9), r"unknown field\(s\) \['decy'\]"),
])
def test_a_bad_ema_config_fails_with_a_sentence(fields, words):
    with pytest.raises(ValueError, match=words):
        EmaConfig.from_config(fields)


def test_no_ema_config_means_no_average():
    assert EmaConfig.from_config(None) is None and EmaConfig.from_config({}) is None
