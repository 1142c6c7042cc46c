"""Meshes from config, logical->mesh rules, batch sharding (8 simulated CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from big_contrast import sharding


@pytest.mark.parametrize("config,shape", [
    ((("data", -1), ("fsdp", 1), ("tensor", 1)), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((("data", 2), ("fsdp", -1), ("tensor", 2)), {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 4}),
])
def test_make_mesh_resolves_sizes(config, shape):
    mesh = sharding.make_mesh(config)
    assert dict(mesh.shape) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("axis_types,expected", [("auto", AxisType.Auto),
                                                 ("explicit", AxisType.Explicit)])
def test_make_mesh_axis_types(axis_types, expected):
    mesh = sharding.make_mesh(sharding.DEFAULT_MESH, axis_types=axis_types)
    assert set(mesh.axis_types) == {expected}


def test_make_mesh_on_a_subset_of_devices():
    mesh = sharding.make_mesh((("data", -1), ("tensor", 2)), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "tensor": 2}


@pytest.mark.parametrize("config,message", [
    ((("data", 3), ("fsdp", 1), ("tensor", 1)), "has 3 devices but 8 are available"),
    ((("data", 3), ("fsdp", -1)), "multiple of 3 devices but 8 are available"),
    ((("data", -1), ("fsdp", -1)), "at most one -1"),
    ((("data", 8), ("model", 1)), "'model'"),
    ((("data", 4), ("data", 2)), "unique axis names"),
    ((("data", "8"),), "not a \\(name, size\\) pair"),
    ((("data", 0), ("fsdp", -1)), "sizes must be positive"),
])
def test_make_mesh_errors(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(config)


def test_make_mesh_rejects_unknown_axis_type():
    with pytest.raises(ValueError, match="'manual'"):
        sharding.make_mesh(sharding.DEFAULT_MESH, axis_types="manual")


def test_batch_axes_and_sharding():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    assert sharding.batch_axes(mesh) == ("data", "fsdp")
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh))
    # Each batch shard of 2 rows lives on the 2 devices that differ only in 'tensor'.
    assert x.sharding.shard_shape(x.shape) == (2, 2)
    assert sharding.num_batch_shards(mesh) == 4
    assert sharding.batch_axes(sharding.make_mesh((("data", 4), ("tensor", 2)))) == ("data",)
    with pytest.raises(ValueError, match="none of the batch axes"):
        sharding.batch_axes(sharding.make_mesh((("tensor", 8),)))


def test_check_batch_size():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="global batch 6 does not divide over the 4 batch shards"):
        sharding.check_batch_size(6, mesh)


# ----------------------------------------------------------------------------
# Logical rules
# ----------------------------------------------------------------------------

MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("axes,shape,expected", [
    (("embed", "mlp"), (32, 128), P("fsdp", "tensor")),
    (("embed", "heads", "kv"), (32, 4, 8), P("fsdp", "tensor", None)),
    (("layers", "embed", "mlp"), (2, 32, 128), P(None, "fsdp", "tensor")),
    (("vocab", "embed"), (50, 32), P("tensor", "fsdp")),
    (("vocab", "embed"), (51, 32), P(None, "fsdp")),  # 51 does not split in 2: replicated
    (("batch", "act_seq", "act_mlp"), (8, 5, 128), P(("data", "fsdp"), None, "tensor")),
    (("batch", "act_embed"), (2, 32), P("data", None)),  # fallback rule: 2 rows over 'data'
    (("batch",), (3,), P(None)),
    ((None, "patch", "unknown_name"), (4, 16, 16), P(None, None, None)),
])
def test_logical_to_spec_default_rules(axes, shape, expected):
    assert sharding.logical_to_spec(axes, shape, MESH_SHAPE) == expected


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("a", "tensor"), ("b", "tensor"), ("b", "fsdp"))
    assert sharding.logical_to_spec(("a", "b"), (4, 4), MESH_SHAPE, rules) == P("tensor", "fsdp")


def test_override_rules_win_and_rules_are_regexes():
    rules = sharding.override_rules([("embed", None), ("m.p", "fsdp")])
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 128), MESH_SHAPE, rules) == P(None, "fsdp")
    with sharding.use_rules(rules):
        assert sharding.current_rules() == rules
    assert sharding.current_rules() == sharding.DEFAULT_RULES


@pytest.mark.parametrize("rule", [("embed",), (3, "fsdp"), ("embed", 3), ("embed", ("fsdp", 1))])
def test_bad_rules_are_rejected(rule):
    with pytest.raises(ValueError, match="sharding rule"):
        sharding.check_rules([rule])


def test_state_shardings_and_path_overrides():
    layer = nnx.eval_shape(lambda: nnx.Linear(
        32, 128, kernel_metadata={"out_sharding": ("embed", "mlp"), "eager_sharding": False},
        rngs=nnx.Rngs(0)))
    state = nnx.state(layer)
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    specs = sharding.state_shardings(state, mesh)
    assert specs["kernel"].get_value().spec == P("fsdp", "tensor")
    assert specs["bias"].get_value().spec == P()  # no logical names: replicated
    overridden = sharding.state_shardings(state, mesh, path_overrides=[("ker.*", P(None, "data"))])
    assert overridden["kernel"].get_value().spec == P(None, "data")


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_constrain_and_init_sharded(axis_types):
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)), axis_types=axis_types)
    model = sharding.init_sharded(lambda: nnx.Linear(
        32, 128, kernel_metadata={"out_sharding": ("embed", "mlp"), "eager_sharding": False},
        kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0)), mesh)
    kernel = model.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(kernel, np.ones((32, 128)))

    def f(x):
        return sharding.constrain(x * 2, ("batch", "act_mlp"))

    x = jnp.ones((8, 128))
    assert sharding.constrain(x, ("batch", "act_mlp")) is x  # no mesh context: no-op
    with jax.set_mesh(mesh):
        y = jax.jit(f)(jax.device_put(x, sharding.batch_sharding(mesh)))
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(y, 2 * np.ones((8, 128)))


def test_path_str():
    assert sharding.path_str(("image", "encoder", "blocks", 0, "mlp")) == "image/encoder/blocks/0/mlp"
