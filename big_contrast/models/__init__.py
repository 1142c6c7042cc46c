"""Dual-encoder models: ViT image tower, text transformer, two-tower wrapper, registry.

    from big_contrast import models
    model = models.create(models.default_model_config())       # unsharded
    model = models.create_sharded(config, mesh)                  # params born sharded
    out = model(images=images_bhwc, texts=tokens_bl)             # Embeddings(zimg, ztxt, scale, bias)
    models.count_params(model)                                   # {'image': ..., 'text': ..., 'total': ...}
    models.image_config(config)                                  # the frozen ViTConfig (text_config: TextConfig)
    vit = models.ViT(models.ViTConfig(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12),
                     rngs=nnx.Rngs(0))                           # one tower, whole config in
"""
from big_contrast.models.registry import (
    LOSS_DEFAULTS,
    abstract_model,
    count_params,
    create,
    create_from_params,
    create_image_tower,
    create_sharded,
    create_text_tower,
    decoder_config,
    default_model_config,
    family,
    frozen_mask,
    image_config,
    load_tower_params,
    num_params,
    resolve_config,
    text_config,
)
from big_contrast.models.text import TextConfig, TextTransformer
from big_contrast.models.two_towers import Embeddings, TwoTowers, l2_normalize
from big_contrast.models.variants import SIZES, decode_image_variant, decode_text_variant
from big_contrast.models.vit import ViT, ViTConfig

__all__ = [
    "LOSS_DEFAULTS", "SIZES", "Embeddings", "TextConfig", "TextTransformer", "TwoTowers", "ViT",
    "ViTConfig", "family", "image_config", "text_config",
    "abstract_model", "count_params", "create", "create_from_params", "create_image_tower",
    "create_sharded", "create_text_tower", "decode_image_variant", "decoder_config", "decode_text_variant", "default_model_config",
    "frozen_mask", "l2_normalize", "load_tower_params", "num_params", "resolve_config",
]
