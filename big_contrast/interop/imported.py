"""An imported checkpoint: model options, weights, tokenizer and preprocessing, and its workdir.

``Imported`` is what every family reader returns. ``write_workdir`` turns it into a
workdir of this project:

    W/config.py        trainer config (``big-contrast eval|train --config W/config.py``)
    W/interop.json     family, source, model options, preprocessing settings
    W/tokenizer/       the family's tokenizer file + settings.json (``interop/tokenizers.py``)
    W/checkpoints/0    a step-0 checkpoint (written by ``commands/import_.py``'s helper)

(the names are ``big_contrast.workdir``'s layout)

``read_workdir(W)`` and ``Imported.model()`` give back the ``TwoTowers`` model.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
from etils import epath
from flax import nnx

from big_contrast import models, sharding
from big_contrast.errors import ConfigError, MissingFileError
from big_contrast.interop import preprocess
from big_contrast.interop.tokenizers import PretrainedTokenizer, write_tokenizer_dir
from big_contrast.workdir import Workdir


@dataclasses.dataclass
class Imported:
    family: str  # 'siglip' | 'clip'
    source: str
    model_config: dict  # partial model config over models.default_model_config()
    params: dict  # flat '/'-joined path -> float32 numpy array
    tokenizer: dict | None  # directory, settings (see tokenizers.py), extra_files
    preprocess: dict  # preprocess.Transform settings
    text_normalize: str | None = None  # the family's text cleaning, for a --tokenizer given later

    def model(self) -> models.TwoTowers:
        return build_model(self.model_config, self.params)

    def make_tokenizer(self) -> PretrainedTokenizer | None:
        if self.tokenizer is None:
            return None
        return PretrainedTokenizer(self.tokenizer["directory"], settings=self.tokenizer["settings"])


def expected_shapes(model_config: dict) -> dict[str, tuple]:
    abstract = models.abstract_model(model_config)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {sharding.path_str(path): tuple(v.get_value().shape) for path, v in flat}


def nest(flat: dict) -> dict:
    """'/'-joined paths -> the nested dict of ``nnx.to_pure_dict`` (block indices as ints)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {sharding.path_str(path): np.asarray(leaf, np.float32) for path, leaf in leaves}


def build_model(model_config: dict, flat_params: dict) -> models.TwoTowers:
    """The model of ``model_config`` holding ``flat_params`` (nothing random is initialised)."""
    return models.create_from_params(model_config, nest(flat_params))


def finish_scalars(model_config: dict, params: dict) -> dict:
    """Scale / bias options for the imported values: the clamp of a softmax model sits at
    max(log 100, the imported log-scale), so the imported logits are exact."""
    cfg = dict(model_config)
    log_scale = float(np.asarray(params["log_scale"]).reshape(()))
    cfg["log_scale_init"] = log_scale
    if cfg["loss"] == "softmax":
        cfg["max_log_scale"] = max(math.log(100.0), log_scale)
    else:
        cfg["bias_init"] = float(np.asarray(params["bias"]).reshape(()))
    return cfg


# ----------------------------------------------------------------------------- workdir

_CONFIG_TEMPLATE = '''"""big-contrast eval --config {workdir}/config.py --workdir {workdir}

Imported by `big-contrast import` from {source} ({family}). Fine-tune with
`big-contrast train --config {workdir}/config.py --workdir {workdir}` (it resumes from the
step-0 checkpoint; set total_steps / data / optimizer with config arguments or edit this
file). LiT: in another config, copy MODEL["image"] into config.model.image, set
config.model.lock_image = True and config.init_towers = {{"image": "{workdir}"}}.
Evaluation uses the tokenizer in tokenizer/ and, as data.pp_eval (and pp_train), the
checkpoint's own preprocessing as an op string: the same pixels as `interop.load`'s transform
and the reference's image processor.{naflex_doc}
"""
import json
import pathlib

from big_contrast.data import demo_class_names
from big_contrast.train import apply_arg, default_config, split_arg

HERE = pathlib.Path(__file__).resolve().parent
INTEROP = json.loads((HERE / "{interop_json}").read_text())
MODEL = INTEROP["model"]
PP = {pp_eval!r}
# SigLIP 2 NaFlex (a Siglip2Model import): its patch size and budget, and the data pipeline's
# NaFlex op string (selected by the `naflex` argument); None for a fixed-resolution model.
NAFLEX = {naflex!r}
PP_NAFLEX = {pp_naflex!r}


def get_config(arg=None):
    options, _ = split_arg(arg, ("naflex",))
    if "naflex" in options and PP_NAFLEX is None:
        raise ValueError("config argument 'naflex': this workdir's model is not a SigLIP 2 NaFlex import.")
    pp = PP_NAFLEX if "naflex" in options else PP
    config = default_config()
    for key, value in MODEL.items():
        if isinstance(value, dict):
            config.model[key].update(value)
        else:
            config.model[key] = value
    config.batch_size = 16
    config.total_steps = 1
    config.checkpoint_every = 100
    config.optimizer.update(lr=1e-5, warmup_steps=0, weight_decay=0.0)
    config.data.batch_size = config.get_ref("batch_size")
    config.data.tokenizer = {tokenizer}
    config.data.max_len = MODEL["text"]["max_len"]
    config.data.lowercase = False
    config.data.pp_eval = pp
    config.data.pp_train = pp
    split = dict(kind="demo", split="eval", size=96, image_size=64)
    for task in ("shape", "colour"):
        config.evals[task] = dict(
            type="zero_shot", class_names=demo_class_names(task), templates=("a photo of a {{}}.",),
            label_field=f"label/{{task}}", batch_size=32, every_steps=0,
            data=dict(sources={{"demo": split}}, label_keys=(f"label/{{task}}",)))
    apply_arg(config, arg, flags=("naflex",))
    return config
'''

_NAFLEX_DOC = """

SigLIP 2 NaFlex: the image tower is a learned-position-table ViT at the table's own grid
({grid}x{grid} patches of {patch} px, image_size {image_size}); NAFLEX records the patch budget. By
default data.pp_eval / pp_train resize to that square ({image_size} px, Pillow bilinear), where the
fixed-resolution forward equals NaFlex's on square images; `--config {workdir}/config.py:naflex`
uses the pipeline's NaFlex op instead (aspect kept under max_num_patches={max_num_patches})."""


def write_workdir(workdir, imported: Imported, save_checkpoint) -> Workdir:
    """Writes ``W/config.py``, ``W/interop.json``, ``W/tokenizer/`` and (through
    ``save_checkpoint(config, workdir, params_tree)``) the step-0 checkpoint."""
    workdir = Workdir.of(workdir).absolute()  # config.py names it: a local path must be absolute
    workdir.path.mkdir(parents=True, exist_ok=True)
    if workdir.checkpoints.exists() and any(workdir.checkpoints.iterdir()):
        raise ConfigError(f"{workdir.checkpoints} is not empty; import into a new --workdir.")
    tokenizer = "None"
    if imported.tokenizer is not None:
        settings = imported.tokenizer["settings"]
        source_dir = epath.Path(imported.tokenizer["directory"])
        write_tokenizer_dir(workdir.tokenizer, source_file=source_dir / settings["file"],
                            extra_files=[source_dir / f for f in imported.tokenizer.get("extra_files", ())],
                            **{k: v for k, v in settings.items() if k != "file"})
        tokenizer = f'str(HERE / "{workdir.tokenizer.name}")'
    else:
        tokenizer = '"bytes"  # the source has no tokenizer: set yours'
    info = dict(family=imported.family, source=imported.source, model=imported.model_config,
                preprocess=imported.preprocess)
    workdir.interop.write_text(json.dumps(info, indent=1))
    workdir.imported_config.write_text(_CONFIG_TEMPLATE.format(
        workdir=workdir, source=imported.source, family=imported.family, interop_json=workdir.interop.name,
        tokenizer=tokenizer, **_pp_fields(imported, workdir)))
    config = load_config(workdir.imported_config)
    save_checkpoint(config, workdir, nest(imported.params))
    return workdir


def _pp_fields(imported: Imported, workdir) -> dict:
    """The config template's preprocessing: the checkpoint's op string; for NaFlex the square at
    the position table's grid by default, the NaFlex op string and its options."""
    settings = imported.preprocess
    if settings["resize"] != "naflex":
        return dict(pp_eval=preprocess.pp_string(settings), naflex=None, pp_naflex=None, naflex_doc="")
    vit = models.image_config(imported.model_config)
    naflex = dict(patch_size=int(settings["patch_size"]), max_num_patches=int(settings["max_num_patches"]))
    doc = _NAFLEX_DOC.format(grid=vit.grid[0], patch=vit.patch_size[0], image_size=vit.image_size[0],
                             workdir=workdir, max_num_patches=naflex["max_num_patches"])
    square = preprocess.square_equivalent(settings, vit.image_size[0])
    return dict(pp_eval=preprocess.pp_string(square), naflex=naflex, pp_naflex=preprocess.pp_string(settings),
                naflex_doc=doc)


def load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("big_contrast_imported_config", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def is_workdir(path) -> bool:
    return Workdir.of(path).interop.exists()


def read_workdir(workdir, step: int | None = None) -> Imported:
    """The model options, latest (or ``step``) parameters, tokenizer and preprocessing of a
    workdir written by ``write_workdir`` (or fine-tuned from one)."""
    from big_contrast.checkpoint import Checkpointer

    workdir = Workdir.of(workdir)
    info = json.loads(workdir.interop.read_text())
    if not workdir.has_checkpoints():  # before a Checkpointer, which would create the folder
        raise MissingFileError(f"{workdir} has no checkpoint; import again.")
    ckpt = Checkpointer(workdir.checkpoints, async_save=False)
    try:
        state, _ = ckpt.restore_arrays(step)
    finally:
        ckpt.close()
    tokenizer = None
    if workdir.tokenizer.exists():
        settings = json.loads((workdir.tokenizer / "settings.json").read_text())
        tokenizer = dict(directory=str(workdir.tokenizer), settings=settings)
    return Imported(info["family"], info["source"], info["model"], flatten(state["params"]),
                    tokenizer, info["preprocess"])
