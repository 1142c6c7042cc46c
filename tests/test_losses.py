"""The loss engine against the dense reference and a float64 definition (values and all four
gradients), its numerical edge cases, its memory structure and its input errors.
Runs on 8 simulated devices."""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_contrast.losses import sigmoid_loss, softmax_loss
from conftest import rel_err

RTOL = 1e-5


def unit_rows(rng, batch, dim, dtype=np.float32):
    z = rng.standard_normal((batch, dim)).astype(np.float32)
    return jnp.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), dtype)


def make_mesh(shape, names, explicit=False):
    if explicit:
        return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names)


@functools.lru_cache(maxsize=None)
def jitted_value_and_grad(loss, **kw):
    """jit(value_and_grad) of one loss w.r.t. all its arguments, compiled once per configuration."""
    if loss == "softmax":
        fn, n_args = (lambda x, y, s: softmax_loss(x, y, s, **kw)), 3
    else:
        fn, n_args = (lambda x, y, s, b: sigmoid_loss(x, y, s, b, **kw)), 4
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n_args))))


def loss_and_grads(loss, zimg, ztxt, scale, bias, **kw):
    """Value and gradients w.r.t. (zimg, ztxt, scale[, bias]) of one loss."""
    args = (zimg, ztxt, jnp.float32(scale)) + ((jnp.float32(bias),) if loss == "sigmoid" else ())
    return jitted_value_and_grad(loss, **kw)(*args)


def logsumexp(a, axis):
    top = a.max(axis, keepdims=True)
    return np.log(np.exp(a - top).sum(axis)) + top.squeeze(axis)


def float64_reference(loss, zimg, ztxt, scale, bias):
    """Value, gradients and their term magnitudes of a loss, in float64 numpy, straight from the
    definitions (independent of every jax implementation).

    Each gradient is a sum of B terms per entry (B^2 for scale and bias); its magnitude is the
    same sum taken over absolute values, the size float32 round-off is relative to.
    """
    x, y = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
    batch, scale = len(x), float(scale)
    cos = x @ y.T
    logits = scale * cos
    eye = np.eye(batch)
    if loss == "softmax":
        lse_row, lse_col = logsumexp(logits, 1), logsumexp(logits, 0)
        value = np.mean(0.5 * (lse_row + lse_col) - np.diag(logits))
        value_magnitude = np.mean(0.5 * (np.abs(lse_row) + np.abs(lse_col)) + np.abs(np.diag(logits)))
        p_row, p_col = np.exp(logits - lse_row[:, None]), np.exp(logits - lse_col[None, :])
        dlogits = (p_row + p_col) / (2 * batch) - eye / batch
        # The diagonal -1/B cancels p_ii ~ 1 when pairs are confident: its size counts too.
        dlogits_abs = (p_row + p_col) / (2 * batch) + eye / batch
    else:
        signs = 2 * eye - 1
        u = logits + float(bias)
        value = np.sum(np.logaddexp(0, -signs * u)) / batch
        value_magnitude = value  # a sum of positive terms
        dlogits = -signs * np.exp(-np.logaddexp(0, signs * u)) / batch  # -s * sigmoid(-s u) / B
        dlogits_abs = np.abs(dlogits)
    g_abs = dlogits_abs
    grads = [scale * dlogits @ y, scale * dlogits.T @ x, np.sum(dlogits * cos), np.sum(dlogits)]
    magnitudes = [scale * np.linalg.norm(g_abs @ np.abs(y)), scale * np.linalg.norm(g_abs.T @ np.abs(x)),
                  np.sum(g_abs * np.abs(cos)), np.sum(g_abs)]
    n_grads = 3 if loss == "softmax" else 4
    return (value, *grads[:n_grads]), (value_magnitude, *magnitudes[:n_grads])


def sum_err(a, truth, magnitude, floor=1e-2):
    """Error of a float32 sum relative to its value, or to `floor` times the size of its terms
    where they cancel (a gradient that is exactly zero has no relative error)."""
    diff = np.asarray(a, np.float64) - np.asarray(truth, np.float64)
    return np.linalg.norm(diff) / max(np.linalg.norm(np.asarray(truth, np.float64)), floor * magnitude)


def assert_matches_dense(loss, zimg, ztxt, scale, bias, rtol=RTOL, floor=1e-2, **kw):
    """`kw`'s impl agrees with impl="dense" and with the float64 definition, value and all grads."""
    value, grads = loss_and_grads(loss, zimg, ztxt, scale, bias, **kw)
    dense_value, dense_grads = loss_and_grads(loss, zimg, ztxt, scale, bias, impl="dense")
    truths, magnitudes = float64_reference(loss, zimg, ztxt, scale, bias)
    assert value.dtype == jnp.float32 and value.shape == ()
    names = ["value", "zimg", "ztxt", "scale", "bias"]
    for name, got, dense, truth, magnitude in zip(names, (value, *grads), (dense_value, *dense_grads),
                                                  truths, magnitudes):
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        assert sum_err(got, dense, magnitude, floor) <= rtol, (name, sum_err(got, dense, magnitude, floor))
        assert sum_err(got, truth, magnitude, floor) <= rtol, (name, sum_err(got, truth, magnitude, floor))
    return value, grads


# --------------------------------------------------------------------- the dense reference


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_dense_reference_matches_the_float64_definition(loss):
    rng = np.random.default_rng(1)
    zimg, ztxt = unit_rows(rng, 24, 8), unit_rows(rng, 24, 8)
    value, grads = loss_and_grads(loss, zimg, ztxt, jnp.float32(7.0), jnp.float32(-2.0), impl="dense")
    truths, magnitudes = float64_reference(loss, zimg, ztxt, 7.0, -2.0)
    assert rel_err(value, truths[0]) < 1e-6
    for g, truth, magnitude in zip(grads, truths[1:], magnitudes[1:]):
        assert sum_err(g, truth, magnitude) < 1e-5


# --------------------------------------------------------------------- every impl vs dense

MESHES = {
    "none": None,
    "1dev": ((1,), ("data",), "data"),
    "2dev": ((2,), ("data",), "data"),
    "8dev": ((8,), ("data",), "data"),
    "2x4": ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
    "2x2x2_tensor": ((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp")),
}

# (mesh, B, D, block, scale, bias): blocks that divide the local batch and blocks that do not,
# 1, 2 and 8 devices, two-axis batch sharding, scale in {1, 10, 100}, bias in {-10, 0, 10}.
CASES = [
    ("none", 40, 16, None, 10.0, -10.0),
    ("none", 40, 16, 7, 100.0, 10.0),
    ("1dev", 24, 8, 5, 1.0, 0.0),
    ("2dev", 48, 32, 8, 100.0, -10.0),
    ("2dev", 34, 8, 4, 10.0, 10.0),
    ("8dev", 64, 16, None, 10.0, 0.0),
    ("8dev", 96, 8, 5, 100.0, 10.0),
    ("8dev", 128, 64, 4, 1.0, -10.0),
    ("2x4", 64, 16, 3, 10.0, -10.0),
    ("2x2x2_tensor", 32, 16, 4, 100.0, 0.0),
]


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["ring", "all_gather"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-D{c[2]}-blk{c[3]}-s{c[4]:g}-b{c[5]:g}")
def test_impl_matches_dense(impl, loss, case):
    mesh_name, batch, dim, block, scale, bias = case
    rng = np.random.default_rng(zlib.crc32(repr((impl, loss, case)).encode()))
    zimg, ztxt = unit_rows(rng, batch, dim), unit_rows(rng, batch, dim)
    kw = dict(impl=impl, block=block)
    if MESHES[mesh_name] is not None:
        shape, names, axis = MESHES[mesh_name]
        kw.update(mesh=make_mesh(shape, names), axis=axis)
    assert_matches_dense(loss, zimg, ztxt, jnp.float32(scale), jnp.float32(bias), **kw)


@pytest.mark.parametrize("impl", ["ring", "all_gather", "dense"])
def test_explicit_axes_mesh(impl):
    """jax.make_mesh gives Explicit (sharding-in-types) axes; inputs arrive sharded or not."""
    mesh = make_mesh((2, 4), ("data", "fsdp"), explicit=True)
    rng = np.random.default_rng(5)
    zimg, ztxt = unit_rows(rng, 32, 8), unit_rows(rng, 32, 8)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = (jax.device_put(zimg, rows), jax.device_put(ztxt, rows))
    for loss in ("softmax", "sigmoid"):
        with jax.set_mesh(mesh):
            for x, y in (sharded, (zimg, ztxt)):
                assert_matches_dense(loss, x, y, jnp.float32(10.0), jnp.float32(-5.0),
                                     impl=impl, mesh=mesh, axis=("data", "fsdp"), block=3)


def test_python_float_scalars_and_gradient_through_a_log_scale():
    rng = np.random.default_rng(9)
    zimg, ztxt = unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)
    mesh = make_mesh((8,), ("data",))
    grad_of = lambda impl: jax.grad(  # noqa: E731
        lambda t: sigmoid_loss(zimg, ztxt, jnp.exp(t), -10.0, impl=impl, mesh=mesh))(jnp.log(10.0))
    assert rel_err(grad_of("ring"), grad_of("dense")) <= RTOL
    assert rel_err(softmax_loss(zimg, ztxt, 10.0, mesh=mesh), softmax_loss(zimg, ztxt, 10.0, impl="dense")) <= RTOL


# --------------------------------------------------------------------- numerical edge cases


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["ring", "all_gather"])
def test_duplicates_and_confident_inputs_are_finite_and_exact(impl, loss):
    rng = np.random.default_rng(3)
    mesh = make_mesh((8,), ("data",))
    base = unit_rows(rng, 32, 8)
    same = jnp.tile(base[:1], (32, 1))  # every row identical: all pairs equally likely
    cases = [(same, same, 100.0, 10.0), (same, same, 100.0, -10.0),
             (base, base, 100.0, -10.0), (base, base, 100.0, 10.0),  # perfectly aligned pairs
             (base, -base, 100.0, 10.0)]  # perfectly wrong pairs
    for zimg, ztxt, scale, bias in cases:
        # Gradients here are (nearly) zero sums of O(1) terms whose float32 logits carry
        # scale * 6e-8 of round-off, so errors are measured against the size of the terms.
        assert_matches_dense(loss, zimg, ztxt, jnp.float32(scale), jnp.float32(bias),
                             floor=1.0, impl=impl, mesh=mesh, block=4)


def test_extreme_logits_stay_finite_in_the_sigmoid_terms():
    """|scale * cos + bias| of ~1e4 would overflow a naive log(1 + exp(.))."""
    zimg = unit_rows(np.random.default_rng(4), 16, 4) * 10.0
    value, grads = loss_and_grads("sigmoid", zimg, zimg, 100.0, 10.0, block=4)
    dense_value, _ = loss_and_grads("sigmoid", zimg, zimg, 100.0, 10.0, impl="dense")
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
    assert rel_err(value, dense_value) < RTOL


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["ring", "all_gather"])
def test_bfloat16_embeddings_accumulate_in_float32(impl, loss):
    rng = np.random.default_rng(6)
    mesh = make_mesh((8,), ("data",))
    zimg, ztxt = unit_rows(rng, 64, 32, jnp.bfloat16), unit_rows(rng, 64, 32, jnp.bfloat16)
    value, grads = loss_and_grads(loss, zimg, ztxt, 10.0, -5.0, impl=impl, mesh=mesh, block=4)
    ref_value, ref_grads = loss_and_grads(loss, zimg.astype(jnp.float32), ztxt.astype(jnp.float32),
                                          10.0, -5.0, impl="dense")
    assert value.dtype == jnp.float32
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert rel_err(value, ref_value) < RTOL  # float32 products of bfloat16 operands are exact
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < 1e-2  # bfloat16 gradients carry 8 bits of mantissa


# --------------------------------------------------------------------- memory structure


def largest_tensor(hlo_text):
    """Largest element count of any array in an HLO module's text."""
    shapes = re.findall(r"\b[fsbu]\d+\[([\d,]*)\]", hlo_text)
    return max(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_ring_never_materialises_a_local_by_global_block(loss):
    """No array in the compiled forward+backward holds (B/n) x B logits: tiles and O(b D) only.
    The all-gather scheme is the positive control: the same check sees its (B/n) x B slice."""
    batch, dim, block = 512, 4, 8
    mesh = make_mesh((8,), ("data",))
    zimg = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    for impl in ("ring", "all_gather"):
        if loss == "softmax":
            fn = lambda x, y: softmax_loss(x, y, 10.0, impl=impl, mesh=mesh, block=block)  # noqa: E731
        else:
            fn = lambda x, y: sigmoid_loss(x, y, 10.0, -10.0, impl=impl, mesh=mesh, block=block)  # noqa: E731
        hlo = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(zimg, zimg).compile().as_text()
        if impl == "ring":
            assert largest_tensor(hlo) <= max(block * block, batch * dim)
        else:
            assert largest_tensor(hlo) >= batch // 8 * batch


# --------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_numbers():
    rng = np.random.default_rng(0)
    z = unit_rows(rng, 12, 4)
    mesh = make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"12 does not divide over the 8 devices"):
        softmax_loss(z, z, 1.0, mesh=mesh)
    with pytest.raises(ValueError, match=r"zimg \(12, 4\) and ztxt \(12, 5\)"):
        sigmoid_loss(z, unit_rows(rng, 12, 5), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"rank 3"):
        softmax_loss(z[None], z[None], 1.0)
    with pytest.raises(ValueError, match=r"scale must be a scalar, got shape \(2,\)"):
        softmax_loss(z, z, jnp.ones(2))
    with pytest.raises(ValueError, match=r"bias must be a scalar, got shape \(1,\)"):
        sigmoid_loss(z, z, 1.0, jnp.ones(1))
    with pytest.raises(ValueError, match=r"Unknown loss impl 'rings'"):
        softmax_loss(z, z, 1.0, impl="rings")
    with pytest.raises(ValueError, match=r"'batch' is not an axis of the mesh.*\('data',\)"):
        softmax_loss(z[:8], z[:8], 1.0, mesh=mesh, axis="batch")
    with pytest.raises(ValueError, match=r"block must be a positive integer.*0"):
        sigmoid_loss(z, z, 1.0, 0.0, block=0)


# --------------------------------------------------------------------- overlap and bfloat16


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_ring_transfers_never_wait_for_the_step_compute(loss):
    """In the compiled forward+backward, no collective-permute inside a ring loop depends on
    that iteration's tile loop or matmuls: the next block and the double-buffered accumulator
    both travel while the step computes."""
    from conftest import loop_collective_permute_dependencies

    mesh = make_mesh((8,), ("data",))
    zimg = jax.ShapeDtypeStruct((64, 4), jnp.float32)
    if loss == "softmax":
        fn = lambda x, y: softmax_loss(x, y, 10.0, mesh=mesh, block=4)  # noqa: E731
    else:
        fn = lambda x, y: sigmoid_loss(x, y, 10.0, -10.0, mesh=mesh, block=4)  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(zimg, zimg).compile().as_text()
    dependencies = loop_collective_permute_dependencies(hlo)
    assert len(dependencies) >= 2  # the block and its accumulator, in every ring loop
    for opcodes in dependencies:
        assert not opcodes & {"while", "dot", "convolution"}, sorted(opcodes)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_bfloat16_ring_equals_float32_ring_within_bfloat16_round_off(loss):
    rng = np.random.default_rng(7)
    mesh = make_mesh((8,), ("data",))
    zimg, ztxt = unit_rows(rng, 64, 32), unit_rows(rng, 64, 32)
    value, grads = loss_and_grads(loss, zimg, ztxt, 10.0, -5.0, mesh=mesh, block=4)
    value16, grads16 = loss_and_grads(loss, zimg.astype(jnp.bfloat16), ztxt.astype(jnp.bfloat16), 10.0, -5.0,
                                      mesh=mesh, block=4)
    assert value16.dtype == jnp.float32 and grads16[0].dtype == jnp.bfloat16
    assert 0 < rel_err(value16, value) < 1e-2  # the inputs were rounded to 8 bits of mantissa
    for g16, g in zip(grads16, grads):
        assert rel_err(g16, g) < 3e-2


def test_default_block_is_512_on_cpu_and_large_within_the_budget_on_accelerators(monkeypatch):
    from big_contrast.losses import ring

    assert ring.default_block(make_mesh((8,), ("data",))) == ring.default_block() == 512
    monkeypatch.setattr(ring.jax, "default_backend", lambda: "gpu")
    assert ring.default_block() == 4096  # 6 f32 tiles of 4096^2: 384 MiB
    monkeypatch.setattr(ring, "TILE_BUDGET_BYTES", 100 << 20)
    assert ring.default_block() == 2048
