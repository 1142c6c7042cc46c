"""open_clip checkpoints (``.safetensors`` / ``.bin``) with their model config (``--arch``).

``--arch`` is an open_clip model-config name (``ViT-B-32``, ``ViT-B-16-SigLIP``; read from
open_clip's installed ``model_configs/`` without importing it, so no torch) or the path of
such a JSON file. Two tower kinds are built:

* open_clip's own ViT (CLIP): ``visual.conv1`` (no bias), class token, ``ln_pre``,
  ``transformer.resblocks`` with a fused ``in_proj``, ``ln_post``, ``proj`` ``[D, E]``;
* timm's SigLIP ViT (``timm_model_name: vit_<size>_patch<P>_siglip_<res>``, MAP pooling,
  exact GELU, LayerNorm eps 1e-6): ``visual.trunk.*``.

Tokenizer: open_clip's own CLIP BPE (``SimpleTokenizer``, rebuilt as a ``tokenizer.json``
from the vocabulary file open_clip ships) for configs without ``hf_tokenizer_name``;
SigLIP configs name a hub tokenizer, which is not downloaded: pass ``--tokenizer DIR``.

The text tower is open_clip's ``TextTransformer`` (``text.*`` when ``custom_text``), pooled
by the largest id (``argmax``), the first EOS or the last position, with exact GELU (or
QuickGELU with ``quick_gelu``, tanh with ``act_kwargs``) and eps 1e-5 unless ``norm_kwargs``
says otherwise. A config field with no counterpart here (a ResNet tower, CoCa's decoder, an
HF text tower, layer scale, ...) fails with a sentence naming it.
"""
from __future__ import annotations

import importlib.util
import json
import re

from etils import epath

from big_contrast import models
from big_contrast.errors import ConfigError
from big_contrast.interop import weights as w
from big_contrast.interop.hf import size_fields

NAMES = dict(block=".transformer.resblocks.", norm1="ln_1", norm2="ln_2", q="attn.q",
             k="attn.k", v="attn.v", out="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj",
             w="weight", b="bias")
TIMM_NAMES = dict(NAMES, block=".blocks.", norm1="norm1", norm2="norm2", out="attn.proj",
                  fc1="mlp.fc1", fc2="mlp.fc2")
TIMM_SIZES = {"mu": "mu", "tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L",
              "so400m": "So400m", "huge": "H", "giant": "g"}
_ANY = object()
# field -> the values this project builds (_ANY: any value; a tuple: one of them).
TOP_FIELDS = dict(embed_dim=_ANY, quick_gelu=_ANY, custom_text=_ANY, init_logit_bias=_ANY,
                  init_logit_scale=_ANY, vision_cfg=_ANY, text_cfg=_ANY)
VISION_FIELDS = dict(
    layers=_ANY, width=_ANY, head_width=_ANY, mlp_ratio=_ANY, patch_size=_ANY, image_size=_ANY,
    patch_dropout=_ANY, output_tokens=_ANY, act_kwargs=_ANY, norm_kwargs=_ANY,
    pool_type=("tok",), attentional_pool=(False,), no_ln_pre=(False,), final_ln_after_pool=(False,),
    pos_embed_type=("learnable",), ls_init_value=(None,), timm_model_name=_ANY,
    timm_model_pretrained=_ANY, timm_pool=("map", "avg"), timm_proj=("none", "linear"),
    timm_proj_bias=_ANY, timm_drop=_ANY, timm_drop_path=_ANY)
TEXT_FIELDS = dict(
    context_length=_ANY, vocab_size=_ANY, hf_tokenizer_name=_ANY, tokenizer_kwargs=_ANY,
    width=_ANY, heads=_ANY, layers=_ANY, mlp_ratio=_ANY, pad_id=_ANY, eos_id=_ANY,
    no_causal_mask=_ANY, proj_bias=_ANY, output_tokens=_ANY, act_kwargs=_ANY, norm_kwargs=_ANY,
    pool_type=("argmax", "last", "eos"), proj_type=("linear", "none"), ls_init_value=(None,),
    embed_cls=(False,), final_ln_after_pool=(False,), tokenizer_mode=(None,))


def arch_config(arch: str) -> dict:
    """The model-config JSON of ``arch`` (a file path, or a name in open_clip's model_configs)."""
    path = epath.Path(arch)
    if not arch.endswith(".json"):
        spec = importlib.util.find_spec("open_clip")  # locates the package, does not import it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"--arch {arch!r}: open_clip is not installed, so its model configs "
                              "cannot be read; pass the model-config JSON file instead.")
        path = epath.Path(spec.submodule_search_locations[0]) / "model_configs" / f"{arch}.json"
    if not path.exists():
        raise ConfigError(f"--arch {arch!r}: no open_clip model config {path}; use a name from "
                          "open_clip.list_models() or a JSON path.")
    return json.loads(path.read_text())


def _check_fields(where: str, given: dict, known: dict) -> None:
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"open_clip {where}.{key} has no counterpart in this project.")
        allowed = known[key]
        if allowed is not _ANY and value not in allowed:
            raise ConfigError(f"open_clip {where}.{key}={value!r} has no counterpart here "
                              f"(supported: {allowed}).")


def _act(tower: dict, quick_gelu: bool) -> str:
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if (tower.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"


def _eps(tower: dict, default: float) -> float:
    return float((tower.get("norm_kwargs") or {}).get("eps", default))


def model_config(arch: dict) -> dict:
    """This project's model options for an open_clip model config."""
    _check_fields("config", arch, TOP_FIELDS)
    v, t = arch.get("vision_cfg", {}), arch.get("text_cfg", {})
    _check_fields("vision_cfg", v, VISION_FIELDS)
    _check_fields("text_cfg", t, TEXT_FIELDS)
    embed_dim, quick = arch["embed_dim"], arch.get("quick_gelu", False)
    image = _timm_image(v) if v.get("timm_model_name") else _clip_image(v, quick)
    image["head"] = image["head"] and embed_dim is not None
    text = dict(size_fields(t.get("width", 512), t.get("layers", 12),
                            int(t.get("width", 512) * t.get("mlp_ratio", 4.0)),
                            t.get("heads", 8)),
                vocab_size=t.get("vocab_size", 49408), max_len=t.get("context_length", 77),
                causal=not t.get("no_causal_mask", False), mask_padding=False,
                act=_act(t, quick), norm_eps=_eps(t, 1e-5), pad_id=t.get("pad_id", 0),
                head=t.get("proj_type", "linear") != "none", head_bias=t.get("proj_bias", False))
    pool = t.get("pool_type", "argmax")
    text.update(pool="last" if pool == "last" else "eos",
                eos_id=None if pool == "argmax" else t.get("eos_id", 2))
    loss = "sigmoid" if "init_logit_bias" in arch else "softmax"
    return dict(image=image, text=text, embed_dim=embed_dim, loss=loss)


def _clip_image(v: dict, quick: bool) -> dict:
    if not isinstance(v.get("layers", 12), int):
        raise ConfigError(f"open_clip vision_cfg.layers={v['layers']!r} is a ResNet tower, which "
                          "has no counterpart in this project (ViT towers only).")
    width = v.get("width", 768)
    return dict(size_fields(width, v.get("layers", 12), int(width * v.get("mlp_ratio", 4.0)),
                            width // v.get("head_width", 64), v.get("patch_size", 16)),
                image_size=_square(v.get("image_size", 224)), pool="tok", posemb="learn", ln_pre=True,
                patch_bias=False, head=True, head_bias=False, act=_act(v, quick),
                norm_eps=_eps(v, 1e-5))


def _square(size) -> int:
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ConfigError(f"open_clip vision_cfg.image_size={size!r} is not square; the imported "
                      "config takes one image size.")


def _timm_image(v: dict) -> dict:
    name = v["timm_model_name"]
    match = re.fullmatch(r"vit_([a-z0-9]+)_patch(\d+)_siglip(_gap)?_(\d+)", name)
    if not match or match.group(1) not in TIMM_SIZES:
        raise ConfigError(f"open_clip vision_cfg.timm_model_name={name!r} has no counterpart "
                          "here; timm towers of the form vit_<size>_patch<P>_siglip_<res> are built.")
    size, patch, gap, _ = match.groups()
    pool = "gap" if gap or v.get("timm_pool") == "avg" else "map"
    return dict(variant=f"{TIMM_SIZES[size]}/{patch}", image_size=_square(v.get("image_size", 224)),
                pool=pool, posemb="learn", head=v.get("timm_proj", "linear") != "none",
                head_bias=v.get("timm_proj_bias", False), act="gelu", norm_eps=1e-6)


def rules(cfg: dict, arch: dict) -> list[w.Rule]:
    from big_contrast.interop.hf import depths

    image_depth, text_depth = depths(cfg)
    R = w.Rule
    timm = bool(arch.get("vision_cfg", {}).get("timm_model_name"))
    txt = "text." if arch.get("custom_text") else ""
    out = [R("text/embedding/embedding", f"{txt}token_embedding.weight"),
           R("text/posemb", f"{txt}positional_embedding", "lead1"),
           R("log_scale", "logit_scale", "flat")]
    if cfg["loss"] == "sigmoid":
        out.append(R("bias", "logit_bias", "flat"))
    out += w.encoder_rules("text/encoder", txt.rstrip("."), text_depth, NAMES)
    out += w.norm_rules("text/encoder/norm", f"{txt}ln_final", NAMES)
    if cfg["text"]["head"]:
        if cfg["text"]["head_bias"]:
            out += w.linear_rules("text_head", f"{txt}text_projection", NAMES)
        else:
            out.append(R("text_head/kernel", f"{txt}text_projection"))
    out += _timm_rules(cfg, image_depth) if timm else _clip_image_rules(image_depth)
    return [R(r.ours, r.theirs.lstrip("."), r.kind) for r in out]


def _clip_image_rules(depth: int) -> list[w.Rule]:
    R = w.Rule
    out = [R("image/embedding/kernel", "visual.conv1.weight", "conv"),
           R("image/cls", "visual.class_embedding", "flat"),
           R("image/posemb", "visual.positional_embedding", "lead1"),
           R("image_head/kernel", "visual.proj")]
    out += w.norm_rules("image/ln_pre", "visual.ln_pre", NAMES)
    out += w.encoder_rules("image/encoder", "visual", depth, NAMES)
    return out + w.norm_rules("image/encoder/norm", "visual.ln_post", NAMES)


def _timm_rules(cfg: dict, depth: int) -> list[w.Rule]:
    R, trunk = w.Rule, "visual.trunk"
    out = [R("image/embedding/kernel", f"{trunk}.patch_embed.proj.weight", "conv"),
           R("image/embedding/bias", f"{trunk}.patch_embed.proj.bias"),
           R("image/posemb", f"{trunk}.pos_embed")]
    out += w.encoder_rules("image/encoder", trunk, depth, TIMM_NAMES)
    out += w.norm_rules("image/encoder/norm", f"{trunk}.norm", NAMES)
    if cfg["image"]["pool"] == "map":
        pool = f"{trunk}.attn_pool"
        out.append(R("image/map_head/probe", f"{pool}.latent"))
        out += w.attention_rules("image/map_head/attention", pool,
                                 dict(NAMES, q="q", k="k", v="v", out="proj"))
        out += w.norm_rules("image/map_head/norm", f"{pool}.norm", NAMES)
        out += w.linear_rules("image/map_head/mlp/fc1", f"{pool}.mlp.fc1", NAMES)
        out += w.linear_rules("image/map_head/mlp/fc2", f"{pool}.mlp.fc2", NAMES)
    if cfg["image"]["head"]:
        out += w.linear_rules("image_head", "visual.head.proj", NAMES,
                              bias=cfg["image"]["head_bias"])
    return out


_FUSED = (("attn.in_proj_weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),
          ("attn.in_proj_bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")),
          ("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),
          ("attn.qkv.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")),
          ("attn_pool.kv.weight", ("attn_pool.k.weight", "attn_pool.v.weight")),
          ("attn_pool.kv.bias", ("attn_pool.k.bias", "attn_pool.v.bias")))


CLIP_VOCAB_SIZE = 49408
CLIP_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer_json(bpe_path, out_path) -> tuple[int, int]:
    """open_clip's ``SimpleTokenizer`` (the OpenAI CLIP BPE shipped with open_clip) as a
    ``tokenizer.json`` for the ``tokenizers`` library; returns its (vocab size, EOT id)."""
    import gzip

    import tokenizers
    from tokenizers import Regex, pre_tokenizers, processors

    lines = gzip.decompress(epath.Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    alphabet = sorted(alphabet, key=_BYTE_ORDER.__getitem__)
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    ids = {token: i for i, token in enumerate(vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(ids, merges, end_of_word_suffix="</w>"))
    tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    sot, eot = ids["<start_of_text>"], ids["<end_of_text>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>",
        special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)])
    epath.Path(out_path).write_text(tok.to_str())
    return len(vocab), eot


def _byte_order() -> dict[str, int]:
    """GPT-2's bytes_to_unicode order (printable bytes first), which open_clip's vocab uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b not in printable:
            chars[b] = 256 + extra
            extra += 1
        else:
            chars[b] = b
    order = printable + [b for b in range(256) if b not in printable]
    return {chr(chars[b]): i for i, b in enumerate(order)}


_BYTE_ORDER = _byte_order()


def clip_tokenizer(directory, max_len: int) -> dict | None:
    """The tokenizer record of open_clip's own CLIP tokenizer, written into ``directory``
    (None when open_clip's BPE file is not installed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    bpe = epath.Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.exists():
        return None
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, eot = clip_tokenizer_json(bpe, directory / "tokenizer.json")
    settings = dict(kind="tokenizers", file="tokenizer.json", max_len=max_len, pad_id=0,
                    eos_id=eot, normalize="clip", padding_side="right")
    return dict(directory=str(directory), settings=settings)


def read(path, arch_name: str):
    from big_contrast.interop import preprocess
    from big_contrast.interop.imported import Imported, expected_shapes, finish_scalars

    arch = arch_config(arch_name)
    cfg = model_config(arch)
    state = w.read_weights(path)
    for fused, parts in _FUSED:
        state = w.split_fused(state, fused, parts)
    params = w.to_ours(rules(cfg, arch), state, expected_shapes(cfg), str(path))
    cfg = finish_scalars(cfg, params)
    size = [cfg["image"]["image_size"]] * 2
    family = models.family(cfg["loss"])
    # open_clip's eval transform: SigLIP resizes to the square ('squash'), CLIP resizes the
    # shorter side and centre-crops; both bicubic.
    pp = (dict(preprocess.SIGLIP, size=size) if family == "siglip" else
          dict(preprocess.CLIP, size=size[0], crop=size))
    text_cfg = arch.get("text_cfg", {})
    clean = (text_cfg.get("tokenizer_kwargs") or {}).get("clean")
    tokenizer = None
    if not text_cfg.get("hf_tokenizer_name") and cfg["text"]["vocab_size"] == CLIP_VOCAB_SIZE:
        import tempfile  # open_clip's own CLIP BPE; write_workdir copies it into W/tokenizer

        tokenizer = clip_tokenizer(tempfile.mkdtemp(prefix="clip_bpe_"), cfg["text"]["max_len"])
    return Imported(family, str(path), cfg, params, tokenizer, pp,
                    text_normalize="canonicalize" if clean == "canonicalize" else None)
