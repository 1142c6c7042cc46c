"""big-contrast train --config configs/lit_b16.py:IMAGE_WORKDIR --workdir gs://BUCKET/lit_b16

LiT ViT-B/16: a locked, pretrained image tower and a text tower trained from scratch (Zhai et al. 2022).

`IMAGE_WORKDIR` is a workdir (or its checkpoints/ directory) of a run of this project whose
image tower has the same variant; its latest checkpoint's image tower is loaded and frozen
(no gradient through it, no update, no weight decay). Without an argument the image tower is
locked at its random initialisation, which is only useful to smoke-test the config.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg=None):
    config = common.paper_scale_config(total_steps=60_000, max_len=16)
    m = config.model
    m.loss = "softmax"
    m.lock_image = True
    m.image.update(variant="B/16", image_size=224, pool="map", posemb="learn")
    m.text.update(variant="B", vocab_size=32_000, max_len=16, causal=False, pool="last")
    m.embed_dim = 768
    if arg:
        config.init_towers = {"image": arg}
    config.optimizer.update(lr=1e-3, b2=0.95, weight_decay=1e-4, warmup_steps=2000, schedule="cosine")
    config.peak_flops_per_device = 197e12
    return config
