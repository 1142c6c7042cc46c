"""The shipped paper-scale configs: loadable the way the CLI loads them, bf16 compute by default."""
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_like_the_cli(name):
    """ml_collections' config_flags imports the file by path (its folder is not on sys.path)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values)
    values(["prog", f"--config={REPO / 'configs' / name}.py"])
    return values.config


@pytest.mark.parametrize("name", ["clip_b16", "siglip_b16", "lit_b16"])
def test_paper_scale_configs_compute_in_bfloat16_with_float32_parameters(name):
    config = load_like_the_cli(name)
    assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
    assert config.batch_size == config.data.batch_size == 32_768
    assert config.data.pp_train.startswith("decode|random_resized_crop(224")
