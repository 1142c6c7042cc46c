"""The config a workdir was trained with, recorded as `workdir/config.json` (big_vision style).

A run writes its resolved config there before its first step, so

* resuming with a config that would change the train state's structure or shapes (a model
  field, the optimizer's kind, parameter rules) fails before anything is restored or
  written, with the differing keys and their two values;
* differences that are safe to resume with (total_steps, log_every, the evals, the
  learning-rate schedule, the data) are allowed and listed;
* `big-contrast eval --workdir W` needs no `--config`.

Values are compared as JSON (tuples and lists alike); the mesh is not structural, since a
checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from big_contrast import paths
from big_contrast.errors import ConfigMismatch

FILENAME = "config.json"

# Keys (and their sub-keys) whose change alters which arrays the train state holds or their shapes.
STRUCTURAL = ("model", "optimizer.name", "optimizer.momentum", "lr_mults", "freeze")
_MISSING = "(absent)"


def path(workdir) -> epath.Path:
    return paths.join(workdir, FILENAME)


def write(config, workdir) -> None:
    """Writes `config` (resolved) to `workdir/config.json`."""
    target = path(workdir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")


def read(workdir) -> ml_collections.ConfigDict | None:
    """The config recorded in `workdir`, or None when there is none."""
    source = path(workdir)
    if not source.exists():
        return None
    try:
        return ml_collections.ConfigDict(json.loads(source.read_text()))
    except ValueError as error:
        raise ValueError(f"{source} does not parse as JSON ({error}); restore it or pass --config.") from None


def differences(old, new) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs, in key order."""
    a, b = _flat(_as_json(old)), _flat(_as_json(new))
    pairs = ((k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys()))
    return [(key, x, y) for key, x, y in pairs if x != y]


def is_structural(key: str, old, new) -> bool:
    if key == "optimizer.grad_clip_norm":  # clipping on/off adds or removes an optimizer state
        return bool(old) != bool(new)
    return any(key == s or key.startswith(s + ".") for s in STRUCTURAL)


def check_resumable(config, workdir) -> list[str]:
    """Raises `ConfigMismatch` when `config` differs from the workdir's recorded config in a
    structural key; returns the safe differences as 'key: old in the workdir, new now'."""
    recorded = read(workdir)
    if recorded is None:
        return []
    diffs = differences(recorded, config)
    structural = [_describe(*d) for d in diffs if is_structural(*d)]
    if structural:
        listed = "; ".join(structural[:3]) + ("; ..." if len(structural) > 3 else "")
        raise ConfigMismatch(
            f"This workdir was trained with another config ({listed}): its checkpoints cannot resume with "
            f"this one. Use a new --workdir, or the old values (recorded in {path(workdir)}).")
    return [_describe(*d) for d in diffs]


def _describe(key, old, new) -> str:
    return f"{key}: {json.dumps(old)} in the workdir, {json.dumps(new)} now"


def _as_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(tree, prefix="") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out
