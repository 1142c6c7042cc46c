"""NaFlex in training (issue 22): patch dropout among the real patches, the step with gradient
caching and the ring loss on NaFlex batches, config checks, `plan`, and a demo run that trains
and evaluates through the NaFlex forward. Tiny towers, 8 simulated devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import models, sharding
from big_contrast.data import naflex as naflex_data
from big_contrast.errors import ConfigError
from big_contrast.models import naflex
from big_contrast.train.step import LossSpec, loss_and_grads
from conftest import random_model, rel_err

PATCH, GRID, BUDGET, B = 4, 4, 12, 16  # a 4x4 learned table, up to 12 patches, 2 rows per device
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def model_config(pool="gap", loss="sigmoid", **image):
    cfg = models.default_model_config()
    cfg.image.update(dict(variant="mu/4", image_size=PATCH * GRID, pool=pool, posemb="learn", **image))
    cfg.text.update(variant="mu", vocab_size=50, max_len=8, causal=loss == "softmax")
    cfg.update(embed_dim=16, loss=loss)
    return cfg


def naflex_batch(seed=1, rows=B):
    """Random images of mixed aspect ratios as one NaFlex batch (numpy), with random tokens."""
    rng = np.random.default_rng(seed)
    sizes = [(37, 91), (50, 17), (9, 9), (16, 16), (20, 33), (40, 12), (7, 30), (25, 25)]  # wide, tall, ...
    images = [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), np.uint8) for i in range(rows)]
    batch = naflex_data.naflex_batch(images, patch_size=PATCH, max_num_patches=BUDGET)
    return dict(batch, text=rng.integers(2, 50, size=(rows, 8)).astype(np.int32))


def keys(n, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


# ----------------------------------------------------------------------------- the tower


@pytest.mark.parametrize("pool", ["gap", "tok", "map"])
def test_patch_dropout_on_a_full_square_image_equals_the_fixed_resolution_vits(pool):
    vit = random_model(model_config(pool, patch_dropout=0.5)).image
    pixels = np.random.default_rng(2).normal(size=(3, 16, 16, 3)).astype(np.float32)
    patches = np.stack([naflex_data.patchify(p, PATCH) for p in pixels])
    full = (jnp.ones((3, GRID * GRID), bool), jnp.full((3, 2), GRID, jnp.int32))
    dropped = nnx.jit(naflex.naflex_features)(vit, jnp.asarray(patches), *full, keys(3))
    fixed = nnx.jit(lambda m, x, k: m(x, k))(vit, jnp.asarray(pixels), keys(3))
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(fixed), rtol=1e-5, atol=1e-5)
    undropped = nnx.jit(naflex.naflex_features)(vit, jnp.asarray(patches), *full)
    assert not np.allclose(np.asarray(dropped), np.asarray(undropped), atol=1e-3)  # it did drop


def test_patch_dropout_keeps_a_fraction_of_each_images_real_patches_in_order():
    length, real = 24, np.array([24, 10, 3, 1, 0])
    valid_bn = jnp.asarray(np.arange(length)[None] < real[:, None])
    x_bnd = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None], (5, length, 2))
    tokens, kept = naflex.keep_real_patches(x_bnd, valid_bn, keys(5), 0.5)
    tokens, kept = np.asarray(tokens[..., 0]).astype(int), np.asarray(kept)
    assert tokens.shape == kept.shape == (5, 12)  # max(1, int(24 * 0.5)) slots
    np.testing.assert_array_equal(kept.sum(1), [12, 5, 1, 1, 0])  # max(1, int(n * 0.5)); no real patch: none
    for row in range(5):
        chosen = tokens[row][kept[row]]
        assert (chosen < real[row]).all() and (np.diff(chosen) > 0).all()  # real patches, original order
        assert not kept[row, kept[row].sum():].any()  # the kept ones fill the first slots
    other_tokens = np.asarray(naflex.keep_real_patches(x_bnd, valid_bn, keys(5, seed=1), 0.5)[0][..., 0])
    assert (other_tokens[0] != tokens[0]).any()  # another key, another subset


def test_padding_rows_of_an_evaluation_batch_embed_to_finite_values():
    model = random_model(model_config("map"))
    batch = naflex_batch(rows=2)
    images = naflex.NaflexImages(*(np.concatenate([batch[k][:1], np.zeros_like(batch[k][:1])])
                                   for k in naflex.NAFLEX_FIELDS))
    zimg = np.asarray(nnx.jit(lambda m, x: m.embed_images(x))(model, images))
    assert np.isfinite(zimg).all()
    alone = np.asarray(nnx.jit(lambda m, x: m.embed_images(x))(model, naflex.NaflexImages(*(a[:1] for a in images))))
    np.testing.assert_allclose(zimg[:1], alone, rtol=1e-5, atol=1e-6)  # the padding row changes nothing


def test_embed_images_of_a_naflex_batch_is_the_naflex_forward_and_each_image_embeds_alone_as_in_the_batch():
    model = random_model(model_config("map"))
    batch = naflex_batch(rows=4)
    assert len({tuple(s) for s in batch["spatial_shapes"]}) > 1  # mixed grids
    embed = nnx.jit(lambda m, x: m.embed_images(x))
    together = np.asarray(embed(model, naflex.image_input(batch)))
    direct = nnx.jit(naflex.naflex_embed_images)(model, *(jnp.asarray(batch[k]) for k in naflex.NAFLEX_FIELDS))
    np.testing.assert_array_equal(together, np.asarray(direct))
    for i in range(4):
        alone = np.asarray(embed(model, naflex.image_input({k: v[i:i + 1] for k, v in batch.items()})))
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the step


def setup(mesh_shape=(4, 2, 1), axis_types="auto", loss="sigmoid", **image):
    config = model_config(loss=loss, **image)
    mesh = sharding.make_mesh(tuple(zip(("data", "fsdp", "tensor"), mesh_shape)), axis_types=axis_types)
    graphdef, params, rest = nnx.split(random_model(config), nnx.Param, ...)
    params = nnx.to_pure_dict(sharding.shard_state(params, mesh))
    batch = jax.device_put(naflex_batch(), sharding.batch_sharding(mesh))

    @functools.lru_cache(maxsize=None)
    def step(microbatches, impl="ring"):
        fn = functools.partial(loss_and_grads, graphdef, rest=rest, loss=LossSpec(loss, impl=impl), mesh=mesh,
                               axis=sharding.batch_axes(mesh), microbatches=microbatches)
        return jax.jit(lambda params, batch, step: fn(params, batch=batch, step=step), compiler_options=FAST)

    return step, params, batch


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_a_naflex_step_with_gradient_caching_and_the_ring_equals_the_one_pass_step_and_dense():
    """data x fsdp = 4 x 2, patch dropout 0.5: the second pass of gradient caching must redraw
    the first pass's masks among each image's real patches."""
    step, params, batch = setup(patch_dropout=0.5)
    loss_1, _, grads_1 = step(1)(params, batch, jnp.int32(3))
    loss_k, _, grads_k = step(2)(params, batch, jnp.int32(3))
    assert np.isfinite(float(loss_1))
    assert rel_err(loss_k, loss_1) <= 1e-5
    assert rel_err(flat(grads_k), flat(grads_1)) <= 1e-5
    assert np.abs(flat(grads_1["image"])).max() > 0  # the image tower learns through the NaFlex forward
    loss_dense, _, grads_dense = step(1, "dense")(params, batch, jnp.int32(3))
    assert rel_err(loss_1, loss_dense) <= 1e-5
    assert rel_err(flat(grads_1), flat(grads_dense)) <= 1e-5
    other_step, _, _ = step(1)(params, batch, jnp.int32(4))
    assert float(other_step) != float(loss_1)  # the masks depend on the step


@pytest.mark.slow
def test_on_an_explicit_mesh_the_softmax_ring_with_gradient_caching_equals_one_pass():
    step, params, batch = setup(axis_types="explicit", loss="softmax")
    loss_k, _, grads_k = step(2)(params, batch, jnp.int32(0))
    loss_1, _, grads_1 = step(1)(params, batch, jnp.int32(0))
    assert rel_err(loss_k, loss_1) <= 1e-5
    assert rel_err(flat(grads_k), flat(grads_1)) <= 2e-5  # float32 round-off of the softmax


# ----------------------------------------------------------------------------- config, plan, a run


def demo_config(arg="naflex,noeval", **overrides):
    from configs import demo

    config = demo.get_config(arg)
    config.update(dict(batch_size=32, total_steps=6, log_every=1, checkpoint_every=100), **overrides)
    config.data.sources.demo.size = 500
    return config


def _self_distill(config):
    from configs import demo

    demo.self_distillation(config)  # SILC / TIPS: their teacher and masked view read fixed-size images
    config.ema = dict(decay=0.99, start_step=0, every=1)


@pytest.mark.parametrize("change, words", [
    (lambda c: c.data.update(pp_train="decode|naflex(patch_size=4, max_num_patches=16)"), "use naflex.patch_size=8"),
    (lambda c: c.model.image.update(posemb="sincos2d"), "set config.model.image.posemb='learn'"),
    (lambda c: c.model.update(decoder=dict(width=64, depth=1, num_heads=4, mlp_dim=256)), "does not take NaFlex"),
    (lambda c: _self_distill(c), "config.self_distillation with a NaFlex config.data.pp_train is not built"),
    (lambda c: c.update(loss_objective="softmax + 0.5 * distill", teacher=dict(workdir="/no/such/teacher")),
     "with a NaFlex config.data.pp_train is not built"),
])
def test_a_naflex_config_that_cannot_work_fails_in_one_sentence(change, words):
    from big_contrast.train import validate

    config = demo_config()
    change(config)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\W")):
        validate(config, 8)


def test_plan_counts_a_naflex_step_at_the_patch_budget():
    from big_contrast.train.naflex import abstract_images
    from big_contrast.train.plan import format_plan, plan

    config = demo_config()
    images = abstract_images(config, 2)
    assert [x.shape for x in images] == [(2, 16, 192), (2, 16), (2, 2)]  # sequence = max_num_patches
    assert abstract_images(demo_config("noeval"), 2) is None
    naflex_plan = plan(config, device_memory_bytes=2**30, num_devices=8)
    assert "image input: NaFlex, 16 patches of 8x8 px" in format_plan(naflex_plan)
    bigger = demo_config()
    bigger.data.pp_train = "decode|naflex(patch_size=8, max_num_patches=64)"
    assert plan(bigger, device_memory_bytes=2**30, num_devices=8)["activation_bytes_per_example"] > \
        2 * naflex_plan["activation_bytes_per_example"]  # 4x the tokens


def naflex_run_config(steps=40):
    config = demo_config("naflex", total_steps=steps, log_every=10, checkpoint_every=steps, microbatch_size=2)
    config.optimizer.warmup_steps = 5
    for name in ("shape", "heldout"):
        del config.evals[name]
    for name in ("colour", "retrieval"):
        config.evals[name].update(every_steps=0, batch_size=48)
        config.evals[name].data.sources.demo.size = 96
    return config


@pytest.mark.slow
def test_a_naflex_demo_run_trains_with_gradient_caching_and_evaluates_through_the_naflex_forward(tmp_path):
    import json

    from big_contrast.train import train

    results = train(naflex_run_config(), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert results["colour/top1"] > 1 / 8 + 0.1, results  # 8 colours: above chance
    assert results["retrieval/i2t_recall@1"] > 0, results  # the NaFlex eval embeddings retrieve something


def test_evaluators_embed_naflex_eval_batches_once_each_sharded_and_unpadded():
    from big_contrast.evaluate.embed import VALID, embed_dataset
    from big_contrast.train.evals import EvalData, eval_data_config

    config = demo_config("naflex")
    evaluator = type("Evaluator", (), dict(config={"data": config.evals.colour.data.to_dict()}))
    data_config = eval_data_config(config, evaluator)
    data_config.sources.demo.size = 40
    batches = list(EvalData(data_config, 16))  # 40 images: 3 batches, the last one half padding
    assert isinstance(batches[0]["image"], naflex.NaflexImages) and "patches" not in batches[0]
    assert [int(b[VALID].sum()) for b in batches] == [16, 16, 8]
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))

    def summary(images):  # stands in for the image tower: two numbers per image
        assert all(x.sharding.spec[0] == ("data", "fsdp") for x in images)  # global, sharded over the batch
        return jax.jit(lambda x: jnp.stack([x.patches.sum((1, 2)), x.patch_mask.sum(1) * 1.0], axis=1))(images)

    out = embed_dataset(batches, {"z": ("image", summary)}, batch_size=16, mesh=mesh,
                        keep=["label/colour"])
    patches = np.concatenate([b["image"].patches[b[VALID]] for b in batches])
    masks = np.concatenate([b["image"].patch_mask[b[VALID]] for b in batches])
    assert out["z"].shape == (40, 2)
    np.testing.assert_allclose(out["z"][:, 0], patches.sum((1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(out["z"][:, 1], masks.sum(1))


# Compiles many train steps (about 1-3 min on a cold cache): run by `make test-slow`, keeping `make test` short.
pytestmark = pytest.mark.slow
