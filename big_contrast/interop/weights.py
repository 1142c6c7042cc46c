"""Weight files and name maps shared by every checkpoint family.

A family module (``hf.py``, ``open_clip.py``, ``big_vision.py``) describes its
layout as a list of ``Rule(ours, theirs, kind)``: ``ours`` a '/'-joined path of
this project's parameters (as ``sharding.path_str`` spells them), ``theirs``
the name in the foreign file, ``kind`` how the array changes between the two
(``KINDS``: transposes of torch ``[out, in]`` matrices, head splits, leading
unit axes). The same rules run both ways, so import and export cannot drift.

Files are read without torch: safetensors through its numpy API, big_vision
``.npz`` with numpy; only a torch pickle (``.bin``/``.pt``) imports torch.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from etils import epath

from big_contrast.errors import ConfigError, MissingFileError


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str
    kind: str = "id"


def _transpose(x, shape):  # torch [out, in] -> ours [in, out], reshaped to heads where needed
    return x.T.reshape(shape)


# kind -> (to ours given our shape, to theirs). 'lin': Dense and q/k/v kernels (ours
# [in, ...out]); 'lin_out': the attention output kernel (ours [...in, out]).
KINDS = {
    "id": (lambda x, shape: x.reshape(shape), lambda x: x),
    "flat": (lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1)),
    "lead1": (lambda x, shape: x.reshape(shape), lambda x: x.reshape(x.shape[1:])),
    "lin": (_transpose, lambda x: x.reshape(x.shape[0], -1).T),
    "lin_out": (_transpose, lambda x: x.reshape(-1, x.shape[-1]).T),
    "conv": (lambda x, shape: x.transpose(2, 3, 1, 0).reshape(shape),
             lambda x: x.transpose(3, 2, 0, 1)),
}


def read_weights(path) -> dict[str, np.ndarray]:
    """name -> float32 numpy array from a ``.safetensors``, ``.npz`` or torch ``.bin``/``.pt`` file."""
    path = epath.Path(path)
    if not path.exists():
        raise MissingFileError(f"weights file {path} does not exist; pass the checkpoint file "
                               "or the model directory that holds it.")
    data = path.read_bytes()
    if path.name.endswith(".safetensors"):
        from safetensors.numpy import load

        return {k: np.asarray(v, np.float32) for k, v in load(data).items()}
    if path.name.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], np.float32) for k in npz.files}
    if path.name.endswith((".bin", ".pt", ".pth")):
        try:
            import torch  # only for pickled torch checkpoints
        except ImportError:
            raise ConfigError(f"{path.name} is a torch pickle and torch is not installed; install "
                              "torch or convert the file to .safetensors.") from None

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()
                if hasattr(v, "numpy")}
    raise ConfigError(f"{path.name}: unknown weights format; use .safetensors, .npz or .bin.")


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    epath.Path(path).write_bytes(save({k: np.array(v, np.float32, order="C")  # keeps 0-d arrays 0-d
                                       for k, v in tensors.items()}, metadata=metadata))


def split_fused(weights: dict, fused: str, parts: tuple[str, ...]) -> dict:
    """Splits every ``*<fused>`` entry (e.g. '.in_proj_weight', [3D, ...]) into ``*<part>``s."""
    out = {}
    for name, value in weights.items():
        if name.endswith(fused):
            stem = name[: -len(fused)]
            for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
                out[stem + part] = piece
        else:
            out[name] = value
    return out


def join_fused(weights: dict, fused: str, parts: tuple[str, ...]) -> dict:
    """The inverse of ``split_fused``."""
    out = dict(weights)
    stems = {name[: -len(parts[0])] for name in weights if name.endswith(parts[0])}
    for stem in stems:
        if all(stem + p in weights for p in parts):
            out[stem + fused] = np.concatenate([out.pop(stem + p) for p in parts], axis=0)
    return out


def to_ours(rules: list[Rule], theirs: dict[str, np.ndarray], expected: dict[str, tuple],
            source: str) -> dict[str, np.ndarray]:
    """Our flat params from ``theirs``; missing, unexpected and mis-shaped weights are listed by name.

    ``expected`` maps our paths to their shapes (from the abstract model).
    """
    problems, out = [], {}
    used = set()
    for rule in rules:
        if rule.theirs not in theirs:
            problems.append(f"missing {rule.theirs}")
            continue
        used.add(rule.theirs)
        shape = expected.get(rule.ours)
        if shape is None:
            raise AssertionError(f"rule for {rule.ours}: not a parameter of the model")
        value = theirs[rule.theirs]
        try:
            out[rule.ours] = KINDS[rule.kind][0](value, shape)
        except ValueError:
            problems.append(f"{rule.theirs}: shape {value.shape} does not fit {rule.ours} {shape}")
    problems += [f"unexpected {name}" for name in sorted(set(theirs) - used)]
    uncovered = sorted(set(expected) - {r.ours for r in rules})
    if uncovered:
        raise AssertionError(f"no rule for {uncovered}")
    if problems:
        shown = "; ".join(problems[:12]) + ("; ..." if len(problems) > 12 else "")
        raise ConfigError(f"{source}: {len(problems)} weight(s) do not match the architecture "
                          f"({shown}); check --arch or the checkpoint's config.")
    return out


def to_theirs(rules: list[Rule], ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {rule.theirs: np.asarray(KINDS[rule.kind][1](np.asarray(ours[rule.ours], np.float32)))
            for rule in rules}


def encoder_rules(ours: str, theirs: str, depth: int, names: dict) -> list[Rule]:
    """Rules of ``depth`` pre-LN blocks; ``names`` spells their sub-modules in the foreign layout
    (keys: block, norm1, norm2, q, k, v, out, fc1, fc2, w, b for weight / bias suffixes)."""
    n = names
    rules = []
    for i in range(depth):
        o, t = f"{ours}/blocks/{i}", f"{theirs}{n['block']}{i}"
        rules += norm_rules(f"{o}/norm1", f"{t}.{n['norm1']}", n)
        rules += norm_rules(f"{o}/norm2", f"{t}.{n['norm2']}", n)
        rules += attention_rules(f"{o}/attention", t, n)
        rules += linear_rules(f"{o}/mlp/fc1", f"{t}.{n['fc1']}", n)
        rules += linear_rules(f"{o}/mlp/fc2", f"{t}.{n['fc2']}", n)
    return rules


def norm_rules(ours: str, theirs: str, n: dict) -> list[Rule]:
    scale = n.get("scale", n["w"])  # big_vision / flax: 'scale'; torch: 'weight'
    return [Rule(f"{ours}/scale", f"{theirs}.{scale}"), Rule(f"{ours}/bias", f"{theirs}.{n['b']}")]


def linear_rules(ours: str, theirs: str, n: dict, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}/kernel", f"{theirs}.{n['w']}", "lin")]
    return rules + ([Rule(f"{ours}/bias", f"{theirs}.{n['b']}")] if bias else [])


def attention_rules(ours: str, theirs: str, n: dict) -> list[Rule]:
    rules = []
    for mine, key in (("query", "q"), ("key", "k"), ("value", "v")):
        rules += [Rule(f"{ours}/{mine}/kernel", f"{theirs}.{n[key]}.{n['w']}", "lin"),
                  Rule(f"{ours}/{mine}/bias", f"{theirs}.{n[key]}.{n['b']}", "flat")]
    return rules + [Rule(f"{ours}/out/kernel", f"{theirs}.{n['out']}.{n['w']}", "lin_out"),
                    Rule(f"{ours}/out/bias", f"{theirs}.{n['out']}.{n['b']}")]
