"""Hugging Face ``SiglipModel`` / ``Siglip2Model`` / ``CLIPModel`` directories in and out.

A directory holds ``config.json``, ``model.safetensors`` (or sharded ``*.safetensors``,
or a torch ``pytorch_model.bin``), its tokenizer files and ``preprocessor_config.json``.
``model_config(hf_config)`` translates the architecture into this project's model
options; ``rules(model_cfg)`` is the weight name map (``weights.Rule``), used both ways.

SigLIP (and SigLIP 2 fixed-resolution checkpoints, which are ``SiglipModel`` with a
Gemma tokenizer): MAP-pooled ViT without a projection, a bidirectional text tower with
no padding mask pooled at the last position, a biased text head, ``logit_scale`` and
``logit_bias``. CLIP: class-token ViT with ``ln_pre`` and a bias-free patch embedding,
a causal text tower pooled at the first EOS (or the largest id, for configs with the
legacy ``eos_token_id=2``), bias-free projections and ``logit_scale``.

SigLIP 2 NaFlex (``Siglip2Model``, ``model_type='siglip2'``): SigLIP's towers and names, with
two differences. The patch embedding is a Linear over patches flattened (row, column,
channel), read as the ViT's convolution kernel; the learned position table holds
``num_patches`` rows, a square grid ``g x g``, and is kept at that grid: the imported image
tower is a ``posemb='learn'`` ViT at ``image_size = g * patch_size`` whose NaFlex forward
(``models/naflex.py``) resizes the table per image as transformers does. The preprocessing
is ``Siglip2ImageProcessor``'s (``interop/preprocess.py``, ``resize='naflex'``), which is what
marks an imported model as NaFlex (and makes ``export`` write a ``Siglip2Model`` back).
"""
from __future__ import annotations

import json
import math

from etils import epath

from big_contrast import models
from big_contrast.errors import ConfigError, MissingFileError
from big_contrast.interop import weights as w
from big_contrast.models import variants

FAMILIES = ("siglip", "clip")
NAFLEX_TYPE = "siglip2"  # Siglip2Model: imported as the 'siglip' family with NaFlex preprocessing
ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
        "quick_gelu": "quick_gelu"}
_HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
NAMES = dict(block=".encoder.layers.", norm1="layer_norm1", norm2="layer_norm2",
             q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
             out="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2", w="weight", b="bias")


def read_config(directory) -> dict:
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise MissingFileError(f"{directory} has no config.json; pass a Hugging Face model "
                               "directory (save_pretrained output).")
    return json.loads(path.read_text())


def family_of(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    if model_type == NAFLEX_TYPE:
        return "siglip"
    if model_type not in FAMILIES:
        raise ConfigError(f"config.json model_type={model_type!r} has no counterpart here; "
                          f"supported: {(*FAMILIES, NAFLEX_TYPE)}.")
    return model_type


def is_naflex(hf_config: dict) -> bool:
    return hf_config.get("model_type") == NAFLEX_TYPE


def _naflex_grid(v: dict) -> int:
    """The side of a Siglip2 position table's square grid (``num_patches`` rows)."""
    rows = int(v.get("num_patches", 256))
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise ConfigError(f"config.json vision_config.num_patches={rows} is not a square grid; "
                          "Siglip2's position table is g x g patches (e.g. 256).")
    return grid


def _act(tower_cfg: dict, where: str) -> str:
    act = tower_cfg["hidden_act"]
    if act not in ACTS:
        raise ConfigError(f"config.json {where}.hidden_act={act!r} has no counterpart here; "
                          f"supported: {sorted(ACTS)}.")
    return ACTS[act]


def size_fields(width: int, depth: int, mlp_dim: int, num_heads: int, patch: int | None = None
                ) -> dict:
    """A named variant when the size is one of ``variants.SIZES``, else 'mu' with overrides."""
    size = variants.Size(width, depth, mlp_dim, num_heads)
    name = next((k for k, v in variants.SIZES.items() if v == size), None)
    suffix = "" if patch is None else f"/{patch}"
    if name is not None:
        return dict(variant=name + suffix)
    return dict(variant="mu" + suffix, width=width, depth=depth, mlp_dim=mlp_dim,
                num_heads=num_heads)


def _vision_size(v: dict) -> dict:
    return size_fields(v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"],
                       v["num_attention_heads"], v["patch_size"])


def _text_size(t: dict) -> dict:
    return size_fields(t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"],
                       t["num_attention_heads"])


def model_config(hf_config: dict) -> dict:
    """This project's model options for an HF SigLIP / CLIP config (defaults as transformers')."""
    family = family_of(hf_config)
    siglip = family == "siglip"
    tower = (dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072,
                  num_attention_heads=12) if siglip else
             dict(hidden_size=512, num_hidden_layers=12, intermediate_size=2048,
                  num_attention_heads=8))
    eps = 1e-6 if siglip else 1e-5
    tower["hidden_act"] = "gelu_pytorch_tanh" if siglip else "quick_gelu"
    v = {**tower, **dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         image_size=224, num_channels=3, patch_size=16 if siglip else 32,
                         layer_norm_eps=eps), **hf_config.get("vision_config", {})}
    naflex = is_naflex(hf_config)
    if naflex:  # the table's own grid (Siglip2VisionConfig has num_patches, no image_size)
        v["image_size"] = _naflex_grid(v) * v["patch_size"]
    t = {**tower, **dict(vocab_size=32000 if siglip else 49408,
                         max_position_embeddings=64 if siglip else 77, layer_norm_eps=eps,
                         pad_token_id=1, eos_token_id=2 if siglip and not naflex else 49407),
         **hf_config.get("text_config", {})}
    image = dict(**_vision_size(v), image_size=v["image_size"], channels=v["num_channels"],
                 posemb="learn", act=_act(v, "vision_config"), norm_eps=v["layer_norm_eps"])
    text = dict(**_text_size(t), vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
                act=_act(t, "text_config"), norm_eps=t["layer_norm_eps"], mask_padding=False,
                pad_id=t["pad_token_id"])
    if family == "siglip":
        if not v.get("vision_use_head", True):
            raise ConfigError("config.json vision_config.vision_use_head=false: a SigLIP image "
                              "tower without its MAP head has no pooled output to import.")
        projection = t.get("projection_size", t["hidden_size"])
        if projection != v["hidden_size"]:
            raise ConfigError(f"text_config.projection_size={projection} differs from the image "
                              f"width {v['hidden_size']}; SigLIP has no image projection.")
        image.update(pool="map", head=False)
        text.update(causal=False, pool="last", eos_id=t["eos_token_id"], head=True,
                    head_bias=True)
        return dict(image=image, text=text, embed_dim=projection, loss="sigmoid")
    eos = t["eos_token_id"]
    image.update(pool="tok", ln_pre=True, patch_bias=False, head=True, head_bias=False)
    text.update(causal=True, pool="eos", eos_id=None if eos == 2 else eos, head=True,
                head_bias=False)
    return dict(image=image, text=text, embed_dim=hf_config.get("projection_dim", 512),
                loss="softmax")


def depths(cfg: dict) -> tuple[int, int]:
    """The image and text tower depths of a model config (variant and overrides decoded)."""
    return models.image_config(cfg).depth, models.text_config(cfg).depth


def family_of_model(cfg: dict) -> str:
    return models.family(cfg["loss"])


def rules(cfg: dict, naflex: bool = False) -> list[w.Rule]:
    """Weight name map between this project's params and an HF SiglipModel / CLIPModel, or with
    ``naflex`` a Siglip2Model (its patch embedding a Linear over flattened patches)."""
    family = family_of_model(cfg)
    image_depth, text_depth = depths(cfg)
    R = w.Rule
    vm, tm = "vision_model", "text_model"
    # NaFlex: torch [D, p*p*C] <-> our kernel [p, p, C, D] read as [p*p*C, D] ('lin_out').
    out = [R("image/embedding/kernel", f"{vm}.embeddings.patch_embedding.weight", "lin_out" if naflex else "conv"),
           R("image/posemb", f"{vm}.embeddings.position_embedding.weight", "lead1"),
           R("text/embedding/embedding", f"{tm}.embeddings.token_embedding.weight"),
           R("text/posemb", f"{tm}.embeddings.position_embedding.weight", "lead1"),
           R("log_scale", "logit_scale", "flat" if family == "siglip" else "id")]
    out += w.encoder_rules("image/encoder", vm, image_depth, NAMES)
    out += w.encoder_rules("text/encoder", tm, text_depth, NAMES)
    out += w.norm_rules("text/encoder/norm", f"{tm}.final_layer_norm", NAMES)
    if family == "siglip":
        out += [R("image/embedding/bias", f"{vm}.embeddings.patch_embedding.bias"),
                R("bias", "logit_bias", "flat"),
                R("image/map_head/probe", f"{vm}.head.probe")]
        out += w.norm_rules("image/encoder/norm", f"{vm}.post_layernorm", NAMES)
        head = dict(NAMES, q="q", k="k", v="v", out="out_proj")
        out += w.attention_rules("image/map_head/attention", f"{vm}.head.attention", head)
        out += w.norm_rules("image/map_head/norm", f"{vm}.head.layernorm", NAMES)
        out += w.linear_rules("image/map_head/mlp/fc1", f"{vm}.head.mlp.fc1", NAMES)
        out += w.linear_rules("image/map_head/mlp/fc2", f"{vm}.head.mlp.fc2", NAMES)
        out += w.linear_rules("text_head", f"{tm}.head", NAMES)
        return out
    out += [R("image/cls", f"{vm}.embeddings.class_embedding", "flat")]
    out += w.norm_rules("image/ln_pre", f"{vm}.pre_layrnorm", NAMES)
    out += w.norm_rules("image/encoder/norm", f"{vm}.post_layernorm", NAMES)
    out += w.linear_rules("image_head", "visual_projection", NAMES, bias=False)
    out += w.linear_rules("text_head", "text_projection", NAMES, bias=False)
    return out


# The MAP head's torch nn.MultiheadAttention keeps q/k/v in one in_proj matrix.
_FUSED = (("in_proj_weight", ("q.weight", "k.weight", "v.weight")),
          ("in_proj_bias", ("q.bias", "k.bias", "v.bias")))


def unfuse(state: dict) -> dict:
    for fused, parts in _FUSED:
        state = w.split_fused(state, fused, parts)
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def fuse(state: dict) -> dict:
    for fused, parts in _FUSED:
        state = w.join_fused(state, fused, parts)
    return state


def weights_file(directory) -> list[epath.Path]:
    directory = epath.Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise MissingFileError(f"{directory} holds no *.safetensors or pytorch_model.bin weights.")
    return files


def read_state(directory) -> dict:
    state = {}
    for path in weights_file(directory):
        state.update(w.read_weights(path))
    return unfuse(state)


# ----------------------------------------------------------------------------- export


def check_exportable(cfg: dict) -> str:
    """The HF family of a model config, or a ValueError naming what does not match."""
    family = family_of_model(cfg)
    image, text = cfg["image"], cfg["text"]
    want = (dict(image=dict(pool="map", posemb="learn", head=False, ln_pre=False, patch_bias=True),
                 text=dict(causal=False, pool="last", mask_padding=False, head=True, head_bias=True))
            if family == "siglip" else
            dict(image=dict(pool="tok", posemb="learn", head=True, head_bias=False, ln_pre=True,
                            patch_bias=False),
                 text=dict(causal=True, pool="eos", head=True, head_bias=False)))
    wrong = [f"{tower}.{k}={cfg[tower][k]!r} (needs {v!r})" for tower, fields in want.items()
             for k, v in fields.items() if cfg[tower][k] != v]
    if image.get("rope", "none") != "none":  # neither transformers model rotates q and k
        wrong.append(f"image.rope={image['rope']!r} (needs 'none')")
    width = models.image_config(cfg).width
    if family == "siglip" and cfg.get("embed_dim") not in (None, width):
        wrong.append(f"embed_dim={cfg['embed_dim']} (needs the image width {width})")
    if family == "clip" and text["pad_id"] == text["eos_id"] and text["mask_padding"]:
        wrong.append("text.mask_padding=True with pad_id == eos_id")
    if wrong:
        name = "SiglipModel" if family == "siglip" else "CLIPModel"
        raise ConfigError(f"the model does not match transformers' {name}: {'; '.join(wrong)}.")
    return family


def hf_config(cfg: dict, *, pad_id: int, eos_id: int | None, naflex: bool = False) -> dict:
    """``config.json`` of the transformers model that ``cfg`` matches (with ``naflex`` a
    Siglip2Model, its position table at the image tower's grid)."""
    family = check_exportable(cfg)
    if naflex:
        return _siglip2_config(cfg, pad_id=pad_id, eos_id=eos_id)
    image, text = cfg["image"], cfg["text"]
    isize, tsize = models.image_config(cfg), models.text_config(cfg)
    patch = isize.patch_size[0]  # variants are square: 'B/16' -> (16, 16)
    vision = dict(hidden_size=isize.width, num_hidden_layers=isize.depth,
                  intermediate_size=isize.mlp_dim, num_attention_heads=isize.num_heads,
                  image_size=image["image_size"], patch_size=patch,
                  num_channels=image["channels"], hidden_act=_HF_ACT[image["act"]],
                  layer_norm_eps=image["norm_eps"])
    text_cfg = dict(hidden_size=tsize.width, num_hidden_layers=tsize.depth,
                    intermediate_size=tsize.mlp_dim, num_attention_heads=tsize.num_heads,
                    vocab_size=text["vocab_size"], max_position_embeddings=text["max_len"],
                    hidden_act=_HF_ACT[text["act"]], layer_norm_eps=text["norm_eps"],
                    pad_token_id=pad_id)
    if family == "siglip":
        text_cfg.update(projection_size=cfg["embed_dim"] or isize.width,
                        eos_token_id=eos_id if eos_id is not None else 1,
                        model_type="siglip_text_model")
        vision.update(model_type="siglip_vision_model")
        return dict(architectures=["SiglipModel"], model_type="siglip", text_config=text_cfg,
                    vision_config=vision)
    text_cfg.update(eos_token_id=2 if text["eos_id"] is None else text["eos_id"],
                    bos_token_id=text_cfg.get("bos_token_id", 0), model_type="clip_text_model")
    vision.update(model_type="clip_vision_model")
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=cfg["embed_dim"],
                logit_scale_init_value=math.log(1 / 0.07), text_config=text_cfg,
                vision_config=vision)


def _siglip2_config(cfg: dict, *, pad_id: int, eos_id: int | None) -> dict:
    siglip = hf_config(cfg, pad_id=pad_id, eos_id=eos_id)  # the same towers, SiglipModel's names
    if siglip["model_type"] != "siglip":
        raise ConfigError("a NaFlex export needs the sigmoid (SigLIP) model; this one is CLIP's softmax.")
    vision, text = dict(siglip["vision_config"]), dict(siglip["text_config"])
    grid = models.image_config(cfg).grid
    if grid[0] != grid[1]:
        raise ConfigError(f"the image tower's position table is {grid[0]}x{grid[1]}; Siglip2Model's is a "
                          "square grid: use a square image_size.")
    del vision["image_size"]
    vision.update(num_patches=grid[0] * grid[1], model_type="siglip2_vision_model")
    text.update(model_type="siglip2_text_model")
    return dict(architectures=["Siglip2Model"], model_type=NAFLEX_TYPE, text_config=text,
                vision_config=vision)


# ----------------------------------------------------------------------------- import


def read(directory) -> "Imported":
    """An HF SiglipModel / Siglip2Model / CLIPModel directory as an ``Imported`` (model, weights,
    tokenizer, pp)."""
    from big_contrast.interop import preprocess
    from big_contrast.interop.imported import Imported, expected_shapes, finish_scalars

    directory = epath.Path(directory)
    config = read_config(directory)
    family, naflex = family_of(config), is_naflex(config)
    cfg = model_config(config)
    state = read_state(directory)
    params = w.to_ours(rules(cfg, naflex), state, expected_shapes(cfg), str(directory))
    cfg = finish_scalars(cfg, params)
    pp_path = directory / "preprocessor_config.json"
    pp_config = json.loads(pp_path.read_text()) if pp_path.exists() else {}
    pp = (_naflex_preprocess(pp_config, config) if naflex else
          preprocess.from_hf_preprocessor(pp_config, family))
    return Imported(family, str(directory), cfg, params,
                    tokenizer_of(directory, family, cfg["text"]["max_len"]), pp)


def _naflex_preprocess(pp_config: dict, hf_config: dict) -> dict:
    from big_contrast.interop import preprocess

    pp = preprocess.from_hf_naflex_preprocessor(pp_config)
    patch = hf_config.get("vision_config", {}).get("patch_size", 16)
    if pp["patch_size"] != patch:
        raise ConfigError(f"preprocessor_config.json patch_size={pp['patch_size']} differs from the "
                          f"model's vision_config.patch_size={patch}; fix the processor's patch_size.")
    return pp


_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


def _special(token_config: dict, name: str, default: str) -> str:
    value = token_config.get(name, default)
    return value.get("content", default) if isinstance(value, dict) else (value or default)


def tokenizer_of(directory, family: str, max_len: int) -> dict | None:
    """The tokenizer of an HF directory: ``spiece.model`` (SigLIP) or ``tokenizer.json``
    (CLIP BPE, SigLIP 2's Gemma), with the normalisation transformers applies to it."""
    directory = epath.Path(directory)
    config_path = directory / "tokenizer_config.json"
    token_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    special_path = directory / "special_tokens_map.json"
    if special_path.exists():
        token_config = {**json.loads(special_path.read_text()), **token_config}
    max_len = int(min(token_config.get("model_max_length", max_len), max_len))
    has_spm, has_json = (directory / "spiece.model").exists(), (directory / "tokenizer.json").exists()
    wants_spm = token_config.get("tokenizer_class", "").startswith("SiglipTokenizer")
    if has_spm and (wants_spm or not has_json):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
        pad = sp.piece_to_id(_special(token_config, "pad_token", "</s>"))
        eos = sp.piece_to_id(_special(token_config, "eos_token", "</s>"))
        lower = token_config.get("do_lower_case", True)
        settings = dict(kind="sentencepiece", file="spiece.model", max_len=max_len, pad_id=pad,
                        eos_id=eos, normalize="canonicalize" if lower else "punctuation")
    elif has_json:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        default_pad = "<|endoftext|>" if family == "clip" else "<pad>"
        pad = tok.token_to_id(_special(token_config, "pad_token", default_pad))
        eos = tok.token_to_id(_special(token_config, "eos_token",
                                       "<|endoftext|>" if family == "clip" else "<eos>"))
        if pad is None:
            raise ConfigError(f"{directory}/tokenizer.json has no padding token; set pad_token in "
                              "tokenizer_config.json.")
        # SigLIP 2 was trained on lowercased text: transformers' Siglip2Tokenizer lowercases.
        side = token_config.get("padding_side") or (
            "left" if token_config.get("tokenizer_class") == "Siglip2Tokenizer" else "right")
        settings = dict(kind="tokenizers", file="tokenizer.json", max_len=max_len, pad_id=pad,
                        eos_id=eos, normalize="lower" if family == "siglip" else "none",
                        padding_side=side)
    else:
        return None
    return dict(directory=str(directory), settings=settings,
                extra_files=[f for f in _TOKENIZER_EXTRAS if (directory / f).exists()])


# ----------------------------------------------------------------------------- export


def export(record, cfg: dict, out) -> list[str]:
    """Writes ``record`` (an ``Imported``) as a transformers model directory; the file names."""
    from big_contrast.interop import preprocess

    family = check_exportable(cfg)
    naflex = record.preprocess.get("resize") == "naflex"
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = fuse(w.to_theirs(rules(cfg, naflex), record.params))
    w.write_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    settings = (record.tokenizer or {}).get("settings", {})
    pad_id = settings.get("pad_id", cfg["text"]["pad_id"])
    eos_id = settings.get("eos_id", cfg["text"]["eos_id"])
    (out / "config.json").write_text(json.dumps(hf_config(cfg, pad_id=pad_id, eos_id=eos_id, naflex=naflex),
                                                indent=1))
    pp = preprocess.to_hf_preprocessor(record.preprocess, family)
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=1))
    written = ["model.safetensors", "config.json", "preprocessor_config.json"]
    if record.tokenizer is not None:
        written += _export_tokenizer(record.tokenizer, family, out)
    return written


def _export_tokenizer(tokenizer: dict, family: str, out: epath.Path) -> list[str]:
    directory, settings = epath.Path(tokenizer["directory"]), tokenizer["settings"]
    names = [settings["file"], *(f for f in _TOKENIZER_EXTRAS if (directory / f).exists())]
    for name in names:
        (out / name).write_bytes((directory / name).read_bytes())
    if "tokenizer_config.json" not in names:
        cls = ("SiglipTokenizer" if settings["kind"] == "sentencepiece" else
               "Siglip2Tokenizer" if family == "siglip" else "CLIPTokenizer")
        (out / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class=cls, model_max_length=settings["max_len"]), indent=1))
        names.append("tokenizer_config.json")
    return names
