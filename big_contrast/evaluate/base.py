"""What every evaluator shares: the model's embedding callables and the config entry it came from.

An evaluator is built once from its `config.evals.<name>` entry (validating templates, class
names and field names early) and then run as often as wanted:

    evaluator = build_evaluator("imagenet", config.evals.imagenet)
    if evaluator.should_run(step):
        metrics = evaluator.run(data, encoders)   # {'imagenet/top1': 0.42, ...}

`data` comes from the caller's data pipeline, built from `evaluator.data_config` (opaque here):
an iterable of process-local numpy batches, or a dict of whole-dataset arrays.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from big_contrast.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The model as seen by evaluators.

    embed_images: global image batch [B, H, W, C] -> zimg [B, D] (jitted; the batch arrives as a
      jax.Array sharded over batch_axes of mesh when a mesh is given, as numpy otherwise).
    embed_texts: global token batch [B, L] int32 -> ztxt [B, D], same conventions.
    tokenize: list of n strings -> int32 [n, L] (needed for zero-shot prompts and raw-text data).
    scale, bias: the model's logit scale and bias, for the mean-logit diagnostics (optional).
    Embeddings need not be normalised: evaluators L2-normalise them.
    """

    embed_images: Callable[[Any], Any]
    embed_texts: Callable[[Any], Any]
    tokenize: Callable[[list[str]], np.ndarray] | None = None
    mesh: Any = None
    batch_axes: str | tuple[str, ...] | None = None  # None: sharding.batch_axes(mesh)
    scale: float | None = None
    bias: float | None = None
    # (images, texts) -> (greedy ids [B, L], token NLL sums [B], token counts [B]): the model's
    # captioning decoder (SigLIP 2), or None without one; see evaluate/captioning.py.
    caption: Callable[[Any, Any], Any] | None = None


COMMON_DEFAULTS = {
    "type": None,
    "data": None,          # handed to the data pipeline by the caller; not read here
    "every_steps": 0,      # run from the trainer every N steps; 0 = only at the end / standalone
    "prefix": None,        # metric-name prefix; defaults to the evaluator's name
    "batch_size": 256,     # global batch size for embedding
}


def _as_dict(config) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


class Evaluator(abc.ABC):
    """Base class: parses the config entry; subclasses declare DEFAULTS and implement `evaluate`."""

    TYPE: str = ""
    DEFAULTS: Mapping[str, Any] = {}
    # The config keys that select data; with several, `run` gets {key: data} (few-shot: train, test).
    DATA_KEYS: tuple[str, ...] = ("data",)

    def __init__(self, name: str, config: Mapping[str, Any] | Any = ()):
        settings = {**COMMON_DEFAULTS, **self.DEFAULTS}
        given = _as_dict(config)
        unknown = sorted(set(given) - set(settings))
        if unknown:
            raise ConfigError(f"Evaluator {name!r} ({self.TYPE}) has unknown config keys {unknown}; "
                             f"the known ones are {sorted(settings)}.")
        settings.update(given)
        self.name = name
        self.config = settings
        self.prefix = settings["prefix"] or name
        self.every_steps = int(settings["every_steps"])
        self.batch_size = int(settings["batch_size"])
        self.data_config = settings["data"]
        if self.batch_size < 1 or self.every_steps < 0:
            raise ConfigError(f"Evaluator {name!r}: batch_size must be >= 1 and every_steps >= 0; got "
                             f"{self.batch_size} and {self.every_steps}.")

    @property
    def context(self) -> str:
        return f"evaluator {self.name!r} ({self.TYPE})"

    def should_run(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    @abc.abstractmethod
    def evaluate(self, data, encoders: Encoders) -> dict[str, float]:
        """Metrics without the prefix."""

    def run(self, data, encoders: Encoders) -> dict[str, float]:
        """Metrics named '<prefix>/<metric>', floats."""
        return {f"{self.prefix}/{k}": float(v) for k, v in self.evaluate(data, encoders).items()}


def l2_normalize(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def check_ks(ks: Sequence[int], context: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ConfigError(f"{context}: ks must be positive integers; got {ks}.")
    return ks
