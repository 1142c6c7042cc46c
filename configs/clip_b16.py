"""big-contrast train --config configs/clip_b16.py --workdir gs://BUCKET/clip_b16

CLIP ViT-B/16: softmax (InfoNCE) loss, class-token pooling, causal text tower (Radford et al. 2021).

Batch 32k with the ring loss engine; learnable temperature initialised at 1/0.07 and
clamped at 100. Defaults read the built-in demo data at 224 px with byte-level tokens; point
config.data at your data (see big_contrast/train/config.py).
"""

import os
import sys

from big_contrast.train import apply_arg

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg=None):
    config = common.paper_scale_config(total_steps=400_000, max_len=77)
    m = config.model
    m.loss = "softmax"
    m.image.update(variant="B/16", image_size=224, pool="tok", posemb="learn")
    m.text.update(variant="B", vocab_size=49_408, max_len=77, causal=True)
    m.embed_dim = 512
    config.optimizer.update(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, warmup_steps=2000,
                            schedule="cosine")
    config.peak_flops_per_device = 989e12  # H100 bf16 dense; set your chip's peak
    apply_arg(config, arg)  # e.g. configs/clip_b16.py:batch_size=65536,total_steps=1000
    return config
