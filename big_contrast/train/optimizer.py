"""Optimizer from config: AdamW, schedules, clipping, and regex rules over parameter paths.

Parameter paths are '/'-joined (`image/encoder/blocks/0/mlp/fc1/kernel`, `log_scale`, `bias`).
The same regex rules, big_vision style, serve two purposes:

* `config.lr_mults = (("image/.*", 0.1), ...)`: the first full match scales the learning
  rate of a parameter; a multiplier of 0 freezes it (no update, no weight decay);
* `config.freeze = ("image/.*", ...)`: shorthand for multiplier 0, added to what the model
  itself declares frozen (LiT's locked tower).

A rule that matches no parameter is a config error, so a typo cannot silently train
everything. Weight decay applies to matrices only: norms, biases, the log-scale and the
sigmoid bias are excluded.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from big_contrast.errors import ConfigError
from big_contrast.sharding import path_str

SCHEDULES = ("cosine", "rsqrt", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
FROZEN = "frozen"


def learning_rate_schedule(opt) -> optax.Schedule:
    """Linear warm-up from 0 to `opt.lr` over `warmup_steps`, then the named decay."""
    warmup, total, lr = int(opt.warmup_steps), int(opt.total_steps), float(opt.lr)
    decay_steps = max(total - warmup, 1)
    if opt.schedule not in SCHEDULES:
        raise ConfigError(f"config.optimizer.schedule={opt.schedule!r} is unknown; use one of {SCHEDULES}.")
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(opt.get("min_lr_ratio", 0.0)))
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(lr, lr * float(opt.get("min_lr_ratio", 0.0)), decay_steps)
    elif opt.schedule == "rsqrt":
        timescale = max(int(opt.get("rsqrt_timescale", 10_000)), 1)
        decay = lambda step: lr / jnp.sqrt(1.0 + step / timescale)  # noqa: E731
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def param_paths(params) -> list[str]:
    return [path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def lr_multipliers(params, rules, frozen_patterns=()) -> dict[str, float]:
    """Multiplier per parameter path: first full regex match in `rules`, 0 when frozen, else 1."""
    paths = param_paths(params)
    rules = [(pattern, float(mult)) for pattern, mult in rules]
    rules += [(pattern, 0.0) for pattern in frozen_patterns]
    for pattern, _ in rules:
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ConfigError(
                f"The parameter rule {pattern!r} (config.lr_mults / config.freeze) matches no "
                f"parameter; paths look like {paths[0]!r}. Fix the regex or remove the rule."
            )
    multipliers = {}
    for p in paths:
        multipliers[p] = next((mult for pattern, mult in rules if re.fullmatch(pattern, p)), 1.0)
    return multipliers


def decays_weights(path: str, leaf) -> bool:
    """Weight decay on matrices (kernels, embeddings), not on norms, biases, scale or bias.

    The name matters as well as the rank: attention biases are 2-D (`[heads, head_dim]`),
    so rank alone would decay them (open_clip also excludes by name).
    """
    return jnp.ndim(leaf) >= 2 and not path.rsplit("/", 1)[-1].endswith("bias")


def make_optimizer(opt, params, *, lr_mults=(), frozen_patterns=()) -> optax.GradientTransformation:
    """The full update rule: clip -> per-group optimizer with scaled learning rate.

    `opt` is `config.optimizer`; `params` the parameter pytree (arrays or shapes).
    """
    if opt.name not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer.name={opt.name!r} is unknown; use one of {OPTIMIZERS}.")
    schedule = learning_rate_schedule(opt)
    multipliers = lr_multipliers(params, lr_mults, frozen_patterns)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels_flat = []
    for path, _ in leaves_with_path:
        mult = multipliers[path_str(path)]
        labels_flat.append(FROZEN if mult == 0 else f"lr_x{mult:g}")
    labels = jax.tree_util.tree_unflatten(treedef, labels_flat)
    decay_mask = jax.tree_util.tree_unflatten(
        treedef, [decays_weights(path_str(path), leaf) for path, leaf in leaves_with_path]
    )

    def group(mult):
        scaled = lambda step: mult * schedule(step)  # noqa: E731
        if opt.name == "sgd":
            return optax.sgd(scaled, momentum=opt.get("momentum", None))
        return optax.adamw(scaled, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask)

    transforms = {FROZEN: optax.set_to_zero()}
    for label in set(labels_flat) - {FROZEN}:
        transforms[label] = group(float(label[len("lr_x"):]))
    chain = [optax.multi_transform(transforms, labels)]
    if opt.get("grad_clip_norm"):
        chain.insert(0, optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    return optax.chain(*chain)
