"""`big-contrast train | eval | plan | data ...`

    big-contrast train --config configs/siglip_b16.py:arg --config.batch_size=32768 --workdir DIR
    big-contrast eval  --workdir DIR [--config configs/demo.py] [--step N] [--json PATH]
    big-contrast eval  --config C --workdir DIR --benchmarks imagenet2012,cifar100,coco --data_dir D
    big-contrast plan  --config configs/siglip_so400m14.py [--device_memory_gb 95]
    big-contrast data convert ... | big-contrast data train-tokenizer ...
    big-contrast import SOURCE --workdir W [--arch NAME]   (HF dir, open_clip file, big_vision .npz)
    big-contrast export --workdir W --to hf|npz OUT

Configs are python files with `get_config(arg=None)` (ml_collections); `--config path:arg`
passes `arg`, and `--config.key=value` overrides any field, big_vision style. `eval` without
`--config` uses the config recorded in the workdir.

Expected failures (a config, data, checkpoint or start-up problem) exit with status 2 and a
sentence on stderr saying what to change; `--debug` (or BIG_CONTRAST_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

USAGE = __doc__
DEBUG_ENV = "BIG_CONTRAST_DEBUG"


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    debug = "--debug" in argv[1:] or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = argv[:1] + [a for a in argv[1:] if a != "--debug"]
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[1], argv[2:]
    commands = ("train", "eval", "plan", "data", "import", "export")
    if command not in commands:
        print(f"Unknown command {command!r}; use {', '.join(commands)}.\n{USAGE}", file=sys.stderr)
        return 2
    if hasattr(signal, "SIGXFSZ"):  # a file-size quota then fails the write (EFBIG), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not debug:
        from big_contrast.errors import quiet_library_tracebacks

        quiet_library_tracebacks()
    try:
        if command == "data":
            return _data_command(rest)
        if command in ("import", "export"):
            return _interop_command(command, rest)
        from big_contrast import distributed

        distributed.set_xla_flag_defaults()  # before jax starts a backend
        flags = _parse_flags(command, rest)
        _init_distributed(flags)
        if command == "train":
            return _train(flags)
        if command == "eval":
            return _eval(flags)
        return _plan(flags)
    except _expected_errors() as error:
        return _report_failure(command, error, debug)


# ----------------------------------------------------------------------------- failures


def _expected_errors() -> tuple:
    """What a user can fix: our errors, the ValueError / FileNotFoundError that config and data
    checks raise with a sentence, and absl's flag errors."""
    from absl.flags import Error as FlagError

    from big_contrast.errors import USER_ERRORS

    return (*USER_ERRORS, FlagError)


def _report_failure(command, error, debug) -> int:
    if debug:
        traceback.print_exc()
    print(f"big-contrast {command}: {_one_line(str(error))}", file=sys.stderr, flush=True)
    return 2


def _one_line(message: str) -> str:
    """absl embeds the traceback of an error raised while loading a config in its message:
    keep what it says and the error's own last line."""
    head, sep, trace = message.partition("Traceback (most recent call last):")
    if not sep:
        return message.strip()
    cause = [line.strip() for line in trace.strip().splitlines() if line.strip()][-1]
    return f"{head.strip()} {cause}"


# ----------------------------------------------------------------------------- flags


def _parse_flags(command, rest):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    argv = [f"big-contrast {command}", *rest]
    # sys_argv: the overrides (--config.key=value) are found in these arguments, not sys.argv.
    config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", flag_values=fv,
                                    lock_config=False, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", flag_values=fv)
    flags.DEFINE_integer("step", None, "eval: checkpoint step to evaluate (default: latest).", flag_values=fv)
    flags.DEFINE_string("json", None, "eval: also write the results to this JSON file.", flag_values=fv)
    flags.DEFINE_list("benchmarks", None, "eval: named benchmarks to run instead of config.evals "
                      "(see big_contrast.evaluate.benchmarks).", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "eval: folder of the prepared benchmark datasets.", flag_values=fv)
    flags.DEFINE_float("device_memory_gb", 16.0, "plan: memory of one device, in GiB.", flag_values=fv)
    flags.DEFINE_boolean("plot", True, "train: write a loss/accuracy plot into the workdir at the end.",
                         flag_values=fv)
    flags.DEFINE_string("coordinator", None, "Multi-host: coordinator ADDR:PORT (process 0).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
    flags.DEFINE_integer("distributed_timeout", 120, "Multi-host: seconds to wait for the coordinator.",
                         flag_values=fv)
    from big_contrast.errors import UsageError

    fv(argv)
    if command in ("train", "eval") and not fv.workdir:
        raise UsageError("--workdir is required.")
    try:
        config = fv.config
        if config is not None:
            config.keys()  # ml_collections defers the error of a file that failed to load to here
    except OSError as error:
        raise UsageError(f"--config: {str(error).strip().splitlines()[-1].strip()}") from error
    if config is None and command != "eval":
        raise UsageError("--config is required (e.g. --config configs/demo.py).")
    # grain's worker processes read absl's global flags: mark them parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return fv


def _init_distributed(flags):
    """Multi-host: explicit coordinator flags, or a TPU pod / SLURM cluster JAX detects."""
    from big_contrast import distributed
    from big_contrast.errors import StartupError

    try:
        distributed.initialize(flags.coordinator, flags.num_processes, flags.process_id,
                               timeout_s=flags.distributed_timeout)
    except RuntimeError as error:  # distributed's sentences: the coordinator is unreachable, ...
        raise StartupError(str(error)) from error


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

    from big_contrast import paths

    if paths.is_remote(paths.validate(flags.workdir)):
        paths.check_readable(flags.workdir)  # before the recorded config is read: seconds, one sentence
    config, missing = _eval_config(flags), {}
    if flags.benchmarks:
        from big_contrast.evaluate import benchmarks

        config = config.copy_and_resolve_references()
        config.evals = benchmarks.evals(flags.benchmarks, flags.data_dir)
    results, step = evaluate_checkpoint(config, flags.workdir, step=flags.step, missing=missing)
    print(f"step {step}")
    print(report.format_results(results))
    for message in missing.values():
        print(message, file=sys.stderr)
    if flags.json:
        from big_contrast.evaluate import write_json

        write_json(results, flags.json, step=step, missing=missing)
    return 0


def _eval_config(flags):
    """--config, else the config recorded in the workdir."""
    from big_contrast.errors import UsageError
    from big_contrast.train import record

    if flags.config is not None:
        return flags.config
    recorded = record.read(flags.workdir)
    if recorded is None:
        raise UsageError(f"--config is required: {record.path(flags.workdir)} does not exist (no run recorded it).")
    return recorded


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


def _interop_command(command, rest) -> int:
    from big_contrast.interop.commands import main as interop_main
    from big_contrast.train.initial import save_initial_checkpoint

    return interop_main([command, *rest], save_checkpoint=save_initial_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
