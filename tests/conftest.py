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

# Object-store emulators on loopback (GCS, S3; started once per session, always stopped).
from cloud_fixtures import gcs_emulator, gcs_server, s3_emulator, s3_server  # noqa: E402,F401
