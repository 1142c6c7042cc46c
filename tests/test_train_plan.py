"""`big-contrast plan`: the loss engine's tile and the parameter copy gathered under FSDP."""

from flax import nnx

from big_contrast import models
from big_contrast.train.plan import _gathered_param_bytes, _per_device_bytes, format_plan, plan

from test_train import tiny_config  # noqa: E402  (tests/ is on sys.path)


def test_gradient_caching_under_fsdp_counts_the_gathered_parameter_copy():
    config = tiny_config(mesh=(("data", 2), ("fsdp", 4), ("tensor", 1)), microbatch_size=2)
    p = plan(config, device_memory_bytes=2**30, num_devices=8)
    full_bytes = 4 * p["params"]["total"]  # float32 parameters, nothing sharded over 'tensor'
    assert p["param_bytes"] < full_bytes and p["gathered_param_bytes"] == full_bytes
    assert "gathered parameters + grads" in format_plan(p)


def test_nothing_is_gathered_without_fsdp_sharding():
    abstract = models.abstract_model(tiny_config().model)
    shape = {"data": 8, "fsdp": 1, "tensor": 1}
    replicated = _per_device_bytes(nnx.state(abstract, nnx.Param), shape)
    assert _gathered_param_bytes(abstract, shape, replicated) == 0
