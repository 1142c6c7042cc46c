"""The train step on its own: gradient caching reduces the parameter gradients once per step
(counted in the compiled HLO) on Auto and Explicit data x fsdp meshes; patch
dropout through both passes. Tiny towers with numpy weights, 8 simulated devices. Last, the
trainer's compiled step with gradient caching against one pass, on the demo towers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from big_contrast import models, sharding
from big_contrast.data import make_pipeline
from big_contrast.train import build
from big_contrast.train.loop import make_step_fn
from big_contrast.train.step import LossSpec, StepConfig, TrainState, loss_and_grads, make_train_step
from conftest import all_reduce_elements, random_model, rel_err
from test_train import tiny_config as train_config  # the demo run's config (tiny_config here is a model's)

B = 16  # 2 rows per device on 8 devices: 2 micro-batches of 1
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def tiny_config(loss="sigmoid", **image):
    cfg = models.default_model_config()
    cfg.image.update(dict(dict(variant="mu/8", image_size=16, pool="gap", posemb="sincos2d"), **image))
    cfg.text.update(variant="mu", vocab_size=50, max_len=8, causal=loss == "softmax")
    cfg.update(embed_dim=16, loss=loss)
    return cfg


def setup(mesh_shape, axis_types="auto", loss="sigmoid", **image):
    """(step(microbatches, step_number) -> (loss, aux, grads), params, batch, mesh) on a mesh."""
    config = tiny_config(loss, **image)
    mesh = sharding.make_mesh(tuple(zip(("data", "fsdp", "tensor"), mesh_shape)), axis_types=axis_types)
    model = random_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(sharding.shard_state(params, mesh))
    rng = np.random.default_rng(1)
    size = config.image.image_size
    batch = dict(image=rng.normal(size=(B, size, size, 3)).astype(np.float32),
                 text=rng.integers(2, 50, size=(B, 8)).astype(np.int32))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    @functools.lru_cache(maxsize=None)
    def step(microbatches):
        fn = functools.partial(loss_and_grads, graphdef, rest=rest, loss=LossSpec(loss), mesh=mesh,
                               axis=sharding.batch_axes(mesh), microbatches=microbatches)
        return jax.jit(lambda params, batch, step: fn(params, batch=batch, step=step), compiler_options=FAST)

    return step, params, batch, mesh


# ----------------------------------------------------------------------------- tests


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("axis_types,patch_dropout", [("auto", 0.5), ("explicit", 0.0)])
def test_gradient_caching_reduces_gradients_once_and_equals_the_one_pass_step(axis_types, patch_dropout):
    """data x fsdp = 4 x 2. Under FSDP (Auto axes) a parameter's gradient is reduce-scattered
    over `fsdp` in the loop and its shard all-reduced over `data` after it; Explicit meshes keep
    whole accumulators and all-reduce them once after the loop. With patch dropout the second
    pass must redraw the first pass's masks (seeded by step and row) to match one pass."""
    step, params, batch, _ = setup((4, 2, 1), axis_types, patch_dropout=patch_dropout)
    shard = (lambda x: x.size) if axis_types == "explicit" else (lambda x: np.prod(x.sharding.shard_shape(x.shape)))
    n_params = sum(shard(x) for x in jax.tree.leaves(params))
    cached = step(2)
    inside, outside = all_reduce_elements(cached.lower(params, batch, jnp.int32(3)).compile().as_text())
    assert inside == 0
    # Every parameter gradient (shard) is all-reduced exactly once (plus a few loss scalars).
    assert n_params <= outside <= n_params + 64, (outside, n_params)

    loss_1, _, grads_1 = step(1)(params, batch, jnp.int32(3))
    loss_k, _, grads_k = cached(params, batch, jnp.int32(3))
    assert rel_err(loss_k, loss_1) <= 1e-5
    assert rel_err(flat(grads_k), flat(grads_1)) <= 1e-5
    if patch_dropout:
        again, _, _ = step(1)(params, batch, jnp.int32(3))
        other_step, _, _ = step(1)(params, batch, jnp.int32(4))
        assert float(again) == float(loss_1)  # deterministic: a resumed step redraws the same masks
        assert float(other_step) != float(loss_1)  # the masks depend on the step


def test_step_benchmark_imports_without_the_data_stack():
    """experiments/step_throughput must run on an accelerator image without grain, TFDS,
    array_record, ml_collections or tensorboardX: import it with those modules blocked."""
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    code = (
        "import runpy, sys\n"
        "for name in ('grain', 'tensorflow_datasets', 'array_record', 'ml_collections', 'tensorboardX', 'cv2'):\n"
        "    sys.modules[name] = None  # importing any of them raises ImportError\n"
        "bench = runpy.run_path('experiments/step_throughput/run.py')\n"
        "args = bench['parse_args'](['--quick'])\n"
        "print(bench['model_config'](args, bench['Variant']('base'))['image']['variant'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('big_contrast')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                         env=dict(__import__("os").environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "Ti/16"
    loaded = eval(out.stdout.splitlines()[1])  # noqa: S307 - a list literal printed above
    data_modules = {m for m in loaded if m.startswith("big_contrast.data.")}
    assert data_modules <= {"big_contrast.data.device_ops"}, data_modules  # the step's uint8 op only
    assert "big_contrast.train.loop" not in loaded


def test_the_step_jitted_as_state_and_batch_equals_loss_and_grads_and_the_update():
    """`StepConfig` binds the step's fixed arguments once; the jitted `step(state, batch)` gives
    what the step computes from its parts (gradient caching with patch dropout, seeded by the
    state's step and `seed`): the same loss, metrics and new parameters."""
    config = tiny_config("softmax", patch_dropout=0.5)
    graphdef, params, rest = nnx.split(random_model(config), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(2)
    batch = dict(image=jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
                 text=jnp.asarray(rng.integers(2, 50, size=(4, 8)), jnp.int32))
    tx, loss = optax.adamw(1e-2), LossSpec("softmax", "dense")
    state = TrainState(step=jnp.int32(3), params=params, opt_state=tx.init(params))
    fixed = StepConfig(graphdef=graphdef, rest=rest, tx=tx, loss=loss, lr_fn=lambda s: 0.5 * s,
                       microbatches=2, seed=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fixed.seed = 6
    new, metrics = jax.jit(make_train_step(fixed), compiler_options=FAST)(state, batch)

    def reference(params, opt_state, batch):
        value, aux, grads = loss_and_grads(graphdef, params, rest, batch, loss=loss, mesh=None,
                                           axis=None, microbatches=2, step=jnp.int32(3), seed=5)
        updates, _ = tx.update(grads, opt_state, params)
        return value, aux, optax.apply_updates(params, updates)

    value, aux, expected = jax.jit(reference, compiler_options=FAST)(params, state.opt_state, batch)
    assert int(new.step) == 4 and float(metrics["learning_rate"]) == 1.5
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
    np.testing.assert_allclose(metrics["scale"], aux["scale"], rtol=1e-6)
    np.testing.assert_allclose(flat(new.params), flat(expected), rtol=1e-5, atol=1e-7)
    assert rel_err(flat(new.params), flat(params)) > 1e-4  # the update moved the parameters


# ----------------------------------------------------------------------------- through the trainer


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_gradient_caching_step_equals_the_one_pass_step(loss):
    """One step with 4 micro-batches of 1 row per device vs one pass: same parameters after."""
    config = train_config(loss)
    # Plain SGD at a constant rate: the parameters after the step are a linear function of the
    # gradient. (One Adam step moves every parameter by +-lr whatever the gradient's size, so
    # round-off on a gradient that is ~0 would flip whole steps.)
    config.optimizer.update(name="sgd", momentum=None, lr=0.1, warmup_steps=0, schedule="constant",
                            grad_clip_norm=0.0)
    run = build(config)
    batch_sharding = sharding.batch_sharding(run.mesh)
    with make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size) as data:
        batch = {k: v for k, v in next(data).items() if k in ("image", "text")}
    initial = jax.device_get(run.state.params)
    results = {}
    for micro in (None, 1):
        cfg = config.copy_and_resolve_references()
        cfg.microbatch_size = micro
        state = jax.tree.map(jnp.copy, run.state)  # the step donates its input state
        state, metrics = make_step_fn(dataclasses.replace(run, config=cfg), batch_sharding)(state, batch)
        results[micro] = jax.device_get(state.params), float(metrics["loss"])
    (full_params, full_loss), (cached_params, cached_loss) = results[None], results[1]
    assert rel_err(cached_loss, full_loss) <= 1e-5
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    full, cached, start = leaves(full_params), leaves(cached_params), leaves(initial)
    assert rel_err(np.concatenate([x.ravel() for x in cached]), np.concatenate([x.ravel() for x in full])) <= 1e-5
    update_norm = np.sqrt(sum(np.sum((f - i) ** 2) for f, i in zip(full, start)))
    for f, c, i in zip(full, cached, start):
        step = np.linalg.norm(f - i)
        if step > 1e-6 * update_norm:
            assert rel_err(c, f) <= 1e-5
        else:
            # A parameter with no gradient (attention key biases: softmax is shift-invariant)
            # moves by round-off only, in both runs.
            assert np.linalg.norm(c - i) <= 1e-6 * update_norm
    # The step moved both towers (so the comparison is not between two untouched copies).
    for tower in ("image", "text"):
        moved = [np.linalg.norm(f - i) for f, i in zip(leaves(full_params[tower]), leaves(initial[tower]))]
        assert max(moved) > 1e-3, tower
