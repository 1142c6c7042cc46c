"""`big-contrast import` and `big-contrast export`.

    big-contrast import SOURCE --workdir W [--arch NAME] [--tokenizer DIR]
    big-contrast export --workdir W --to hf OUT     # transformers SiglipModel / CLIPModel
    big-contrast export --workdir W --to npz OUT    # big_vision SigLIP .npz

`import` writes W/config.py, W/interop.json, W/tokenizer/ and a step-0 checkpoint (see
``imported.py``); `export` reads the latest (or ``--step``) checkpoint of W. A workdir that
was not imported (trained from scratch) needs ``--config`` for its model options.
"""
from __future__ import annotations

import argparse
import json
import os

from etils import epath

from big_contrast import models


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="big-contrast")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="write a workdir from a released checkpoint")
    imp.add_argument("source", help="HF model directory, open_clip .safetensors/.bin, big_vision .npz")
    imp.add_argument("--workdir", required=True)
    imp.add_argument("--arch", default=None,
                     help="open_clip model-config name or JSON path; big_vision 'B/16,B,...'")
    imp.add_argument("--tokenizer", default=None,
                     help="HF tokenizer directory (spiece.model or tokenizer.json) for sources "
                          "that carry none (open_clip, big_vision)")
    exp = sub.add_parser("export", help="write a workdir's model in another layout")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--to", required=True, choices=("hf", "npz"))
    exp.add_argument("out")
    exp.add_argument("--step", type=int, default=None)
    exp.add_argument("--config", default=None,
                     help="config file of a workdir that was not imported (its model options)")
    return p


def main(argv, save_checkpoint) -> int:
    """``save_checkpoint(config, workdir, params_tree)`` writes the step-0 checkpoint
    (``train.initial.save_initial_checkpoint``; cli.py passes it in)."""
    args = parser().parse_args(argv)
    _check_paths(args)
    if args.command == "import":
        return run_import(args.source, args.workdir, args.arch, save_checkpoint,
                          tokenizer=args.tokenizer)
    return run_export(args.workdir, args.to, args.out, step=args.step, config=args.config)


def _check_paths(args) -> None:
    """Every path argument through the path layer first: a malformed URL (`gs:/b/x`) is refused
    rather than made a local folder, and a bucket is checked in seconds (the modules below read
    and write through `etils.epath`, which takes the same URLs)."""
    from big_contrast import paths

    if args.command == "import":
        reads, writes = [args.source, args.tokenizer], [args.workdir]
    else:
        reads, writes = [args.workdir], [os.fspath(paths.parse(args.out).parent) if args.to == "npz" else args.out]
    for url in filter(None, reads + writes):
        paths.validate(url)
    for url in filter(paths.is_remote, filter(None, reads)):
        paths.check_readable(url)
    for url in filter(paths.is_remote, writes):
        paths.check_writable(url)


def run_import(source, workdir, arch, save_checkpoint, tokenizer=None) -> int:
    from big_contrast import interop
    from big_contrast.interop import hf
    from big_contrast.interop.imported import write_workdir

    record = interop.read(source, arch)
    if tokenizer is not None:
        record.tokenizer = hf.tokenizer_of(tokenizer, record.family,
                                           record.model_config["text"]["max_len"])
        if record.tokenizer is None:
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no spiece.model or tokenizer.json there.")
        if record.text_normalize:  # e.g. open_clip's SigLIP configs canonicalise the text
            record.tokenizer["settings"]["normalize"] = record.text_normalize
    workdir = write_workdir(workdir, record, save_checkpoint)
    counts = {tower: sum(v.size for k, v in record.params.items() if k.startswith(tower))
              for tower in ("image", "text")}
    counts["total"] = sum(v.size for v in record.params.values())
    print(json.dumps(dict(workdir=str(workdir), family=record.family, params=counts,
                          tokenizer=record.tokenizer is not None,
                          eval=f"big-contrast eval --config {workdir}/config.py --workdir {workdir}"),
                     indent=1))
    return 0


def _record(workdir, step, config):
    from big_contrast.interop import imported, preprocess

    if imported.is_workdir(workdir):
        return imported.read_workdir(workdir, step)
    if config is None:
        raise ValueError(f"{workdir} was not written by `big-contrast import`; pass --config with "
                         "the config file it was trained with.")
    from big_contrast.checkpoint import Checkpointer

    model_config = imported.load_config(config).model.to_dict()
    ckpt = Checkpointer(epath.Path(workdir) / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore_arrays(step)
    finally:
        ckpt.close()
    family = models.family(model_config["loss"])
    pp = preprocess.SIGLIP if family == "siglip" else preprocess.CLIP
    return imported.Imported(family, str(workdir), model_config, imported.flatten(state["params"]),
                             None, dict(pp))


def run_export(workdir, to, out, *, step=None, config=None) -> int:
    record = _record(workdir, step, config)
    cfg = models.resolve_config(record.model_config)
    if cfg["scan_layers"]:
        raise ValueError("the model has scan_layers=True; export a model built with "
                         "scan_layers=False (the import never stacks layers).")
    if to == "hf":
        from big_contrast.interop import hf

        written = hf.export(record, cfg, out)
    else:
        from big_contrast.interop import big_vision

        written = big_vision.export(record, cfg, out)
    print(json.dumps(dict(out=str(out), format=to, files=written), indent=1))
    return 0


__all__ = ["main", "parser", "run_export", "run_import"]
