"""`big-contrast eval`: evaluate a checkpoint of a workdir with the config's evaluators."""

from __future__ import annotations

import pathlib

from big_contrast.checkpoint import Checkpointer, abstract_like
from big_contrast.train import evals as train_evals
from big_contrast.train.loop import build


def evaluate_checkpoint(config, workdir, *, step=None, mesh=None) -> tuple[dict, int]:
    """Restores checkpoint `step` (default: latest) of `workdir` and runs every `config.evals` entry."""
    evaluators = train_evals.build(config)
    if not evaluators:
        raise ValueError("config.evals is empty: name at least one evaluator to run.")
    run = build(config, mesh=mesh)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    try:
        state, _, step = ckpt.restore(abstract_like(run.state, run.state_shardings), step)
    finally:
        ckpt.close()
    results = {}
    for evaluator in evaluators:
        results.update(train_evals.run_one(evaluator, run, state, config))
    return results, step
