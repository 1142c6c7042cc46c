"""big-contrast train: train a config in a workdir (resuming from its newest checkpoint).

    big-contrast train --config configs/siglip_b16.py:arg --config.batch_size=32768 --workdir DIR

A second `train` on a workdir that a live run uses is refused; a killed run's lock is not.
Multi-host: one process per host, with --coordinator/--num_processes/--process_id, or none
on a TPU pod or under SLURM.
"""

from __future__ import annotations

from absl import flags as absl_flags

from big_contrast.commands import base


def define_flags(fv, argv) -> None:
    base.define_config(fv, argv)
    base.define_workdir(fv)
    absl_flags.DEFINE_boolean("plot", True, "Write a loss / accuracy plot into the workdir at the end.", flag_values=fv)
    base.define_distributed(fv)


def run(flags, args) -> int:
    from big_contrast.commands import report
    from big_contrast.train import train
    from big_contrast.workdir import Workdir

    base.no_positional(args, "train")
    base.require(flags, "workdir")
    config = base.loaded_config(flags)
    workdir = Workdir(flags.workdir)  # a malformed URL: refused before the devices start
    base.start_devices(flags)
    results = train(base.validated(config), workdir)
    if results:
        print(report.format_results(results))
    if flags.plot:
        path = report.plot_run(workdir)
        if path:
            print(f"plot: {path}")
    return 0
