"""The device-side value op for uint8 images against the host ops it replaces."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from big_contrast.data import parse_image_pp
from big_contrast.data.device_ops import device_normalization, host_spec, normalize_on_device

SPECS = ["decode|flip_lr(p=1.0)|value_range", "decode|value_range(0, 2)", "decode|normalize",
         "decode|normalize(mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 1.0))"]


def test_host_spec_drops_only_a_final_value_op():
    assert host_spec("decode|resize(8)|value_range(-1, 1)", True) == "decode|resize(8)"
    assert host_spec("decode|resize(8)|value_range(-1, 1)", False) == "decode|resize(8)|value_range(-1, 1)"
    assert host_spec("decode | normalize", True) == "decode "
    assert host_spec("decode|resize(8)", True) == "decode|resize(8)"
    assert device_normalization("decode|resize(8)") is None


@pytest.mark.parametrize("spec", SPECS)
def test_normalize_on_device_equals_the_host_op(spec):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    on_host = parse_image_pp(spec)(data, rng)
    pixels = parse_image_pp(host_spec(spec, True))(data, rng)
    assert pixels.dtype == np.uint8 and on_host.dtype == np.float32
    norm = device_normalization(spec)
    on_device = jax.jit(normalize_on_device, static_argnums=1)(jnp.asarray(pixels)[None], norm)[0]
    assert on_device.dtype == jnp.float32
    np.testing.assert_allclose(on_device, on_host, rtol=1e-6, atol=1e-6)
    # Float images (normalised on the host already) pass through untouched.
    np.testing.assert_array_equal(normalize_on_device(jnp.asarray(on_host), norm), on_host)
