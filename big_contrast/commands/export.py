"""big-contrast export: a workdir's model in another layout.

    big-contrast export --workdir W --to hf OUT     # transformers SiglipModel / Siglip2Model / CLIPModel
    big-contrast export --workdir W --to npz OUT    # big_vision SigLIP .npz

Reads the latest (or --step) checkpoint of W. A workdir that was not imported (trained from
scratch) needs --config for its model options. A SigLIP 2 NaFlex import (its preprocessing
``resize='naflex'``) exports as a ``Siglip2Model``.
"""

from __future__ import annotations

import json
import os

from absl import flags as absl_flags

from big_contrast.commands import base
from big_contrast.errors import ConfigError


def define_flags(fv, argv) -> None:
    del argv
    base.define_workdir(fv, "Folder or gs:// URL of the workdir to export.")
    absl_flags.DEFINE_enum("to", None, ["hf", "npz"], "Layout to write: hf (transformers) or npz (big_vision).",
                           flag_values=fv)
    absl_flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).", flag_values=fv)
    absl_flags.DEFINE_string("config", None, "Config file of a workdir that was not imported (its model options).",
                             flag_values=fv)


def run(flags, args) -> int:
    from big_contrast import paths
    from big_contrast.workdir import Workdir

    base.require(flags, "workdir", "to")
    if len(args) != 1:
        raise base.UsageError("give one OUT: the folder (--to hf) or .npz file (--to npz) to write.")
    out = args[0]
    workdir = Workdir(flags.workdir)
    if workdir.remote:
        workdir.check_readable()
    target = os.fspath(paths.parse(out).parent) if flags.to == "npz" else out
    if paths.is_remote(paths.validate(target)):
        paths.check_writable(target)
    return run_export(workdir, flags.to, out, step=flags.step, config=flags.config)


def _record(workdir, step, config):
    from big_contrast import models
    from big_contrast.checkpoint import Checkpointer
    from big_contrast.errors import CheckpointError
    from big_contrast.interop import imported, preprocess
    from big_contrast.workdir import Workdir

    workdir = Workdir.of(workdir)
    if imported.is_workdir(workdir):
        return imported.read_workdir(workdir, step)
    if config is None:
        raise ConfigError(f"{workdir} was not written by `big-contrast import`; pass --config with "
                         "the config file it was trained with.")
    if not workdir.has_checkpoints():  # before a Checkpointer, which would create the folder
        raise CheckpointError(f"No checkpoint in {workdir.checkpoints}; train first or pass another --workdir.")
    model_config = imported.load_config(config).model.to_dict()
    ckpt = Checkpointer(workdir.checkpoints, async_save=False)
    try:
        state, _ = ckpt.restore_arrays(step)
    finally:
        ckpt.close()
    family = models.family(model_config["loss"])
    pp = preprocess.SIGLIP if family == "siglip" else preprocess.CLIP
    return imported.Imported(family, str(workdir), model_config, imported.flatten(state["params"]),
                             None, dict(pp))


def run_export(workdir, to, out, *, step=None, config=None) -> int:
    """Writes the workdir's model as `to` ('hf' or 'npz') into `out`; prints a JSON summary."""
    from big_contrast import models

    record = _record(workdir, step, config)
    cfg = models.resolve_config(record.model_config)
    if cfg["scan_layers"]:
        raise ConfigError("the model has scan_layers=True; export a model built with "
                         "scan_layers=False (the import never stacks layers).")
    if to == "hf":
        from big_contrast.interop import hf

        written = hf.export(record, cfg, out)
    else:
        from big_contrast.interop import big_vision

        written = big_vision.export(record, cfg, out)
    print(json.dumps(dict(out=str(out), format=to, files=written), indent=1))
    return 0
