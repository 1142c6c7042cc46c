"""big-contrast eval: evaluate a checkpoint of a workdir with the config's evaluators.

    big-contrast eval --workdir DIR [--config configs/demo.py] [--step N] [--json PATH]
    big-contrast eval --workdir DIR --benchmarks imagenet2012,cifar100,coco --data_dir D

Without --config the config the workdir recorded is used; without --step the newest
readable checkpoint (a damaged newer one is reported and skipped). --benchmarks runs the
named benchmarks INSTEAD of config.evals (a config's own evals follow its training data;
to run both, add `big_contrast.evaluate.benchmarks.evals(names, data_dir)` to config.evals in
the config file). An evaluator whose dataset is not prepared is reported, with
how to prepare it, and the others still run.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import flags as absl_flags

from big_contrast.commands import base
from big_contrast.errors import ConfigError


def define_flags(fv, argv) -> None:
    base.define_config(fv, argv, "Config file (path[:arg]) with --config.key=value overrides; default: the "
                       "config the workdir recorded.")
    base.define_workdir(fv, "Folder or gs:// URL of the run to evaluate.")
    absl_flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest readable).",
                              flag_values=fv)
    absl_flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=fv)
    absl_flags.DEFINE_bool("ema", False, "Evaluate the EMA of the parameters (config.ema) instead of the raw "
                           "parameters.", flag_values=fv)
    absl_flags.DEFINE_list("benchmarks", None, "Named benchmarks to run instead of config.evals "
                           "(see big_contrast.evaluate.benchmarks).", flag_values=fv)
    absl_flags.DEFINE_string("data_dir", None, "With --benchmarks: folder of the prepared benchmark datasets.",
                             flag_values=fv)
    base.define_distributed(fv)


def run(flags, args) -> int:
    from big_contrast.commands import report
    from big_contrast.workdir import Workdir

    base.no_positional(args, "eval")
    base.require(flags, "workdir")
    if flags.data_dir and not flags.benchmarks:
        raise base.UsageError("--data_dir is the folder of the --benchmarks datasets; pass --benchmarks too "
                              "(a config's evals name their own data).")
    workdir = Workdir(flags.workdir)
    if workdir.remote:
        workdir.check_readable()  # before the recorded config is read: seconds, one sentence
    config = eval_config(flags, workdir)
    base.start_devices(flags)
    if flags.benchmarks:
        from big_contrast.evaluate import benchmarks

        config = config.copy_and_resolve_references()
        config.evals = benchmarks.evals(flags.benchmarks, flags.data_dir)
    missing = {}
    results, step = evaluate_checkpoint(base.validated(config), workdir, step=flags.step, missing=missing,
                                        **({"ema": True} if flags.ema else {}))
    print(f"step {step}" + (" (EMA of the parameters)" if flags.ema else ""))
    print(report.format_results(results))
    for message in missing.values():
        print(message, file=sys.stderr)
    if flags.json:
        from big_contrast.evaluate import write_json

        write_json(results, flags.json, step=step, missing=missing)
    return 0


def eval_config(flags, workdir):
    """--config, else the config recorded in the workdir."""
    config = base.loaded_config(flags, required=False)
    if config is not None:
        return config
    recorded = workdir.read_config()
    if recorded is None:
        raise base.UsageError(f"--config is required: {workdir.config_record} does not exist (no run recorded it).")
    return recorded


def _build_evaluators(config) -> tuple[list, dict[str, str]]:
    """The evaluators of `config.evals` that can be built, and a message for each that cannot
    because its data is missing (its class names are read from the dataset)."""
    from big_contrast import evaluate
    from big_contrast.data.errors import MissingDataError
    from big_contrast.evaluate import benchmarks

    evaluators, missing = [], {}
    for name, entry in (config.evals or {}).items():
        try:
            evaluators.append(evaluate.build_evaluator(name, entry))
        except MissingDataError as e:
            missing[name] = benchmarks.missing_message(name, e)
    return evaluators, missing


def evaluate_checkpoint(config, workdir, *, step=None, mesh=None, missing=None, ema=False) -> tuple[dict, int]:
    """Restores checkpoint `step` (default: the newest readable) of `workdir` and runs every `config.evals` entry.

    `missing`, a dict, receives {evaluator name: sentence} for the evaluators skipped because
    their data is not prepared; the mean top-1 over the classification benchmarks that ran is
    added as 'benchmarks/mean_top1'. `ema`: evaluate the checkpoint's EMA of the parameters.
    """
    from big_contrast.data.errors import MissingDataError
    from big_contrast.evaluate import benchmarks
    from big_contrast.train import evals as train_evals
    from big_contrast.workdir import Workdir

    workdir = Workdir.of(workdir)
    workdir.check_readable()  # a typo or an unreachable bucket: one sentence, in seconds
    missing = {} if missing is None else missing
    evaluators, missing_at_build = _build_evaluators(config)
    missing.update(missing_at_build)
    if not evaluators and not missing:
        raise ConfigError("config.evals is empty: name at least one evaluator to run.")
    if not evaluators:
        raise MissingDataError("no evaluator's data is prepared: " + " | ".join(missing.values()))
    workdir.check_resumable(config)
    if ema and not config.get("ema"):
        raise ConfigError("--ema evaluates the EMA of the parameters, but this run's config.ema is off: "
                          "drop --ema, or pass the --config it was trained with.")
    state, step, run = _restore(config, workdir, step, mesh)
    if ema:  # the evaluators read state.params
        state = dataclasses.replace(state, params=state.ema)
    results = {}
    for evaluator in evaluators:
        try:
            results.update(train_evals.run_one(evaluator, run, state, config))
        except MissingDataError as e:
            missing[evaluator.name] = benchmarks.missing_message(evaluator.name, e)
    return benchmarks.add_mean(results, [e.name for e in evaluators]), step


def _restore(config, workdir, step, mesh):
    """(state, step, run) of checkpoint `step`, or the newest readable one."""
    from big_contrast.checkpoint import Checkpointer
    from big_contrast.errors import CheckpointError
    from big_contrast.train import build, resample

    if not workdir.has_checkpoints():  # checked first: opening the folder would create it
        raise CheckpointError(f"No checkpoint in {workdir.checkpoints}; train first or pass another --workdir.")
    run = build(config, mesh=mesh)
    ckpt = Checkpointer(workdir.checkpoints, async_save=False)
    try:
        # At another image size / text length than the checkpoint's: position tables resampled.
        state, _, step, _ = resample.restore(ckpt, run.state, run.state_shardings,
                                             resample.saved_model_config(workdir), config.model, step=step,
                                             warn=lambda text: print(text, file=sys.stderr, flush=True))
    finally:
        ckpt.close()
    return state, step, run
