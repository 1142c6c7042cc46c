"""The general contrastive engine (losses/engine.py, objectives.py): every objective x impl
against a float64 NumPy definition written here from the papers' formulas (values, and
gradients by central differences in float64), on 8 simulated devices, for
several batch layouts and ragged tiles; bf16; extreme scale; duplicates; a teacher identical
to the student; the ring's memory structure; the objective spec and its errors.

Each compiled function computes ALL terms at once (`objective_values`) and is pulled back
with one cotangent per term, so one compile checks every term's gradients."""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from big_contrast.losses import combined_loss, objective_values, parse_objective, softmax_loss

ALL = "softmax + sigmoid + dcl + hard_negatives(alpha=0.7, beta=0.5) + cwcl(tower=image) + distill + align_uniform(alpha=2, t=2, uniformity_weight=0.5)"
SUBSET = "hard_negatives(alpha=0.7, beta=0.5) + cwcl(tower=text) + distill"
NAMES = {ALL: ["softmax", "sigmoid", "dcl", "hard_negatives", "cwcl", "distill", "align_uniform"],
         SUBSET: ["hard_negatives", "cwcl_text", "distill"]}
BATCH, DIM = 40, 4  # 5 rows per device on 8 devices; block 3 leaves a ragged last tile


def objective_unit_rows(rng, batch, dim):
    z = rng.standard_normal((batch, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- float64 definitions


def np_lse(a, axis):
    top = a.max(axis, keepdims=True)
    return (np.log(np.exp(a - top).sum(axis, keepdims=True)) + top).squeeze(axis)


def np_terms(x, y, u, v, scale, bias, teacher_scale, names):
    """{term: value} straight from each paper's formula, full B x B matrices, float64."""
    batch = len(x)
    logits = scale * x @ y.T
    eye = np.eye(batch, dtype=bool)
    pos = np.diag(logits)
    out = {}
    for direction in (logits, logits.T):  # image->text rows, then text->image rows
        ls = direction - np_lse(direction, 1)[:, None]
        out.setdefault("softmax", []).append(-np.diag(ls))
        neg = np.where(eye, -np.inf, direction)
        out.setdefault("dcl", []).append(np_lse(neg, 1) - pos)
        # HN-NCE (DiHT eq. 3): w_ij = (B-1) e^{beta L_ij} / sum_{k!=i} e^{beta L_ik}.
        alpha, beta = 0.7, 0.5
        e_beta = np.where(eye, 0.0, np.exp(beta * direction))
        w = (batch - 1) * e_beta / e_beta.sum(1, keepdims=True)
        denominator = alpha * np.exp(pos) + np.sum(np.where(eye, 0.0, w * np.exp(direction)), 1)
        out.setdefault("hard_negatives", []).append(-np.log(np.exp(pos) / denominator))
        for tower, t in (("cwcl", u), ("cwcl_text", v)):
            wt = 0.5 * (1 + t @ t.T)
            out.setdefault(tower, []).append(-np.sum(wt * ls, 1) / wt.sum(1))
    t_logits = teacher_scale * u @ v.T
    for student, teacher in ((logits, t_logits), (logits.T, t_logits.T)):
        log_pt = teacher - np_lse(teacher, 1)[:, None]
        log_ps = student - np_lse(student, 1)[:, None]
        out.setdefault("distill", []).append(np.sum(np.exp(log_pt) * (log_pt - log_ps), 1))
    values = {name: np.mean(0.5 * (a + b)) for name, (a, b) in out.items()}
    signs = np.where(eye, 1.0, -1.0)
    values["sigmoid"] = np.sum(np.logaddexp(0.0, -signs * (logits + bias))) / batch
    alignment = np.mean(np.sum((x - y) ** 2, 1))  # alpha = 2
    sq_dist = 2.0 - 2.0 * (x @ y.T)  # the cross-modal uniformity on the sphere (objectives.py)
    values["align_uniform"] = alignment + 0.5 * np.log(np.mean(np.exp(-2.0 * sq_dist)))
    return np.array([values[name] for name in names])


def np_gradients(inputs, names, h=1e-6):
    """[n_terms] values and, for x, y, scale, bias, [n_terms, *shape] gradients (central
    differences in float64: truncation ~h^2 scale^3 and round-off ~1e-16 |f| / h both stay
    below 1e-8; the teacher is an input without gradient)."""
    x, y, u, v, scale, bias, teacher_scale = inputs
    f = lambda x, y, s, b: np_terms(x, y, u, v, s, b, teacher_scale, names)  # noqa: E731
    args = [x, y, np.array(scale), np.array(bias)]
    grads = []
    for k, arg in enumerate(args):
        g = np.zeros((len(names),) + arg.shape)
        for idx in np.ndindex(arg.shape):
            evals = []
            for step in (-1, 1):
                moved = [a.copy() for a in args]
                moved[k][idx] += step * h
                evals.append(f(*moved))
            g[(slice(None),) + idx] = (evals[1] - evals[0]) / (2 * h)
        grads.append(g)
    return f(*args), grads


def test_float64_definitions_reduce_to_known_cases():
    """The NumPy definitions themselves: HN-NCE with beta = 0, alpha = 1 is CLIP's loss, and a
    teacher equal to the student distils nothing (so the definitions are not trivially wrong)."""
    rng = np.random.default_rng(0)
    x, y = objective_unit_rows(rng, 12, 4), objective_unit_rows(rng, 12, 4)
    values = np_terms(x, y, x, y, 5.0, 0.0, 5.0, ["softmax", "distill", "dcl"])
    assert abs(values[1]) < 1e-12 and values[2] < values[0]  # removing the positive lowers the loss
    from big_contrast.losses.engine import dense_values

    hn = parse_objective("hard_negatives(alpha=1, beta=0) + softmax")
    got = dense_values(hn, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), {}, jnp.float32(5.0),
                       jnp.float32(0.0), jnp.float32(5.0))
    np.testing.assert_allclose(got[0], got[1], rtol=1e-6)
    np.testing.assert_allclose(got[1], values[0], rtol=1e-6)


# ----------------------------------------------------------------------------- engine vs float64

LAYOUTS = {"none": None, "8dev": ((8,), ("data",)), "2x4": ((2, 4), ("data", "fsdp"))}


def objective_mesh(layout):
    if LAYOUTS[layout] is None:
        return None, "data"
    shape, names = LAYOUTS[layout]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names), names if len(names) > 1 else names[0]


@functools.lru_cache(maxsize=None)
def compiled_values_and_pullback(objective, impl, layout, block):
    """jit of (inputs, cotangent) -> (term values, d(ct . values)/d(every input)): the
    student's (zimg, ztxt, scale, bias), then the teacher's (u, v, teacher_scale)."""
    mesh, axis = objective_mesh(layout)

    def values(x, y, u, v, s, b, ts):
        return objective_values(objective, x, y, s, b, teacher={"image": u, "text": v}, teacher_scale=ts,
                                impl=impl, mesh=mesh, axis=axis, block=block)

    def run(x, y, u, v, s, b, ts, ct):
        out, pullback = jax.vjp(lambda x, y, s, b, u, v, ts: values(x, y, u, v, s, b, ts), x, y, s, b, u, v, ts)
        return out, pullback(ct)

    return jax.jit(run)


def engine_terms_and_grads(objective, impl, layout, block, inputs, dtype=jnp.float32):
    """Term values [n] and per-term gradients, each pulled back with one unit cotangent."""
    run = compiled_values_and_pullback(objective, impl, layout, block)
    x, y, u, v, s, b, ts = inputs
    arrays = [jnp.asarray(a, dtype) for a in (x, y, u, v)] + [jnp.float32(a) for a in (s, b, ts)]
    n = len(NAMES[objective])
    per_term = [run(*arrays, jnp.eye(n, dtype=jnp.float32)[k]) for k in range(n)]
    values = per_term[0][0]
    grads = [np.stack([np.asarray(p[1][i], np.float64) for p in per_term]) for i in range(7)]
    for teacher_grad in grads[4:]:  # the teacher is frozen: exactly zero, for every term
        assert not np.any(teacher_grad)
    return values, grads[:4]


def objective_err(got, truth, floor):
    got, truth = np.asarray(got, np.float64), np.asarray(truth, np.float64)
    return np.linalg.norm(got - truth) / max(np.linalg.norm(truth), floor)


def assert_terms_match(objective, values, grads, truth_values, truth_grads, rtol, floor=1e-3):
    names = NAMES[objective]
    assert values.dtype == jnp.float32 and values.shape == (len(names),)
    for k, name in enumerate(names):
        assert np.isfinite(float(values[k])), name
        assert objective_err(values[k], truth_values[k], 1e-3) <= rtol, (name, float(values[k]), truth_values[k])
        for which, g, tg in zip(("zimg", "ztxt", "scale", "bias"), grads, truth_grads):
            assert np.all(np.isfinite(g[k])), (name, which)
            # floor: a gradient that is (nearly) zero is compared against the size of the
            # largest gradient of that input over all terms, not against itself.
            size = max(np.linalg.norm(tg[m]) for m in range(len(names)))
            err = objective_err(g[k], tg[k], max(floor * size, 1e-5))  # FD noise is ~1e-10
            assert err <= rtol, (name, which, err)


def random_inputs(seed, batch=BATCH, dim=DIM, scale=10.0, bias=-3.0, teacher_scale=7.0):
    rng = np.random.default_rng(seed)
    x, y, u, v = (objective_unit_rows(rng, batch, dim) for _ in range(4))
    return x, y, u, v, scale, bias, teacher_scale


def rounded(inputs, dtype=np.float32):
    """The inputs as the engine sees them (float32 or bfloat16), back in float64."""
    return tuple(np.asarray(jnp.asarray(a, dtype), np.float64) if np.ndim(a) else a for a in inputs)


@pytest.mark.parametrize("impl,layout,objective", [
    ("ring", "8dev", ALL), ("all_gather", "8dev", ALL), ("dense", "none", ALL),
    ("ring", "2x4", ALL), ("ring", "none", SUBSET),
])
def test_every_objective_matches_the_float64_definition(impl, layout, objective):
    inputs = rounded(random_inputs(zlib.crc32(f"{impl}-{layout}".encode())))
    values, grads = engine_terms_and_grads(objective, impl, layout, 3, inputs)
    truth_values, truth_grads = np_gradients(inputs, NAMES[objective])
    assert_terms_match(objective, values, grads, truth_values, truth_grads, rtol=2e-5)


def test_duplicates_confident_pairs_and_extreme_scale_are_finite_and_exact():
    """Every row identical; perfectly aligned pairs; perfectly wrong pairs; at scale 100 (the
    student's and the teacher's). Same compiled ring as the 8-device case above."""
    rng = np.random.default_rng(3)
    base = objective_unit_rows(rng, BATCH, DIM)
    same = np.tile(base[:1], (BATCH, 1))
    cases = [(same, same, same, same), (base, base, base, base), (base, -base, base, base)]
    for x, y, u, v in cases:
        inputs = rounded((x, y, u, v, 100.0, 10.0, 100.0))
        values, grads = engine_terms_and_grads(ALL, "ring", "8dev", 3, inputs)
        truth_values, truth_grads = np_gradients(inputs, NAMES[ALL])
        # float32 logits at scale 100 carry 100 * 6e-8 of round-off: compared against the
        # size of the gradients (the floor), as the plain losses' edge cases are.
        assert_terms_match(ALL, values, grads, truth_values, truth_grads, rtol=5e-4, floor=1.0)


def test_distillation_from_a_teacher_identical_to_the_student_has_zero_gradient():
    x, y, _, _, scale, bias, _ = rounded(random_inputs(11))
    values, grads = engine_terms_and_grads(ALL, "ring", "8dev", 3, (x, y, x, y, scale, bias, scale))
    k, ref = NAMES[ALL].index("distill"), NAMES[ALL].index("softmax")
    assert abs(float(values[k])) < 1e-5
    for g in grads:  # float32 round-off of the softmax gradients' size, no more
        assert np.linalg.norm(g[k]) <= 1e-5 * max(np.linalg.norm(g[ref]), 1e-3)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = rounded(random_inputs(6), jnp.bfloat16)  # the float64 truth of the rounded inputs
    values, grads = engine_terms_and_grads(ALL, "ring", "8dev", 3, inputs, dtype=jnp.bfloat16)
    run = compiled_values_and_pullback(ALL, "ring", "8dev", 3)
    _, raw = run(*[jnp.asarray(a, jnp.bfloat16) for a in inputs[:4]], *map(jnp.float32, inputs[4:]),
                 jnp.ones(len(NAMES[ALL]), jnp.float32))
    assert raw[0].dtype == jnp.bfloat16 and raw[1].dtype == jnp.bfloat16
    truth_values, truth_grads = np_gradients(inputs, NAMES[ALL])
    for k, name in enumerate(NAMES[ALL]):  # products of bfloat16 operands are exact in float32
        assert objective_err(values[k], truth_values[k], 1e-3) < 2e-5, name
        for g, tg in zip(grads[:2], truth_grads[:2]):  # bfloat16 gradients: 8 bits of mantissa
            assert objective_err(g[k], tg[k], 1e-3 * np.linalg.norm(tg)) < 1e-2, name


# ----------------------------------------------------------------------------- memory structure


def objective_largest_tensor(hlo_text):
    shapes = re.findall(r"\b[fsbu]\d+\[([\d,]*)\]", hlo_text)
    return max(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes)


def compile_objective(objective, impl, mesh, batch, dim, block):
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32)

    def loss(x, y, u, v):
        if objective == "plain softmax":
            return softmax_loss(x, y, 10.0, impl=impl, mesh=mesh, block=block)
        return combined_loss(objective, x, y, 10.0, -3.0, teacher=(u, v), impl=impl, mesh=mesh, block=block)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(emb, emb, emb, emb).compile()


def test_the_ring_never_holds_a_local_by_global_block_for_any_objective():
    """No array of the compiled forward + backward of ALL terms is larger than a tile or the
    local rows; per-device temporaries stay within a small multiple of the plain softmax ring
    and far below the local-by-global slice; no ring transfer waits for the step's compute.
    The all-gather scheme is the positive control of the same checks."""
    from conftest import loop_collective_permute_dependencies

    batch, dim, block = 4096, 8, 32
    b = batch // 8
    mesh, _ = objective_mesh("8dev")
    ring = compile_objective(ALL, "ring", mesh, batch, dim, block)
    hlo = ring.as_text()
    assert objective_largest_tensor(hlo) <= max(block * block, b * dim)
    plain = compile_objective("plain softmax", "ring", mesh, batch, dim, block).memory_analysis().temp_size_in_bytes
    temp = ring.memory_analysis().temp_size_in_bytes
    assert temp <= 4 * plain and temp < b * batch * 4 / 8, (temp, plain)
    for opcodes in loop_collective_permute_dependencies(hlo):
        assert not opcodes & {"while", "dot", "convolution"}, sorted(opcodes)
    control = compile_objective("distill", "all_gather", mesh, batch, dim, block)
    assert objective_largest_tensor(control.as_text()) >= b * batch
    assert control.memory_analysis().temp_size_in_bytes > b * batch * 4


# ----------------------------------------------------------------------------- the objective spec


def test_objective_strings_lists_and_weights():
    spec = parse_objective("sigmoid + 0.5 * distill + 0.25*hard_negatives(beta=0.3, alpha=1)")
    assert spec.names == ("sigmoid", "distill", "hard_negatives") and spec.weights == (1.0, 0.5, 0.25)
    assert spec.terms[2][1].beta == 0.3
    assert parse_objective([("sigmoid", 1.0), ("cwcl", 2.0, {"tower": "text"})]).terms[1][1].tower == "text"
    assert parse_objective([{"name": "dcl", "weight": 3}]).weights == (3.0,)
    assert len(parse_objective("softmax + distill + cwcl").stats) == 8  # shared statistics counted once
    rng = np.random.default_rng(2)
    x, y, u, v = (jnp.asarray(objective_unit_rows(rng, 16, 4), jnp.float32) for _ in range(4))
    loss, terms = combined_loss("softmax + 0.5 * distill", x, y, 10.0, teacher=(u, v), impl="dense", with_terms=True)
    assert set(terms) == {"softmax", "distill"}
    np.testing.assert_allclose(loss, terms["softmax"] + 0.5 * terms["distill"], rtol=1e-6)


@pytest.mark.parametrize("spec,message", [
    ("sigmoid + 0.5 * distil", r"Unknown objective term 'distil'; choose one of softmax, sigmoid"),
    ("-1 * sigmoid", r"weight of objective term 'sigmoid' must be a finite number > 0, got -1"),
    ("0 * sigmoid", r"must be a finite number > 0, got 0"),
    ("hard_negatives(beta=-1)", r"hard_negatives beta must be a finite number >= 0"),
    ("hard_negatives(alpha=0)", r"hard_negatives alpha must be in \(0, 1\]"),
    ("hard_negatives(gamma=1)", r"has no option 'gamma'; its options are \['alpha', 'beta'\]"),
    ("cwcl(tower=audio)", r"cwcl tower must be 'image' or 'text', got 'audio'"),
    ("align_uniform(t=0)", r"align_uniform t must be a finite number > 0"),
    ("align_uniform(alpha=inf)", r"align_uniform alpha must be a finite number > 0"),
    ("align_uniform(uniformity_weight=-1)", r"uniformity_weight must be a finite number >= 0"),
    ("sigmoid +", r"Cannot read objective term ''"),
    ("hard_negatives(beta=hard)", r"option beta must be a number, got 'hard'"),
])
def test_bad_objectives_fail_with_one_sentence(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_objective(spec)


def test_a_missing_or_misshapen_teacher_fails_early():
    z = jnp.zeros((8, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"needs the teacher's image embeddings"):
        combined_loss("distill", z, z, 1.0, impl="dense")
    with pytest.raises(ValueError, match=r"teacher's text embeddings must be \[8, D_teacher\].*\(4, 4\)"):
        combined_loss("cwcl(tower=text)", z, z, 1.0, teacher={"text": z[:4]}, impl="dense")


def test_large_batches_trace_without_integer_overflow():
    """B^2 of B = 65,536 overflows int32; every term must trace at 2^16 and 2^20 (no compile)."""
    for batch in (2**16, 2**20):
        z = jax.ShapeDtypeStruct((batch, 2), jnp.float32)
        out = jax.eval_shape(lambda x: objective_values(ALL, x, x, 10.0, teacher=(x, x), impl="dense"), z)
        assert out.shape == (len(NAMES[ALL]),)


def test_explicit_axes_mesh_ring():
    """jax.make_mesh's Explicit (sharding-in-types) axes, inputs and teacher arriving sharded."""
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x, y, u, v, scale, bias, ts = (jnp.asarray(a, jnp.float32) if np.ndim(a) else a for a in random_inputs(8, batch=32))
    grad = lambda impl, **kw: jax.jit(jax.value_and_grad(lambda x, y, u, v: combined_loss(  # noqa: E731
        SUBSET, x, y, scale, bias, teacher=(u, v), teacher_scale=ts, impl=impl, block=3, **kw), argnums=(0, 1)))
    ref_value, ref_grads = grad("dense")(x, y, u, v)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh):
        value, grads = grad("ring", mesh=mesh, axis=("data", "fsdp"))(*(jax.device_put(a, rows) for a in (x, y, u, v)))
    assert objective_err(value, ref_value, 1e-3) < 2e-5
    for g, ref in zip(grads, ref_grads):
        assert objective_err(g, ref, 1e-3) < 2e-5
