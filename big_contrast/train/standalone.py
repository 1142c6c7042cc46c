"""`big-contrast eval`: evaluate a checkpoint of a workdir with the config's evaluators.

Without `--config` the config recorded in `workdir/config.json` is used. Without `--step`
the newest readable checkpoint is evaluated (a damaged newer one is reported and skipped).
"""

from __future__ import annotations

import pathlib
import sys

from big_contrast.checkpoint import Checkpointer, abstract_like
from big_contrast.train import evals as train_evals
from big_contrast.train import record
from big_contrast.train.loop import build


def evaluate_checkpoint(config, workdir, *, step=None, mesh=None) -> tuple[dict, int]:
    """Restores checkpoint `step` (default: the newest readable) of `workdir` and runs every
    `config.evals` entry."""
    evaluators = train_evals.build(config)
    if not evaluators:
        raise ValueError("config.evals is empty: name at least one evaluator to run.")
    record.check_resumable(config, workdir)
    run = build(config, mesh=mesh)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
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
        results.update(train_evals.run_one(evaluator, run, state, config))
    return results, step
