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


def test_plan_counts_the_distill_head_the_crops_and_the_teacher_targets():
    import sys

    sys.path.insert(0, "configs")
    import demo

    base = demo.get_config("siglip2,noeval")
    config = demo.get_config("siglip2,self_distill,noeval")
    without, with_sd = (plan(c, device_memory_bytes=2**30, num_devices=8) for c in (base, config))
    head = with_sd["params"]["distill_head"]
    assert head == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 32 + 32) + 32 * 256 + 64  # + the mask token
    assert with_sd["params"]["total"] == without["params"]["total"] + head
    # 16 rows per device, (1 pooled + 16 patch) targets of 256 prototypes, scores + targets, float32
    assert with_sd["self_distill_target_bytes"] == 2 * 16 * 17 * 256 * 4
    # 4 local crops and a masked view through the tower, the heads, the teacher's forward
    assert with_sd["activation_bytes_per_example"] > 1.5 * without["activation_bytes_per_example"]
    text = format_plan(with_sd)
    assert "distill head" in text and "SILC / TIPS teacher targets" in text
