"""What every command shares: its own absl flags, the config, devices, and the one error path.

A command is a module with

* a docstring whose first paragraph is its summary and usage (printed by `--help`),
* `define_flags(fv, argv)`: defines exactly the command's flags on a fresh `FlagValues`,
* `run(flags, args) -> int`: `args` are the positional arguments;
* optionally `PASSES_UNKNOWN_FLAGS = True` (`data convert` hands Beam's options on).

Flags are absl flags, spelt with underscores as big_vision's are (`--data_dir`,
`--config.key=value`). Every config goes through `load_config`: the file, its overrides and
`train.config.validate`, so `plan` refuses what `train` refuses, in the same sentence.

Failures a user can fix (`errors.USER_ERRORS`, absl's flag errors) print one line,
`big-contrast CMD: <sentence>`, on stderr and exit 2; `--debug` adds the traceback. Anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import math
import re
import sys
import traceback

from absl import flags as absl_flags

from big_contrast.errors import UsageError

HELP_FLAGS = ("-h", "--help", "--helpfull", "-help")


def execute(name: str, module, argv: list[str], *, debug: bool) -> int:
    """Parses `argv` (the arguments after the command's name) with the command's own flags and
    runs it; a user error becomes one sentence and exit status 2."""
    try:
        fv = absl_flags.FlagValues()
        module.define_flags(fv, [f"big-contrast {name}", *argv])
        if any(arg in HELP_FLAGS for arg in argv):
            print(help_text(name, module, fv))
            return 0
        args = parse(fv, [f"big-contrast {name}", *argv], known_only=getattr(module, "PASSES_UNKNOWN_FLAGS", False))
        return module.run(fv, args)
    except user_errors() as error:
        if debug:
            traceback.print_exc()
        print(f"big-contrast {name}: {_one_line(str(error))}", file=sys.stderr, flush=True)
        return 2


def user_errors() -> tuple:
    """What a user can fix: the package's user errors and absl's flag errors."""
    from big_contrast.errors import USER_ERRORS

    return (*USER_ERRORS, absl_flags.Error)


def _one_line(message: str) -> str:
    """absl embeds the traceback of an error raised while loading a config in its message:
    keep what it says and the error's own last line."""
    head, sep, trace = message.partition("Traceback (most recent call last):")
    if not sep:
        return " ".join(message.split()) if "\n" in message.strip() else message.strip()
    cause = [line.strip() for line in trace.strip().splitlines() if line.strip()][-1]
    return f"{head.strip()} {cause}"


# ----------------------------------------------------------------------------- parsing


def parse(fv, argv: list[str], *, known_only: bool = False) -> list[str]:
    """The positional arguments (and, with `known_only`, the flags nobody defined), after absl
    has parsed the command's flags. A misspelt `--config.key` override is one sentence with
    ml_collections' suggestion, not its traceback."""
    try:
        rest = fv(argv, known_only=known_only)
    except (AttributeError, KeyError) as error:
        if not _raised_by_config_override(error):
            raise
        raise UsageError(_override_sentence(error, argv)) from error
    except absl_flags.UnrecognizedFlagError as error:
        _refuse_dashed(fv, [f"--{error.flagname}"])
        raise
    if known_only:
        _refuse_dashed(fv, rest[1:])
    # grain's worker processes read absl's global flags: mark them parsed.
    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()
    return rest[1:]


def _refuse_dashed(fv, args) -> None:
    """`--data-dir` where the flag is `--data_dir`: say so (flags are spelt with underscores)."""
    for arg in args:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("--") and "-" in name and name.replace("-", "_") in fv:
            raise UsageError(f"--{name} is spelt --{name.replace('-', '_')} (flags use underscores).")


def _raised_by_config_override(error: BaseException) -> bool:
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    return any("ml_collections" in name and "config_flags" in name for name in files)


def _override_sentence(error: BaseException, argv: list[str]) -> str:
    """ml_collections says `'batch_sise'` and `Did you mean "batch_size" instead of "batch_sise"?`."""
    text = str(error)
    named = re.search(r'instead of \\?"([^"\\]+)', text) or re.search(r"'([^'\\]+)", text)
    field = named.group(1) if named else text.strip("'\"")
    suggestion = re.search(r'[Dd]id you mean \\?"([^"\\]+)', text)
    given = next((a for a in argv if a.startswith("--config.") and field in a.split("=")[0].split(".")),
                 f"--config.{field}")
    hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
    return f"{given}: the config has no field {field!r}{hint}; check the key against the config file."


def help_text(name: str, module, fv) -> str:
    """The command's docstring (summary and usage), then exactly its flags."""
    unique = {flag.name: flag for flags_ in fv.flags_by_module_dict().values() for flag in flags_}
    lines = [(module.__doc__ or "").strip(), "", "flags:"]
    for flag_name in sorted(n for n in unique if "." not in n):
        flag = unique[flag_name]
        spelt = f"--[no]{flag_name}" if isinstance(flag, absl_flags.BooleanFlag) else f"--{flag_name}"
        default = "" if flag.default is None else f" (default: {(flag.default_as_str or '').strip(chr(39))})"
        lines.append(f"  {spelt}: {flag.help}{default}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- shared flags


def define_config(fv, argv, help_text_: str = "Experiment config file (path[:arg]); "
                  "--config.key=value overrides any field.") -> None:
    from ml_collections import config_flags

    # sys_argv: the overrides (--config.key=value) are found in these arguments, not sys.argv.
    config_flags.DEFINE_config_file("config", None, help_text_, flag_values=fv, lock_config=False, sys_argv=argv)


def define_workdir(fv, help_text_: str = "Folder or gs:// URL of the run (checkpoints, metrics, plots).") -> None:
    absl_flags.DEFINE_string("workdir", None, help_text_, flag_values=fv)


def define_distributed(fv) -> None:
    absl_flags.DEFINE_string("coordinator", None, "Multi-host: coordinator ADDR:PORT (process 0).", flag_values=fv)
    absl_flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    absl_flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
    absl_flags.DEFINE_integer("distributed_timeout", 120, "Multi-host: seconds to wait for the coordinator.",
                              flag_values=fv)


def require(flags, *names) -> None:
    for flag_name in names:
        if flags[flag_name].value in (None, ""):
            raise UsageError(f"--{flag_name} is required.")


def no_positional(args, name: str) -> None:
    if args:
        raise UsageError(f"unexpected argument {args[0]!r}; `big-contrast {name}` takes flags only (see --help).")


# ----------------------------------------------------------------------------- config and devices


def start_devices(flags=None) -> None:
    """XLA flag defaults before jax starts a backend; then, with the multi-host flags, the
    processes of a run together (explicit flags, or a TPU pod / SLURM cluster JAX detects)."""
    from big_contrast import distributed
    from big_contrast.errors import StartupError

    distributed.set_xla_flag_defaults()
    if flags is None:
        return
    try:
        distributed.initialize(flags.coordinator, flags.num_processes, flags.process_id,
                               timeout_s=flags.distributed_timeout)
    except RuntimeError as error:  # distributed's sentences: the coordinator is unreachable, ...
        raise StartupError(str(error)) from error


def loaded_config(flags, *, required: bool = True):
    """`--config` with its overrides, or None when it is absent and not `required`."""
    try:
        config = flags.config
        if config is not None:
            config.keys()  # ml_collections defers the error of a file that failed to load to here
    except OSError as error:
        raise UsageError(f"--config: {str(error).strip().splitlines()[-1].strip()}") from error
    if config is None and required:
        raise UsageError("--config is required (e.g. --config configs/demo.py).")
    return config


def validated(config, *, num_devices: int | None = None):
    """`config`, checked by `train.config.validate` against its mesh on `num_devices` (default:
    the devices of this run): the one check every command applies."""
    import jax

    from big_contrast import sharding
    from big_contrast.train import config as train_config
    from big_contrast.train.plan import mesh_shape

    shape = mesh_shape(config, num_devices or jax.device_count())
    train_config.validate(config, math.prod(shape.get(axis, 1) for axis in sharding.BATCH_AXES))
    return config

