"""big-contrast train --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16

SigLIP ViT-B/16: pairwise-sigmoid loss, MAP pooling, bidirectional text tower (Zhai et al. 2023).

Batch 32k over all devices of the mesh with the ring loss engine. Defaults read the built-in
demo data at 224 px with byte-level tokens so the config runs anywhere; point
config.data.sources / config.data.tokenizer at your data (see big_contrast/train/config.py).
Larger batches: --config.batch_size=1048576 --config.microbatch_size=... (`big-contrast plan`
prints the largest micro-batch that fits).
"""

import os
import sys

from big_contrast.train import apply_arg

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg=None):
    config = common.paper_scale_config(total_steps=107_000, max_len=64)  # ~3.5B examples at 32k
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    m = config.model
    m.loss = "sigmoid"
    m.image.update(variant="B/16", image_size=224, pool="map", posemb="learn")
    m.text.update(variant="B", vocab_size=32_000, max_len=64, causal=False, pool="last")
    m.embed_dim = 768
    config.optimizer.update(lr=1e-3, b2=0.95, weight_decay=1e-4, warmup_steps=5000, schedule="cosine")
    config.peak_flops_per_device = 197e12  # TPU v5e bf16; set your chip's peak
    apply_arg(config, arg)  # e.g. configs/siglip_b16.py:batch_size=65536,total_steps=1000
    return config
