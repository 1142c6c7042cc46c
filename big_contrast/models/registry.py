"""Build models from a config, count their parameters, load and freeze towers.

Config fields (``default_model_config()`` has them all, with defaults; a
config passed to ``create`` may set any subset, unknown keys are an error):

``image``: ``variant`` ('B/16', 'So400m/14', 'mu/8', ...), ``image_size``
  (int or (h, w)), ``pool`` ('tok' | 'gap' | 'map'), ``posemb`` ('learn' |
  'sincos2d'), ``channels``, optional overrides ``width``, ``depth``,
  ``mlp_dim``, ``num_heads``, ``head`` (project to ``embed_dim``), and
  ``patch_dropout`` (FLIP: fraction of patch tokens dropped in training, 0.0).
``text``: ``variant`` ('B', 'So400m', ...), ``vocab_size``, ``max_len``,
  ``causal`` (CLIP) or bidirectional (SigLIP), ``pool`` (None: 'eos' if
  causal else 'last'; see ``text.POOLS``), ``pad_id``, ``eos_id`` (None:
  OpenAI's argmax-id convention), the same overrides, and ``head``.
Options for released checkpoints (``big_contrast/interop``), per tower:
  ``act`` ('gelu_tanh' | 'gelu' | 'quick_gelu'), ``norm_eps`` (LayerNorm
  epsilon), ``head_bias`` (CLIP's projections have none); image ``ln_pre``
  and ``patch_bias`` (CLIP); text ``mask_padding=False`` (SigLIP as released:
  no padding mask, texts padded to max_len, 'last' pools the final position).
``embed_dim``: shared embedding width, or None for no projection heads (the
  two tower widths must then agree).
``loss``: 'softmax' | 'sigmoid'; picks the defaults of the three fields below.
``log_scale_init``: None -> log(1/0.07) (softmax) / log(10) (sigmoid).
``max_log_scale``: None -> log(100) (softmax) / no clamp (sigmoid).
``bias_init``: None -> -10 (sigmoid) / no bias parameter (softmax).
``lock_image``: LiT, freeze the image tower (see ``TwoTowers``).
``dtype``: compute dtype ('float32' | 'bfloat16'); ``param_dtype``: storage.
``remat``: 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'.
``scan_layers``: stack each tower's blocks and run them with ``nnx.scan``.

Towers: ``image_config`` / ``text_config`` turn a model config into the tower's one frozen
``ViTConfig`` / ``TextConfig`` (variant decoded, overrides and the model-wide dtype, remat and
scan applied); a tower option is a field of its config class, read from the tower's section
by name, so adding one is a line in that class (plus its model-config default only where
that differs from the class's).

Checkpoint loading: ``load_tower_params`` copies a tower's parameters from a
pytree with shape checks; reading that pytree from an orbax checkpoint
directory is the trainer's job (``config.init_towers`` in ``big_contrast/train``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from big_contrast import sharding
from big_contrast.errors import ConfigError
from big_contrast.models import variants
from big_contrast.models.decoder import Decoder, DecoderConfig
from big_contrast.models.distill_head import DistillHead, DistillHeadConfig
from big_contrast.models.text import TextConfig, TextTransformer
from big_contrast.models.two_towers import TwoTowers
from big_contrast.models.vit import ViT, ViTConfig

LOSSES = ("softmax", "sigmoid")
FAMILIES = {"sigmoid": "siglip", "softmax": "clip"}  # the one home of this rule
LOSS_DEFAULTS = {
    "softmax": dict(log_scale_init=math.log(1 / 0.07), max_log_scale=math.log(100.0),
                    bias_init=None),
    "sigmoid": dict(log_scale_init=math.log(10.0), max_log_scale=None, bias_init=-10.0),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOWERS = ("image", "text")


def _optional(field_type):
    """A None default that `--config.key=value` can still override (typed FieldReference)."""
    import ml_collections  # only configs need it: models build from plain dicts without it

    return ml_collections.FieldReference(None, field_type=field_type)


def default_model_config():
    """The defaults as an ``ml_collections.ConfigDict`` (for configs and command-line overrides)."""
    import ml_collections

    return ml_collections.ConfigDict(_model_defaults(_optional))


def _model_defaults(optional) -> dict:
    """Every model option with its default; ``optional(type)`` stands for an unset (None) one.
    A tower's own options are its config class's fields (``ViTConfig``, ``TextConfig``) with
    their defaults, so a new field needs no line here unless its default differs."""
    def size_overrides():
        return dict(width=optional(int), depth=optional(int), mlp_dim=optional(int),
                    num_heads=optional(int))

    return dict(
        image=dict(variant="B/16", head=True, head_bias=True, **size_overrides(),
                   **_tower_defaults(ViTConfig, pool="map")),
        text=dict(variant="B", head=True, head_bias=True, **size_overrides(),
                  **_tower_defaults(TextConfig, pool=optional(str))),
        embed_dim=768,
        loss="sigmoid",
        log_scale_init=optional(float),
        max_log_scale=optional(float),
        bias_init=optional(float),
        lock_image=False,
        dtype="float32",
        param_dtype="float32",
        remat="none",
        scan_layers=False,
        decoder=None,  # SigLIP 2 / CapPa captioning decoder: a dict of DecoderConfig fields (decoder_config)
        distill_head=None,  # SigLIP 2's SILC / TIPS head + mask token: DistillHeadConfig fields but input_width
    )


# Tower config fields that come from the variant and the model-wide options, not from the
# tower's own section of the model config.
_DERIVED = ("patch_size", "width", "depth", "mlp_dim", "num_heads", "dtype", "param_dtype",
            "remat", "scan")


def _tower_defaults(config_class, **overrides) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)
                if f.name not in _DERIVED}
    return {**defaults, **overrides}


def resolve_config(config: Mapping | None) -> dict:
    """Defaults updated with ``config`` (a dict or a ConfigDict), as plain nested dicts; unknown
    keys raise."""
    resolved = _model_defaults(lambda _: None)
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    _update_checked(resolved, given, "config")
    return resolved


def _update_checked(base: dict, update: Mapping, where: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{where}.{key} is not a model option; known options: {sorted(base)}.")
        if isinstance(base[key], dict):
            _update_checked(base[key], dict(value), f"{where}.{key}")
        else:
            base[key] = value


def _dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is unknown; use one of {tuple(DTYPES)}.")
    return DTYPES[name]


def _common(cfg: dict) -> dict:
    return dict(dtype=_dtype(cfg["dtype"]), param_dtype=_dtype(cfg["param_dtype"]),
                remat=cfg["remat"], scan=cfg["scan_layers"])


def _size_overrides(tower: dict) -> dict:
    return {k: tower[k] for k in ("width", "depth", "mlp_dim", "num_heads")}


def _tower_config(config_class, section: dict, **derived):
    """``config_class`` from the options of ``section`` that are its fields, and ``derived``."""
    own = {f.name: section[f.name] for f in dataclasses.fields(config_class)
           if f.name in section and f.name not in derived}
    return config_class(**derived, **own)


def image_config(config: Mapping | None) -> ViTConfig:
    """The image tower's ``ViTConfig`` of a model config (a dict or a ConfigDict, any subset)."""
    cfg = resolve_config(config)
    size, patch = variants.decode_image_variant(cfg["image"]["variant"])
    size = variants.with_overrides(size, **_size_overrides(cfg["image"]))
    return _tower_config(ViTConfig, cfg["image"], patch_size=patch, **vars(size), **_common(cfg))


def text_config(config: Mapping | None) -> TextConfig:
    """The text tower's ``TextConfig`` of a model config (a dict or a ConfigDict, any subset)."""
    cfg = resolve_config(config)
    size = variants.with_overrides(variants.decode_text_variant(cfg["text"]["variant"]),
                                   **_size_overrides(cfg["text"]))
    return _tower_config(TextConfig, cfg["text"], **vars(size), **_common(cfg))


def create_image_tower(cfg: Mapping | None, rngs: nnx.Rngs) -> ViT:
    return ViT(image_config(cfg), rngs=rngs)


def create_text_tower(cfg: Mapping | None, rngs: nnx.Rngs) -> TextTransformer:
    return TextTransformer(text_config(cfg), rngs=rngs)


def decoder_config(config: Mapping | None) -> DecoderConfig | None:
    """The captioning decoder of a model config (``config.decoder``: DecoderConfig fields), or
    None. Unset fields follow the text tower (vocabulary, length, pad / EOS ids: the decoder
    predicts the caption the text tower reads) and the image tower's width."""
    cfg = resolve_config(config)
    section = cfg["decoder"]
    if section is None:
        return None
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = {f.name for f in dataclasses.fields(DecoderConfig)}
    if set(section) - known:
        raise ConfigError(f"config.model.decoder has unknown fields {sorted(set(section) - known)}; "
                          f"known: {sorted(known)}.")
    text, image = text_config(cfg), image_config(cfg)
    defaults = dict(vocab_size=text.vocab_size, max_len=text.max_len, pad_id=text.pad_id, bos_id=text.pad_id,
                    eos_id=text.eos_id, encoder_width=image.width, dtype=cfg["dtype"],
                    param_dtype=cfg["param_dtype"])
    return DecoderConfig(**{**defaults, **section})


def family(loss: str) -> str:
    """The released-model family a loss belongs to: 'siglip' (sigmoid) or 'clip' (softmax)."""
    if loss not in FAMILIES:
        raise ConfigError(f"loss={loss!r} is unknown; use one of {tuple(FAMILIES)}.")
    return FAMILIES[loss]


def create(config: Mapping | None = None,
           rngs: nnx.Rngs | int = 0) -> TwoTowers:
    """Builds a ``TwoTowers`` model (eagerly, unsharded) from a model config."""
    cfg = resolve_config(config)
    if cfg["loss"] not in LOSSES:
        raise ConfigError(f"config.loss={cfg['loss']!r} is unknown; use one of {LOSSES}.")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    loss_defaults = LOSS_DEFAULTS[cfg["loss"]]
    scalars = {k: loss_defaults[k] if cfg[k] is None else cfg[k] for k in loss_defaults}
    return TwoTowers(create_image_tower(cfg, rngs), create_text_tower(cfg, rngs),
                     embed_dim=cfg["embed_dim"], image_head=cfg["image"]["head"],
                     text_head=cfg["text"]["head"],
                     head_bias=(cfg["image"]["head_bias"], cfg["text"]["head_bias"]),
                     lock_image=cfg["lock_image"],
                     param_dtype=_dtype(cfg["param_dtype"]), decoder=_decoder(cfg, rngs),
                     distill_head=_distill_head(cfg, rngs), rngs=rngs, **scalars)


def _decoder(cfg: dict, rngs: nnx.Rngs) -> Decoder | None:
    config = decoder_config(cfg)
    return None if config is None else Decoder(config, rngs=rngs)


def distill_head_config(config: Mapping | None) -> DistillHeadConfig | None:
    """The SILC / TIPS head of a model config (``config.distill_head``: hidden, bottleneck,
    prototypes), or None; its input is the image tower's width (pooled and patch features)."""
    cfg = resolve_config(config)
    section = cfg["distill_head"]
    if section is None:
        return None
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = {f.name for f in dataclasses.fields(DistillHeadConfig)} - {"input_width"}
    if set(section) - known:
        raise ConfigError(f"config.model.distill_head has unknown fields {sorted(set(section) - known)}; "
                          f"known: {sorted(known)}.")
    return DistillHeadConfig(input_width=image_config(cfg).width, **section)


def _distill_head(cfg: dict, rngs: nnx.Rngs) -> DistillHead | None:
    config = distill_head_config(cfg)
    return None if config is None else DistillHead(config, rngs=rngs)


def create_sharded(config, mesh: jax.sharding.Mesh, seed: int | jax.Array = 0,
                   rules: sharding.Rules | None = None,
                   compiler_options: Mapping[str, Any] | None = None) -> TwoTowers:
    """``create`` with every parameter initialised directly into its mesh sharding.

    ``seed`` is an int or a PRNG key; ``jax.random.key(s, impl="rbg")`` compiles
    the initialisation several times faster than the default threefry on CPU.
    """
    resolve_config(config)  # fail on a bad config before tracing
    return sharding.init_sharded(lambda: create(config, nnx.Rngs(seed)), mesh, rules,
                                 compiler_options=compiler_options)


def create_from_params(config, params_tree, abstract: TwoTowers | None = None) -> TwoTowers:
    """The model of ``config`` holding ``params_tree`` (nested like ``nnx.to_pure_dict`` of its
    parameters, e.g. imported weights), cast to the parameter dtype; nothing is initialised at
    random, so a large released model costs no throw-away initialisation. ``abstract``:
    ``abstract_model(config)`` when the caller has it already."""
    abstract = abstract_model(config) if abstract is None else abstract
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    expected = {sharding.path_str(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    given = dict(_flat_params(params_tree))
    _check_same_params("model", expected, given)
    values = [(path, variable.replace(jnp.asarray(given[sharding.path_str(path)],
                                                  variable.get_value().dtype)))
              for path, variable in nnx.to_flat_state(params)]
    return nnx.merge(graphdef, nnx.from_flat_state(values), rest)


def abstract_model(config) -> TwoTowers:
    """The model with ``jax.ShapeDtypeStruct`` parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: create(config, nnx.Rngs(0)))


def num_params(module: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract modules too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def count_params(model: TwoTowers) -> dict[str, int]:
    """Parameters per tower (each including its projection head) and in total."""
    image = num_params(model.image) + (num_params(model.image_head) if model.image_head else 0)
    text = num_params(model.text) + (num_params(model.text_head) if model.text_head else 0)
    decoder = {} if model.decoder is None else dict(decoder=num_params(model.decoder))  # SigLIP 2
    distill = {} if model.distill_head is None else dict(  # SILC / TIPS: the head and the mask token
        distill_head=num_params(model.distill_head) + model.mask_token.get_value().size)
    return dict(image=image, text=text, **decoder, **distill, total=num_params(model))


def frozen_mask(model: TwoTowers) -> nnx.State:
    """``nnx.State`` of bools over the model's ``nnx.Param``s: True where frozen (LiT)."""
    params = nnx.state(model, nnx.Param)
    flat = [(path, model.is_frozen(path)) for path, _ in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def load_tower_params(model: TwoTowers, tower_name: str, params_tree: Any) -> None:
    """Copies tower ``tower_name`` ('image' | 'text') from ``params_tree`` into ``model``.

    ``params_tree`` holds that tower's parameters, as an ``nnx.State`` or nested
    dicts of arrays (e.g. ``restored['params']['image']`` from a checkpoint of
    this project). Paths and shapes must match exactly; values are cast to the
    parameter dtype and placed with the current parameter's sharding.
    """
    if tower_name not in TOWERS:
        raise ConfigError(f"tower_name={tower_name!r} is unknown; use one of {TOWERS}.")
    tower = getattr(model, tower_name)
    flat_state = list(nnx.to_flat_state(nnx.state(tower, nnx.Param)))
    current = {sharding.path_str(path): variable.get_value() for path, variable in flat_state}
    given = dict(_flat_params(params_tree))
    _check_same_params(tower_name, current, given)
    loaded = [(path, variable.replace(_like(given[sharding.path_str(path)], variable.get_value())))
              for path, variable in flat_state]
    nnx.update(tower, nnx.from_flat_state(loaded))


def _like(value, reference: jax.Array) -> jax.Array:
    """``value`` with the dtype and (if concrete) the sharding of ``reference``."""
    value = jnp.asarray(value, reference.dtype)
    sharding_ = getattr(reference, "sharding", None)
    return value if sharding_ is None else jax.device_put(value, sharding_)


def _flat_params(tree) -> list[tuple[str, Any]]:
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    elif isinstance(tree, nnx.Module):
        tree = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
    if hasattr(tree, "to_dict") and not isinstance(tree, Mapping):  # an ml_collections.ConfigDict
        tree = tree.to_dict()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(sharding.path_str(path), leaf) for path, leaf in leaves]


def _check_same_params(tower_name: str, current: dict, given: dict) -> None:
    problems = [f"missing {k}" for k in current if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in current]
    problems += [f"{k}: shape {tuple(jnp.shape(given[k]))} != model's {tuple(current[k].shape)}"
                 for k in current if k in given and tuple(jnp.shape(given[k])) != tuple(current[k].shape)]
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ConfigError(f"cannot load the {tower_name} tower: {len(problems)} parameter(s) do not "
                          f"match ({shown}). Build the model with the config the weights were "
                          "trained with (same variant, image size, pool, scan_layers).")
