"""big-contrast import: a workdir from a released checkpoint (HF directory, open_clip file, big_vision .npz).

    big-contrast import SOURCE --workdir W [--arch NAME] [--tokenizer DIR]

Writes W/config.py, W/interop.json, W/tokenizer/ and a step-0 checkpoint holding exactly the
train state `train` and `eval` restore (the parameters, this config's fresh optimizer state),
so `big-contrast eval|train --config W/config.py --workdir W` work on it.
"""

from __future__ import annotations

import json

from absl import flags as absl_flags

from big_contrast.commands import base
from big_contrast.errors import MissingFileError


def define_flags(fv, argv) -> None:
    del argv
    base.define_workdir(fv, "New folder or gs:// URL to write the workdir into.")
    absl_flags.DEFINE_string("arch", None, "open_clip model-config name or JSON path; big_vision 'B/16,B,...'.",
                             flag_values=fv)
    absl_flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (spiece.model or tokenizer.json) for "
                             "sources that carry none (open_clip, big_vision).", flag_values=fv)


def run(flags, args) -> int:
    from big_contrast import paths
    from big_contrast.workdir import Workdir

    base.require(flags, "workdir")
    if len(args) != 1:
        raise base.UsageError("give one SOURCE: an HF model directory, an open_clip .safetensors/.bin or a "
                              "big_vision .npz.")
    source = args[0]
    for url in filter(None, (source, flags.tokenizer)):
        if paths.is_remote(paths.validate(url)):
            paths.check_readable(url)
    workdir = Workdir(flags.workdir)
    if workdir.remote:
        workdir.check_writable()
    return run_import(source, workdir, flags.arch, tokenizer=flags.tokenizer)


def run_import(source, workdir, arch=None, save_checkpoint=None, tokenizer=None) -> int:
    """Reads `source`, writes the workdir (its step-0 checkpoint through `save_checkpoint(config,
    workdir, params_tree)`, by default `save_initial_checkpoint`), prints a JSON summary."""
    from big_contrast import interop
    from big_contrast.interop import hf
    from big_contrast.interop.imported import write_workdir

    record = interop.read(source, arch)
    if tokenizer is not None:
        record.tokenizer = hf.tokenizer_of(tokenizer, record.family, record.model_config["text"]["max_len"])
        if record.tokenizer is None:
            raise MissingFileError(f"--tokenizer {tokenizer}: no spiece.model or tokenizer.json there.")
        if record.text_normalize:  # e.g. open_clip's SigLIP configs canonicalise the text
            record.tokenizer["settings"]["normalize"] = record.text_normalize
    workdir = write_workdir(workdir, record, save_checkpoint or save_initial_checkpoint)
    counts = {tower: sum(v.size for k, v in record.params.items() if k.startswith(tower))
              for tower in ("image", "text")}
    counts["total"] = sum(v.size for v in record.params.values())
    print(json.dumps(dict(workdir=str(workdir), family=record.family, params=counts,
                          tokenizer=record.tokenizer is not None,
                          eval=f"big-contrast eval --config {workdir.imported_config} --workdir {workdir}"),
                     indent=1))
    return 0


def save_initial_checkpoint(config, workdir, params_tree) -> None:
    """Writes `params_tree` (nested like the model's parameters) as step 0 of `workdir`."""
    import jax

    from big_contrast import sharding
    from big_contrast.checkpoint import Checkpointer
    from big_contrast.train.loop import build, train_pipeline
    from big_contrast.workdir import Workdir

    # On one device: the checkpoint restores onto any mesh, and orbax has no replicas to slice.
    mesh = sharding.make_mesh([(name, 1) for name, _ in config.mesh], devices=jax.devices()[:1])
    run = build(config, mesh=mesh, params=params_tree)
    state = run.state  # the given parameters, a fresh optimizer state (zero moments)
    data = train_pipeline(config, sharding.batch_sharding(run.mesh))
    try:
        data_state = data.get_state()  # a fine-tuning run resumes at the first batch
    finally:
        data.close()
    meta = {"data": data_state, "step": 0, "process_count": jax.process_count(), "seed": config.seed,
            "data_seed": config.data.seed, "imported": True}
    ckpt = Checkpointer(Workdir.of(workdir).checkpoints, async_save=False)
    try:
        ckpt.save(0, state, meta, wait=True)
    finally:
        ckpt.close()
