"""big-contrast train --config configs/siglip_so400m14.py --workdir gs://BUCKET/so400m

SigLIP So400m/14: the shape-optimised ViT (Alabdulmohsin et al. 2023) with a sigmoid loss.

Parameters are FSDP-sharded over 'fsdp' (mesh 'data' x 'fsdp'), activations rematerialised
and layers scanned; micro-batch gradient caching bounds activation memory. Run
`big-contrast plan --config configs/siglip_so400m14.py --device_memory_gb 95` to size the
micro-batch for your chips. Defaults read the demo data at 224 px (see big_contrast/train/config.py).
"""

from big_contrast.train import apply_arg, default_config, use_real_data_defaults


def get_config(arg=None):
    config = default_config()
    config.batch_size = 32_768
    config.microbatch_size = 64
    config.total_steps = 150_000
    config.log_every = 50
    config.checkpoint_every = 1000
    config.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))
    m = config.model
    m.loss = "sigmoid"
    m.image.update(variant="So400m/14", image_size=224, pool="map", posemb="learn")
    m.text.update(variant="So400m", vocab_size=32_000, max_len=64, causal=False, pool="last")
    m.embed_dim = 1152
    m.dtype = "bfloat16"
    m.remat = "dots_with_no_batch_dims_saveable"
    m.scan_layers = True
    config.optimizer.update(lr=1e-3, b2=0.95, weight_decay=1e-4, warmup_steps=5000, schedule="rsqrt",
                            rsqrt_timescale=10_000)
    config.peak_flops_per_device = 459e12  # TPU v5p bf16
    config = use_real_data_defaults(config, max_len=64)
    apply_arg(config, arg)  # e.g. configs/siglip_so400m14.py:batch_size=65536,total_steps=1000
    return config
