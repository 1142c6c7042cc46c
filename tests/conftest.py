"""Test set-up: eight simulated CPU devices, set before jax is imported anywhere, and a
persistent compilation cache shared by the tests and the training processes they start
(several tests compile the same demo step; the cache turns the repeats into loads)."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")


def encoded_image(rgb, fmt: str = "PNG", size=(6, 5)) -> bytes:
    """A solid-colour image file's bytes (PNG or JPEG), for sources the tests write."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()
