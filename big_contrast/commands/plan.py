"""big-contrast plan: parameters and per-device memory of a config, without running it.

    big-contrast plan --config configs/siglip_so400m14.py [--device_memory_gb 95]

The config is validated as `train` validates it (a batch that does not divide over the
devices is refused in the same sentence); the memory model is `train/plan.py`.
"""

from __future__ import annotations

from absl import flags as absl_flags

from big_contrast.commands import base


def define_flags(fv, argv) -> None:
    base.define_config(fv, argv)
    absl_flags.DEFINE_float("device_memory_gb", 16.0, "Memory of one device, in GiB.", flag_values=fv)


def run(flags, args) -> int:
    from big_contrast.train.plan import format_plan, plan

    base.no_positional(args, "plan")
    if flags.device_memory_gb <= 0:
        raise base.UsageError(f"--device_memory_gb={flags.device_memory_gb} must be positive.")
    config = base.loaded_config(flags)
    base.start_devices()
    config = base.validated(config)
    memory = int(flags.device_memory_gb * 2**30)
    if config.get("stages"):  # issue 22: each stage's image size, text length and batch
        from big_contrast.train.staged import stage_plans

        print("\n\n".join(f"{line}\n{format_plan(p)}" for line, p in stage_plans(config, device_memory_bytes=memory)))
        return 0
    print(format_plan(plan(config, device_memory_bytes=memory)))
    return 0
