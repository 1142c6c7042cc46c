"""Device meshes and logical-axis sharding rules.

Three mesh axes, named after what they do:

* ``data``   -- data parallelism: the batch is split, parameters are replicated;
* ``fsdp``   -- fully-sharded data parallelism: the batch is split *and* the
  parameters are sharded (along their ``embed`` dimension by default);
* ``tensor`` -- tensor parallelism: attention heads, MLP hidden units and the
  vocabulary are split.

Every parameter and the main activations of ``big_contrast.models`` carry
*logical* axis names ('embed', 'mlp', 'heads', 'kv', 'vocab', 'batch', ...).
An ordered list of ``(regex, mesh_axes)`` rules maps each logical name to mesh
axes. For every dimension the first rule whose regex fully matches the logical
name *and* whose mesh axes are usable is taken; a rule's axes are usable when
they exist in the mesh, are not already used by another dimension of the same
array, and their total size divides the dimension. Otherwise the next matching
rule is tried, and a dimension that no rule places is replicated. The order
therefore expresses fallbacks, e.g. shard the batch over ``('data', 'fsdp')``
and, when that does not divide it, over ``'data'`` alone.

Parameters are created directly in their shardings (``init_sharded``): the
constructor runs under ``jax.jit`` with ``out_shardings``, so no device or host
ever holds a full replica of a sharded parameter.

Activation constraints (``constrain``) are applied only under ``jax.set_mesh``
(outside a mesh context they are no-ops, so the same model code runs
unsharded; GSPMD then propagates the parameter and batch shardings).

Both mesh flavours work: Auto axes (GSPMD decides what it is not told) and
Explicit axes (sharding in types, the ``jax.make_mesh`` default). On Explicit
meshes the towers run inside ``jax.sharding.auto_axes`` (``call_with_auto_axes``),
because FSDP/TP layers constantly combine operands whose explicit shardings
disagree; their outputs come back Explicit.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from big_contrast.errors import ConfigError

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = Sequence[tuple[str, MeshAxes]]

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes; this is also the
# ``axis`` argument the loss engine expects (see ``batch_axes``).
BATCH_AXES = ("data", "fsdp")
DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("batch", "data"),  # fallback when data*fsdp does not divide the batch
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_.*", None),  # act_embed, act_kv, act_seq: replicated
    # parameters
    ("layers", None),  # the stacked-layer axis of scan-over-layers
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    (".*", None),  # kv, patch, channels, posemb, ...: replicated
)

_active_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "big_contrast_sharding_rules", default=None)


# ----------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------

def make_mesh(mesh_config: Sequence[tuple[str, int]] | Mapping[str, int] = DEFAULT_MESH,
              devices: Sequence[jax.Device] | None = None,
              *, axis_types: str = "auto") -> Mesh:
    """Builds a mesh from ``(("data", -1), ("fsdp", 1), ("tensor", 1))``.

    One size may be -1: it absorbs the devices the other axes leave. Raises a
    ValueError when the sizes do not multiply to the number of devices.

    Args:
      mesh_config: ordered ``(name, size)`` pairs (or a dict in that order).
      devices: the devices to lay out (default: ``jax.devices()``, all processes).
      axis_types: ``"auto"`` (GSPMD propagates shardings; a classic
        ``jax.sharding.Mesh``) or ``"explicit"`` (sharding in types, the
        ``jax.make_mesh`` default). The models run on both.
    """
    pairs = _mesh_pairs(mesh_config)
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in pairs)
    sizes = _resolve_sizes(pairs, len(devices))
    types = _axis_types(axis_types) * len(names)
    return jax.make_mesh(sizes, names, axis_types=types, devices=devices)


def _mesh_pairs(mesh_config) -> list[tuple[str, int]]:
    items = list(mesh_config.items()) if isinstance(mesh_config, Mapping) else list(mesh_config)
    pairs = []
    for item in items:
        if (not isinstance(item, (tuple, list)) or len(item) != 2
                or not isinstance(item[0], str) or not isinstance(item[1], int)):
            raise ConfigError(
                f"mesh entry {item!r} in {mesh_config!r} is not a (name, size) pair; "
                f"write the mesh like {DEFAULT_MESH!r}.")
        pairs.append((item[0], item[1]))
    names = [name for name, _ in pairs]
    if not pairs or len(set(names)) != len(names):
        raise ConfigError(f"mesh {mesh_config!r} needs at least one axis and unique axis names.")
    unknown = [name for name in names if name not in MESH_AXES]
    if unknown:
        raise ConfigError(f"mesh axes {unknown} in {mesh_config!r} are unknown; "
                         f"the models shard over {MESH_AXES}.")
    bad = [(name, size) for name, size in pairs if size < 1 and size != -1]
    if bad or sum(size == -1 for _, size in pairs) > 1:
        raise ConfigError(f"mesh {mesh_config!r}: sizes must be positive, with at most one -1 "
                         "(which absorbs the remaining devices).")
    return pairs


def _resolve_sizes(pairs, num_devices: int) -> tuple[int, ...]:
    known = math.prod(size for _, size in pairs if size != -1)
    sizes = [size for _, size in pairs]
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {tuple(pairs)!r}: the fixed axes need a multiple of {known} devices "
                f"but {num_devices} are available; change the sizes so they divide {num_devices}.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {tuple(pairs)!r} has {math.prod(sizes)} devices but {num_devices} are "
            "available; make the sizes multiply to the device count or use -1 for one axis.")
    return tuple(sizes)


def _axis_types(axis_types: str) -> tuple[AxisType]:
    choices = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    if axis_types not in choices:
        raise ConfigError(f"axis_types={axis_types!r} is unknown; use one of {sorted(choices)}.")
    return (choices[axis_types],)


def axis_names(axes: str | Sequence[str]) -> tuple[str, ...]:
    """A mesh axis name or a sequence of names, as a tuple of names."""
    return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_axes(mesh: Mesh, axes: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (the loss engine's ``axis``).

    The one definition of the batch layout: by default those of ``BATCH_AXES`` that the mesh
    has; an explicit ``axes`` must all be axes of the mesh.
    """
    if axes is None:
        found = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        if not found:
            raise ConfigError(f"mesh axes {mesh.axis_names} contain none of the batch axes {BATCH_AXES}.")
        return found
    axes = axis_names(axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ConfigError(f"batch axes {missing} are not axes of the mesh {dict(mesh.shape)}; "
                         "set batch_axes to the mesh axes the batch is split over.")
    return axes


def batch_sharding(mesh: Mesh, axes: str | Sequence[str] | None = None) -> NamedSharding:
    """Sharding for ``[B, ...]`` arrays: dim 0 over ``batch_axes(mesh, axes)``, the rest replicated.

    The data pipeline, the evaluators and the trainer all lay batches out through this."""
    return NamedSharding(mesh, P(batch_axes(mesh, axes)))


def num_batch_shards(mesh: Mesh, axes: str | Sequence[str] | None = None) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, axes))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises a ValueError when the global batch does not split evenly over the batch axes."""
    shards = num_batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(
            f"global batch {global_batch} does not divide over the {shards} batch shards of mesh "
            f"{dict(mesh.shape)}; use a multiple of {shards}.")


# ----------------------------------------------------------------------------
# Logical axis rules
# ----------------------------------------------------------------------------

def check_rules(rules: Rules) -> tuple[tuple[str, MeshAxes], ...]:
    """Validates ``[(regex, mesh_axes), ...]``; mesh_axes is None, a name or a tuple of names."""
    checked = []
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        if ok and axes is not None:
            names = (axes,) if isinstance(axes, str) else axes
            ok = isinstance(names, (tuple, list)) and all(isinstance(a, str) for a in names)
        if not ok:
            raise ConfigError(f"sharding rule {rule!r} is not (logical_regex, None | mesh axis | "
                             "tuple of mesh axes), e.g. ('embed', 'fsdp').")
        checked.append((rule[0], tuple(axes) if isinstance(axes, list) else axes))
    return tuple(checked)


def override_rules(overrides: Rules, base: Rules = DEFAULT_RULES) -> tuple:
    """Rules where ``overrides`` come first, so they win over ``base``."""
    return check_rules(overrides) + check_rules(base)


@contextlib.contextmanager
def use_rules(rules: Rules):
    """Context in which ``constrain`` and the default of ``rules=`` arguments use ``rules``."""
    token = _active_rules.set(check_rules(rules))
    try:
        yield
    finally:
        _active_rules.reset(token)


def current_rules() -> Rules:
    rules = _active_rules.get()
    return DEFAULT_RULES if rules is None else rules


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: Mapping[str, int], rules: Rules | None = None) -> P:
    """PartitionSpec for an array of ``shape`` whose dims have ``logical_axes``."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}.")
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    return P(*(_place_dim(name, dim, mesh_shape, rules, used)
               for name, dim in zip(logical_axes, shape)))


def _place_dim(name, dim, mesh_shape, rules, used) -> MeshAxes:
    if name is None:
        return None
    for pattern, mesh_axes in rules:
        if not re.fullmatch(pattern, name):
            continue
        if mesh_axes is None:
            return None
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        usable = all(a in mesh_shape and a not in used for a in axes)
        if usable and dim % math.prod(mesh_shape[a] for a in axes) == 0:
            used.update(axes)
            return axes[0] if len(axes) == 1 else axes
    return None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names, under ``jax.set_mesh``.

    No-op without a mesh context. Uses ``with_sharding_constraint`` on Auto
    axes and ``reshard`` on Explicit ones.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not _free_axes(mesh):
        return x
    spec = logical_to_spec(logical_axes, x.shape, _free_axes(mesh))
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def _free_axes(mesh) -> dict[str, int]:
    """Mesh axes a sharding may name: all but the manual ones of an enclosing ``shard_map``
    (inside it the batch is already split; its rows are local)."""
    manual = set(getattr(mesh, "manual_axes", ()))
    return {name: size for name, size in mesh.shape.items() if name not in manual}


def call_with_auto_axes(fn: Callable[..., jax.Array], modules: Any, args: tuple,
                        out_logical_axes: Sequence[str | None],
                        out_shape: Sequence[int]) -> jax.Array:
    """``fn(modules, *args)``, run with Auto (GSPMD) axes when the mesh is Explicit.

    On Explicit axes JAX types every intermediate's sharding and refuses ops
    whose operands disagree (e.g. a bias sharded over 'fsdp' added to a batch
    sharded over 'fsdp'), which FSDP/TP layers do all the time. Inside
    ``jax.sharding.auto_axes`` the compiler resolves them as on an Auto mesh;
    the result comes back Explicit with the spec of ``out_logical_axes``.
    The modules are passed as state (not closed over) so gradients flow.
    The mesh is the context mesh (``jax.set_mesh``) or, without one, the mesh
    the arguments' types carry.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        meshes = [jax.typeof(a).sharding.mesh for a in jax.tree.leaves(args)]
        mesh = next((m for m in meshes if not m.empty), mesh)
    if mesh.empty or not mesh.explicit_axes:
        return fn(modules, *args)
    graphdef, state = nnx.split(modules)

    def run(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    spec = logical_to_spec(out_logical_axes, out_shape, _free_axes(mesh))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(run, axes=mesh.explicit_axes, out_sharding=spec)(state, *args)


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------

def path_str(path: Iterable[Any]) -> str:
    """'image/encoder/blocks/0/mlp/fc1/kernel' for an nnx state path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a Variable (``out_sharding`` metadata)."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes else None


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None,
                    path_overrides: Sequence[tuple[str, P]] = ()) -> nnx.State:
    """A NamedSharding per Variable of ``state`` (same structure, for jit out_shardings).

    ``path_overrides`` is a big_vision-style list ``[(path_regex, PartitionSpec)]``
    on '/'-joined parameter paths; the first full match wins over the logical
    rules. Variables without logical axes are replicated.
    """
    rules = check_rules(current_rules() if rules is None else rules)
    mesh_shape = dict(mesh.shape)

    def to_sharding(path, variable):
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, P())
        name = path_str(path)
        for pattern, spec in path_overrides:
            if re.fullmatch(pattern, name):
                return variable.replace(NamedSharding(mesh, spec))
        axes = variable_logical_axes(variable)
        shape = variable.get_value().shape
        spec = P() if axes is None else logical_to_spec(axes, shape, mesh_shape, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(to_sharding, state,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules | None = None,
                path_overrides: Sequence[tuple[str, P]] = ()) -> nnx.State:
    """Places an existing state on the mesh according to the rules."""
    return jax.device_put(state, state_shardings(state, mesh, rules, path_overrides))


def init_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | None = None,
                 path_overrides: Sequence[tuple[str, P]] = (),
                 compiler_options: Mapping[str, Any] | None = None) -> nnx.Module:
    """Runs ``constructor()`` under jit so every parameter is created in its sharding.

    ``constructor`` must build the module from scratch (e.g. a lambda around
    ``models.create(config, nnx.Rngs(seed))``); it is traced, not executed eagerly.
    ``compiler_options`` go to ``jax.jit`` (e.g. lower XLA optimisation on CPU).
    """
    rules = check_rules(current_rules() if rules is None else rules)
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules, path_overrides)

    init_state = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings,
                         compiler_options=compiler_options)
    return nnx.merge(graphdef, init_state())
