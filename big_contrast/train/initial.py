"""A step-0 checkpoint from given parameters: how imported weights become a workdir.

`big-contrast import` (``interop/commands.py``) calls it through ``cli.py``, so the checkpoint
holds exactly the train state `big-contrast train` and `eval` restore (step, parameters,
fresh optimizer state of the config), and a later `train` resumes from it.
"""

from __future__ import annotations

import jax

from big_contrast import paths, sharding
from big_contrast.checkpoint import Checkpointer
from big_contrast.data import make_pipeline
from big_contrast.train.loop import build


def save_initial_checkpoint(config, workdir, params_tree) -> None:
    """Writes `params_tree` (nested like the model's parameters) as step 0 of `workdir`."""
    # On one device: the checkpoint restores onto any mesh, and orbax has no replicas to slice.
    mesh = sharding.make_mesh([(name, 1) for name, _ in config.mesh], devices=jax.devices()[:1])
    run = build(config, mesh=mesh, params=params_tree)
    state = run.state  # the given parameters, a fresh optimizer state (zero moments)
    data = make_pipeline(config.data, sharding.batch_sharding(run.mesh), train=True,
                         global_batch_size=config.batch_size)
    try:
        data_state = data.get_state()  # a fine-tuning run resumes at the first batch
    finally:
        data.close()
    meta = {"data": data_state, "step": 0, "process_count": jax.process_count(), "seed": config.seed,
            "data_seed": config.data.seed, "imported": True}
    ckpt = Checkpointer(paths.join(workdir, "checkpoints"), async_save=False)
    try:
        ckpt.save(0, state, meta, wait=True)
    finally:
        ckpt.close()
