"""big_vision SigLIP ``.npz`` checkpoints in and out.

big_vision's layout is this project's own (flax kernels ``[in, out]``, attention kernels
``[D, H, D/H]`` / ``[H, D/H, D]``), so every weight maps with its shape unchanged; only the
names differ: ``params/img/Transformer/encoderblock_{i}/LayerNorm_0``, ``.../MlpBlock_0/
Dense_0``, ``img/MAPHead_0``, ``txt/Embed_0``, ``txt/Encoder_0/...``, ``txt/head``, ``t``
(log-scale), ``b`` (bias). The ``.npz`` carries no architecture, hence ``--arch``:

    "B/16,B"                          image variant, text variant (big_vision names)
    "B/16,B,vocab=32000,size=224,len=64,pad=1,eos=1"   with the defaults spelled out
    "mu/8,mu,img_depth=2,txt_mlp_dim=64"   size overrides (width, depth, mlp_dim, num_heads)

SigLIP's text is padded to 64 with id 1 (big_vision's ``tok(..., pad_value=1)``, EOS 1) and
pooled at the last position with no padding mask. The file has no tokenizer: set
``config.data.tokenizer`` to the checkpoint's sentencepiece model.
"""
from __future__ import annotations

import numpy as np
from etils import epath

from big_contrast.errors import ConfigError
from big_contrast.interop import weights as w
from big_contrast.interop.hf import check_exportable, size_fields
from big_contrast.models import variants

ARCH_DEFAULTS = dict(vocab=32000, size=224, len=64, pad=1, eos=1)
SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads")
ARCH_OPTIONS = (*ARCH_DEFAULTS, *(f"{t}_{f}" for t in ("img", "txt") for f in SIZE_FIELDS))
NAMES = dict(block="/encoderblock_", norm1="LayerNorm_0", norm2="LayerNorm_1",
             q="MultiHeadDotProductAttention_0/query", k="MultiHeadDotProductAttention_0/key",
             v="MultiHeadDotProductAttention_0/value", out="MultiHeadDotProductAttention_0/out",
             fc1="MlpBlock_0/Dense_0", fc2="MlpBlock_0/Dense_1", w="kernel", b="bias",
             scale="scale")


def parse_arch(arch: str) -> dict:
    """``"B/16,B,vocab=32000,..."`` -> this project's model options for a big_vision SigLIP."""
    parts = [p.strip() for p in arch.split(",") if p.strip()]
    if len(parts) < 2 or "=" in parts[0] or "=" in parts[1]:
        raise ConfigError(f"--arch {arch!r}: start with the image and text variants, e.g. "
                          "'B/16,B' or 'So400m/14,So400m,vocab=32000,size=224'.")
    options = dict(ARCH_DEFAULTS)
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key not in ARCH_OPTIONS or not value.isdigit():
            raise ConfigError(f"--arch option {part!r} is unknown; use integer options among "
                              f"{ARCH_OPTIONS}.")
        options[key] = int(value)
    isize, patch = variants.decode_image_variant(parts[0])
    tsize = variants.decode_text_variant(parts[1])
    isize = variants.with_overrides(isize, **{f: options.get(f"img_{f}") for f in SIZE_FIELDS})
    tsize = variants.with_overrides(tsize, **{f: options.get(f"txt_{f}") for f in SIZE_FIELDS})
    image = dict(size_fields(**vars(isize), patch=patch), image_size=options["size"], pool="map",
                 posemb="learn", head=False)
    text = dict(size_fields(**vars(tsize)), vocab_size=options["vocab"], max_len=options["len"],
                causal=False, pool="last", mask_padding=False, pad_id=options["pad"],
                eos_id=options["eos"], head=True, head_bias=True)
    return dict(image=image, text=text, embed_dim=isize.width, loss="sigmoid")


def _tower_rules(ours: str, theirs: str, encoder: str, depth: int) -> list[w.Rule]:
    rules = w.encoder_rules(f"{ours}/encoder", f"{theirs}/{encoder}", depth, NAMES)
    return rules + w.norm_rules(f"{ours}/encoder/norm", f"{theirs}/{encoder}/encoder_norm", NAMES)


def rules(cfg: dict) -> list[w.Rule]:
    from big_contrast.interop.hf import depths

    image_depth, text_depth = depths(cfg)
    R = w.Rule
    out = [R("image/embedding/kernel", "img/embedding/kernel"),
           R("image/embedding/bias", "img/embedding/bias"),
           R("image/posemb", "img/pos_embedding"),
           R("image/map_head/probe", "img/MAPHead_0/probe"),
           R("text/embedding/embedding", "txt/Embed_0/embedding"),
           R("text/posemb", "txt/pos_embedding"),
           R("text_head/kernel", "txt/head/kernel"), R("text_head/bias", "txt/head/bias"),
           R("log_scale", "t", "flat"), R("bias", "b", "flat")]
    out += _tower_rules("image", "img", "Transformer", image_depth)
    out += _tower_rules("text", "txt", "Encoder_0", text_depth)
    head = "img/MAPHead_0"
    for mine, theirs in (("query", "query"), ("key", "key"), ("value", "value"), ("out", "out")):
        for leaf in ("kernel", "bias"):
            out.append(R(f"image/map_head/attention/{mine}/{leaf}",
                         f"{head}/MultiHeadDotProductAttention_0/{theirs}/{leaf}"))
    out += [R("image/map_head/norm/scale", f"{head}/LayerNorm_0/scale"),
            R("image/map_head/norm/bias", f"{head}/LayerNorm_0/bias")]
    for i in (0, 1):
        for leaf in ("kernel", "bias"):
            out.append(R(f"image/map_head/mlp/fc{i + 1}/{leaf}", f"{head}/MlpBlock_0/Dense_{i}/{leaf}"))
    # big_vision's layout is ours: only the names change ('/'-joined), and the shapes of t, b ([1]).
    return [R(r.ours, r.theirs.replace(".", "/"), "flat" if r.ours in ("log_scale", "bias") else "id")
            for r in out]


def read(path, arch: str):
    from big_contrast.interop import preprocess
    from big_contrast.interop.imported import Imported, expected_shapes, finish_scalars

    cfg = parse_arch(arch)
    state = {k.removeprefix("params/"): v for k, v in w.read_weights(path).items()}
    params = w.to_ours(rules(cfg), state, expected_shapes(cfg), str(path))
    cfg = finish_scalars(cfg, params)
    size = cfg["image"]["image_size"]
    pp = dict(preprocess.SIGLIP, size=[size, size])
    return Imported("siglip", str(path), cfg, params, None, pp)


def export(record, cfg: dict, out) -> list[str]:
    if check_exportable(cfg) != "siglip":
        raise ConfigError("--to npz writes big_vision SigLIP checkpoints; this model uses the "
                          "softmax loss (CLIP): export it with --to hf.")
    state = {f"params/{k}": v for k, v in w.to_theirs(rules(cfg), record.params).items()}
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.savez(f, **state)
    return [out.name]
