"""Test set-up: eight simulated CPU devices, set before jax is imported anywhere, and a
persistent compilation cache shared by the tests and the training processes they start
(several tests compile the same demo step; the cache turns the repeats into loads)."""
import math
import os
import pathlib
import re

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


# ----------------------------------------------------------------------------- small helpers
# Imported by the test modules as `from conftest import rel_err` (tests/ is on sys.path).


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def max_rel_err(a, b):
    """max |a - b| / max |b|: the worst element against the largest one."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def unit(x):
    """Rows scaled to unit L2 norm along the last axis, in float64."""
    import numpy as np

    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Object-store emulators on loopback (GCS, S3; started once per session, always stopped).
# `free_port` is re-exported for the tests (`from conftest import free_port`).
from cloud_fixtures import free_port, gcs_emulator, gcs_server, s3_emulator, s3_server  # noqa: E402,F401


def random_model(config, seed=0):
    """The model of ``config`` with N(0, 0.2^2) numpy weights (no XLA compile)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from big_contrast import models

    graphdef, state = nnx.split(models.abstract_model(config))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def encoded_image(rgb, fmt: str = "PNG", size=(6, 5)) -> bytes:
    """A solid-colour image file's bytes (PNG or JPEG), for sources the tests write."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- compiled HLO text


def hlo_computations(hlo):
    """{name: text} of every computation in an HLO module's text (the entry is "ENTRY")."""
    named = {}
    for block in re.split(r"\n(?=(?:ENTRY )?%?[\w.\-]+ [^\n]*\{\n)", "\n" + hlo):
        match = re.match(r"(ENTRY )?%?([\w.\-]+) ", block.strip())
        if match:
            named["ENTRY" if match.group(1) else match.group(2)] = block
    return named


def _called(text):
    return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", text)


def loop_computations(named):
    """Names of the while-loop bodies and conditions and of every computation they call."""
    todo = [m for text in named.values() for m in re.findall(r"(?:body|condition)=%?([\w.\-]+)", text)]
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in named:
            seen.add(name)
            todo += _called(named[name])
    return seen


def all_reduce_elements(hlo):
    """(number of all-reduces inside while loops, elements all-reduced outside them)."""
    named = hlo_computations(hlo)
    in_loops = loop_computations(named)
    op = re.compile(r"= (\([^()]*\)|\w+\[[\d,]*\]\S*) all-reduce(?:-start)?\(")
    inside, outside = 0, 0
    for name, text in named.items():
        for shape in op.findall(text):
            if name in in_loops:
                inside += 1
            else:
                outside += sum(math.prod(map(int, filter(None, dims.split(","))))
                               for dims in re.findall(r"\w+\[([\d,]*)\]", shape))
    return inside, outside


def _instructions(text):
    """{instruction: (opcode, operand names, called computations)} of one computation."""
    table = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^()]*\)|\S+) ([\w\-]+)\((.*)", line)
        if match:
            name, opcode, rest = match.groups()
            table[name] = (opcode, re.findall(r"%([\w.\-]+)", rest.split("),")[0]), _called(rest))
    return table


def loop_collective_permute_dependencies(hlo):
    """For each collective-permute inside a while body: the opcodes it transitively depends on
    within that body (fusions count with the opcodes of the computations they call)."""
    named = hlo_computations(hlo)
    found = []
    for name in loop_computations(named):
        table = _instructions(named[name])
        for op_name, (opcode, operands, _) in table.items():
            if not opcode.startswith("collective-permute"):
                continue
            opcodes, todo, seen = set(), list(operands), set()
            while todo:
                dep = todo.pop()
                if dep in seen or dep not in table:
                    continue
                seen.add(dep)
                dep_opcode, dep_operands, called = table[dep]
                opcodes.add(dep_opcode)
                for computation in called if dep_opcode == "fusion" else ():
                    opcodes |= {op for op, _, _ in _instructions(named.get(computation, "")).values()}
                todo += dep_operands
            found.append(opcodes)
    return found
