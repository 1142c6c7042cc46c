"""`big-contrast train | eval | plan | data ...`

    big-contrast train --config configs/siglip_b16.py:arg --config.batch_size=32768 --workdir DIR
    big-contrast eval  --config configs/demo.py --workdir DIR [--step N] [--json PATH]
    big-contrast plan  --config configs/siglip_so400m14.py [--device_memory_gb 95]
    big-contrast data convert ... | big-contrast data train-tokenizer ...

Configs are python files with `get_config(arg=None)` (ml_collections); `--config path:arg`
passes `arg`, and `--config.key=value` overrides any field, big_vision style.
"""

from __future__ import annotations

import json
import sys

USAGE = __doc__


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[1], argv[2:]
    if command == "data":
        return _data_command(rest)
    if command not in ("train", "eval", "plan"):
        print(f"Unknown command {command!r}; use train, eval, plan or data.\n{USAGE}", file=sys.stderr)
        return 2
    flags = _parse_flags(command, rest)
    _init_distributed(flags)
    if command == "train":
        return _train(flags)
    if command == "eval":
        return _eval(flags)
    return _plan(flags)


# ----------------------------------------------------------------------------- flags


def _parse_flags(command, rest):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", flag_values=fv,
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", flag_values=fv)
    flags.DEFINE_integer("step", None, "eval: checkpoint step to evaluate (default: latest).", flag_values=fv)
    flags.DEFINE_string("json", None, "eval: also write the results to this JSON file.", flag_values=fv)
    flags.DEFINE_float("device_memory_gb", 16.0, "plan: memory of one device, in GiB.", flag_values=fv)
    flags.DEFINE_boolean("plot", True, "train: write a loss/accuracy plot into the workdir at the end.",
                         flag_values=fv)
    flags.DEFINE_string("coordinator", None, "Multi-host: coordinator ADDR:PORT (process 0).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
    flags.DEFINE_integer("distributed_timeout", 120, "Multi-host: seconds to wait for the coordinator.",
                         flag_values=fv)
    fv([f"big-contrast {command}", *rest])
    if fv.config is None:
        raise SystemExit(f"big-contrast {command}: --config is required (e.g. --config configs/demo.py).")
    if command in ("train", "eval") and not fv.workdir:
        raise SystemExit(f"big-contrast {command}: --workdir is required.")
    # grain's worker processes read absl's global flags: mark them parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return fv


def _init_distributed(flags):
    """Multi-host: explicit coordinator flags, or a TPU pod / SLURM cluster JAX detects."""
    from big_contrast import distributed

    distributed.initialize(flags.coordinator, flags.num_processes, flags.process_id,
                           timeout_s=flags.distributed_timeout)


# ----------------------------------------------------------------------------- commands


def _train(flags) -> int:
    from big_contrast.train import report, train

    results = train(flags.config, flags.workdir)
    if results:
        print(report.format_results(results))
    if flags.plot:
        path = report.plot_run(flags.workdir)
        if path:
            print(f"plot: {path}")
    return 0


def _eval(flags) -> int:
    from big_contrast.train import report
    from big_contrast.train.standalone import evaluate_checkpoint

    results, step = evaluate_checkpoint(flags.config, flags.workdir, step=flags.step)
    print(f"step {step}")
    print(report.format_results(results))
    if flags.json:
        from big_contrast.evaluate import write_json

        write_json(results, flags.json, step=step)
    return 0


def _plan(flags) -> int:
    from big_contrast.train.plan import plan, format_plan

    print(format_plan(plan(flags.config, device_memory_bytes=int(flags.device_memory_gb * 2**30))))
    return 0


def _data_command(rest) -> int:
    import argparse

    from big_contrast.data.commands import add_data_subcommands, parse_data_args

    parser = argparse.ArgumentParser(prog="big-contrast")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_data_subcommands(subparsers)  # adds `data convert` and `data train-tokenizer`
    args = parse_data_args(parser, ["data", *rest])  # convert passes Beam's options through
    result = args.func(args)
    if isinstance(result, dict):
        print(json.dumps(result, indent=1, default=str))
    return 0 if not isinstance(result, int) else result


if __name__ == "__main__":
    sys.exit(main())
