"""`big-contrast eval`: evaluate a checkpoint of a workdir with the config's evaluators.

An evaluator whose dataset is not prepared (`MissingDataError`) is reported, with how to
prepare it, and the others still run: a benchmark suite on a machine that has only some of
the datasets gives the numbers it can.

Without `--config` the config recorded in `workdir/config.json` is used. Without `--step`
the newest readable checkpoint is evaluated (a damaged newer one is reported and skipped).
"""

from __future__ import annotations

import sys

from big_contrast import evaluate, paths
from big_contrast.checkpoint import Checkpointer, abstract_like
from big_contrast.data.errors import MissingDataError
from big_contrast.evaluate import benchmarks
from big_contrast.train import evals as train_evals
from big_contrast.train import record
from big_contrast.train.loop import build


def _build_evaluators(config) -> tuple[list, dict[str, str]]:
    """The evaluators of `config.evals` that can be built, and a message for each that cannot
    because its data is missing (its class names are read from the dataset)."""
    evaluators, missing = [], {}
    for name, entry in (config.evals or {}).items():
        try:
            evaluators.append(evaluate.build_evaluator(name, entry))
        except MissingDataError as e:
            missing[name] = benchmarks.missing_message(name, e)
    return evaluators, missing


def evaluate_checkpoint(config, workdir, *, step=None, mesh=None, missing=None) -> tuple[dict, int]:
    """Restores checkpoint `step` (default: the newest readable) of `workdir` and runs every `config.evals` entry.

    `missing`, a dict, receives {evaluator name: sentence} for the evaluators skipped because
    their data is not prepared; the mean top-1 over the classification benchmarks that ran is
    added as 'benchmarks/mean_top1'.
    """
    paths.check_readable(workdir)  # a typo or an unreachable bucket: one sentence, in seconds
    missing = {} if missing is None else missing
    evaluators, missing_at_build = _build_evaluators(config)
    missing.update(missing_at_build)
    if not evaluators and not missing:
        raise ValueError("config.evals is empty: name at least one evaluator to run.")
    if not evaluators:
        raise MissingDataError("no evaluator's data is prepared: " + " | ".join(missing.values()))
    record.check_resumable(config, workdir)
    run = build(config, mesh=mesh)
    ckpt = Checkpointer(paths.join(workdir, "checkpoints"), async_save=False)
    try:
        abstract = abstract_like(run.state, run.state_shardings)
        if step is None:
            restored = ckpt.restore_newest(abstract, warn=lambda text: print(text, file=sys.stderr, flush=True))
            if restored is None:
                raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first or pass another --workdir.")
            state, _, step, _ = restored
        else:
            state, _, step = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    results = {}
    for evaluator in evaluators:
        try:
            results.update(train_evals.run_one(evaluator, run, state, config))
        except MissingDataError as e:
            missing[evaluator.name] = benchmarks.missing_message(evaluator.name, e)
    return benchmarks.add_mean(results, [e.name for e in evaluators]), step
