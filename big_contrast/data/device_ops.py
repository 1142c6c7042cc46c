"""The final value op of an image pp string, applied on the accelerator to uint8 images.

A float32 image is 4x the bytes of its uint8 pixels, on the host (conversion, batch stacking,
shared memory between grain workers) and on the way to the devices. With
`config.data.device_normalize`, the pipeline runs the pp string without its final
`value_range(...)` / `normalize(...)` and yields uint8 images; the jitted train step and the
evaluators' embed functions apply that op with `normalize_on_device`. It computes the host op's
float32 formula (`image_ops.value_range` / `image_ops.normalize`), so both paths give the same
numbers, and it leaves float images untouched, so a step built for one path runs the other.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np

VALUE_OPS = ("value_range", "normalize")


@dataclasses.dataclass(frozen=True)
class DeviceNormalization:
    """`value_range(vmin, vmax)` or `normalize(mean, std)` as a hashable, jit-static value."""

    name: str
    params: tuple

    def __call__(self, images):
        x = images.astype(jnp.float32)
        if self.name == "value_range":
            vmin, vmax = self.params
            return x * np.float32((vmax - vmin) / 255.0) + np.float32(vmin)
        mean, std = self.params
        return (x - np.asarray(mean, np.float32) * 255.0) / (np.asarray(std, np.float32) * 255.0)


def device_normalization(spec: str) -> DeviceNormalization | None:
    """The final op of `spec` if it is a value op, else None (host side: parses the pp string)."""
    from big_contrast.data import image_ops  # OpenCV / Pillow: not needed by the step itself

    name, kwargs = image_ops.parse_image_pp(spec).ops[-1]
    if name not in VALUE_OPS:
        return None
    args = {k: p.default for k, p in inspect.signature(image_ops.OPS[name]).parameters.items()
            if p.kind == p.KEYWORD_ONLY}
    args.update(kwargs)
    if name == "value_range":
        return DeviceNormalization(name, (float(args["vmin"]), float(args["vmax"])))
    return DeviceNormalization(name, (tuple(map(float, args["mean"])), tuple(map(float, args["std"]))))


def host_spec(spec: str, device_normalize: bool) -> str:
    """The part of `spec` the host runs: all of it, or all but a final value op."""
    if not device_normalize or device_normalization(spec) is None:
        return spec
    return "|".join([p for p in spec.split("|") if p.strip()][:-1])


def normalize_on_device(images: jax.Array, norm: DeviceNormalization | None) -> jax.Array:
    """uint8 images -> float32 through `norm`; float images (normalised on the host) and a
    missing `norm` (a pp string without a value op) leave them as they are."""
    if norm is None or images.dtype != jnp.uint8:
        return images
    return norm(images)
