"""The block the paper-scale configs share (as big_vision's configs/proj/image_text/common.py).

A config imports it with the two lines below (config files are loaded by path, so their folder
is not on `sys.path` by itself):

    sys.path.insert(0, os.path.dirname(__file__))
    import common
"""

from big_contrast.train import default_config, use_real_data_defaults


def paper_scale_config(*, total_steps: int, max_len: int):
    """32k global batch, log every 50 / checkpoint every 1,000 steps, bf16 compute with f32
    parameters and optimizer state (matmuls accumulate in f32, the loss engine runs in f32),
    uint8 images normalised on the device, and 224 px preprocessing with byte-level tokens on
    the demo data, so the config runs as-is."""
    config = default_config()
    config.batch_size = 32_768
    config.total_steps = total_steps
    config.log_every = 50
    config.checkpoint_every = 1000
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.data.device_normalize = True  # uint8 images to the devices, value_range there
    return use_real_data_defaults(config, max_len=max_len)
