"""SigLIP 2's SILC / TIPS in the train step (train/self_distill.py): the tower at another patch grid
and with a mask token, the terms against references built from the losses module, the teacher gets
no gradient, gradient caching is exact, and each term starts at its step with one compile per phase."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import models
from big_contrast.errors import ConfigError
from big_contrast.losses.self_distillation import (
    masked_patch_loss, patch_mask, self_distillation_loss, sinkhorn_targets)
from big_contrast.models import posemb
from big_contrast.train import self_distill as sd
from big_contrast.train import siglip2
from big_contrast.train.step import LossSpec, loss_and_grads, patch_keys
from conftest import random_model, rel_err

FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
SETTINGS = sd.SelfDistillConfig(silc_weight=0.6, tips_weight=0.3, mask_ratio=0.5)


def tiny_model_config(pool="tok", decoder=False):
    cfg = models.default_model_config()
    cfg.image.update(variant="mu/8", image_size=16, pool=pool, posemb="learn")
    cfg.text.update(variant="mu", vocab_size=50, max_len=8)
    cfg.update(embed_dim=16, distill_head=dict(hidden=24, bottleneck=8, prototypes=12))
    if decoder:
        cfg.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    return cfg


def batch_of(n, seed=1, views=2):
    rng = np.random.default_rng(seed)
    return dict(image=jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
                text=jnp.asarray(rng.integers(2, 50, size=(n, 8)), jnp.int32),
                local_images=jnp.asarray(rng.normal(size=(n, views, 8, 8, 3)), jnp.float32))


def test_a_model_holds_the_head_and_mask_token_only_when_configured():
    plain = tiny_model_config()
    plain.distill_head = None
    assert models.abstract_model(plain).distill_head is None
    model = models.abstract_model(tiny_model_config())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params["mask_token"].shape == (32,) and params["distill_head"]["prototypes"].shape == (8, 12)
    assert model.distill_head.config.input_width == 32  # the image tower's width


@pytest.mark.parametrize("pool", ["tok", "map"])
def test_the_tower_at_its_own_grid_is_the_vit_and_at_another_grid_uses_the_resampled_table(pool):
    model = random_model(tiny_model_config(pool))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 3)), jnp.float32)
    np.testing.assert_allclose(sd.encode_views(model.image, images), model.image.encode(images), rtol=1e-5, atol=1e-5)
    # At 24 px (3 x 3 patches): the ViT of that size with posemb.py's resampled table, run alike.
    big = tiny_model_config(pool)
    big.image.image_size = 24
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    table = np.asarray(params["image"]["posemb"])
    params["image"]["posemb"] = posemb.resample_image_posemb(table, (2, 2), (3, 3), class_token=pool == "tok")
    other = models.create_from_params(big, params)
    crops = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 24, 24, 3)), jnp.float32)
    expected = other.image(crops.reshape(8, 24, 24, 3)).reshape(2, 4, -1)
    np.testing.assert_allclose(sd.local_features(model.image, crops), expected, rtol=1e-4, atol=1e-5)


def test_the_mask_token_replaces_exactly_the_masked_patch_embeddings():
    model = random_model(tiny_model_config("gap"))
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
    none = jnp.zeros((2, 4), bool)
    token = jnp.arange(32, dtype=jnp.float32)
    np.testing.assert_allclose(sd.encode_views(model.image, images, none, token), model.image.encode(images), rtol=1e-5)
    mask = jnp.asarray([[True, False, False, True], [False, False, False, False]])
    masked = sd.encode_views(model.image, images, mask, token)
    np.testing.assert_allclose(masked[1], model.image.encode(images)[1], rtol=1e-5, atol=1e-6)  # row 1 unmasked
    changed = sd.encode_views(model.image, images.at[0].set(0.0), mask, token)  # pixels of row 0 changed
    assert not np.allclose(changed[0], masked[0])


def run_terms(cfg, terms, batch, micro, teacher_params=None, step=5, seed=2, params=None):
    graphdef, state_params, rest = nnx.split(random_model(cfg), nnx.Param, ...)
    params = nnx.to_pure_dict(state_params) if params is None else params
    teacher = jax.tree.map(lambda x: x * 0.9, params) if teacher_params is None else teacher_params
    value, aux, grads = loss_and_grads(graphdef, params, rest, batch, loss=LossSpec("sigmoid", "dense"), mesh=None,
                                       axis=None, microbatches=micro, step=jnp.int32(step), seed=seed, terms=terms,
                                       self_distill_teacher=teacher)
    return value, aux["terms"], grads


def test_the_terms_equal_references_from_the_losses_module():
    cfg = tiny_model_config()
    terms = sd.SelfDistillTerms(None, SETTINGS, ("silc", "tips"))
    batch = batch_of(4)
    value, metrics, _ = jax.jit(lambda: run_terms(cfg, terms, batch, 1), compiler_options=FAST)()
    model = random_model(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    teacher = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.9, params), rest)
    encoded_t = teacher.image.encode(batch["image"])
    global_targets = sinkhorn_targets(teacher.distill_head(teacher.image.pool_features(encoded_t)), 0.04)
    tokens_t = teacher.distill_head(encoded_t[:, 1:])  # [4, 4 patches, K]
    patch_targets = sinkhorn_targets(tokens_t.reshape(16, -1), 0.04).reshape(tokens_t.shape)
    local = sd.local_features(model.image, batch["local_images"])  # [4, 2, D]
    silc = self_distillation_loss(jnp.swapaxes(model.distill_head(local), 0, 1), global_targets, 0.1)
    mask = patch_mask(jax.vmap(lambda k: jax.random.fold_in(k, sd.TIPS_STREAM))(patch_keys(5, jnp.arange(4), 2)), 4, 0.5)
    student = model.distill_head(sd.encode_views(model.image, batch["image"], mask, params["mask_token"])[:, 1:])
    tips = masked_patch_loss(student, patch_targets, mask, 0.1)
    np.testing.assert_allclose(float(metrics["loss/silc"]), float(silc), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/tips"]), float(tips), rtol=1e-5)
    np.testing.assert_allclose(float(value), float(metrics["loss/contrastive"]) + 0.6 * float(silc)
                               + 0.3 * float(tips), rtol=1e-5)


def test_the_ema_teacher_receives_no_gradient_but_shapes_the_loss():
    cfg = tiny_model_config()
    terms = sd.SelfDistillTerms(None, SETTINGS, ("silc", "tips"))
    batch = batch_of(4)
    params = nnx.to_pure_dict(nnx.state(random_model(cfg), nnx.Param))

    def loss_of_teacher(teacher):
        return run_terms(cfg, terms, batch, 1, teacher_params=teacher, params=params)[0]

    def both(teacher, other):
        value, grads = jax.value_and_grad(loss_of_teacher)(teacher)
        return grads, value, loss_of_teacher(other)

    grads, value, other_value = jax.jit(both, compiler_options=FAST)(
        jax.tree.map(lambda x: x * 0.9, params), jax.tree.map(lambda x: x * 0.5, params))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert abs(float(other_value) - float(value)) > 1e-4  # the teacher does shape the loss


def test_gradient_caching_micro_batches_silc_tips_and_captioning_exactly():
    cfg = tiny_model_config(decoder=True)
    base = siglip2.Terms(caption_weight=0.7, parallel_fraction=0.5, pad_id=0)
    terms = sd.SelfDistillTerms(base, SETTINGS, ("silc", "tips"))
    batch = batch_of(8)
    (v1, m1, g1), (v4, m4, g4) = (jax.jit(lambda k=k: run_terms(cfg, terms, batch, k), compiler_options=FAST)()
                                  for k in (1, 4))
    assert rel_err(float(v4), float(v1)) < 1e-5
    for key in ("loss/silc", "loss/tips", "loss/caption", "loss/contrastive"):
        assert rel_err(float(m4[key]), float(m1[key])) < 1e-5, key
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert rel_err(flat(g4), flat(g1)) < 1e-4
    assert np.linalg.norm(flat(g1["distill_head"])) > 0 and np.linalg.norm(g1["mask_token"]) > 0
    np.testing.assert_allclose(float(v1), float(m1["loss/contrastive"]) + 0.7 * float(m1["loss/caption"])
                               + 0.6 * float(m1["loss/silc"]) + 0.3 * float(m1["loss/tips"]), rtol=1e-5)


def test_phases_start_each_term_at_its_fraction():
    settings = sd.SelfDistillConfig(silc_start_fraction=0.5, tips_start_fraction=0.8)
    assert sd.phases(settings, 10) == [(0, ()), (5, ("silc",)), (8, ("silc", "tips"))]
    assert sd.phases(sd.SelfDistillConfig(), 10) == [(0, ()), (8, ("silc", "tips"))]  # SigLIP 2: 2 compiles
    assert sd.phases(sd.SelfDistillConfig(tips_weight=0.0), 10) == [(0, ()), (8, ("silc",))]


@pytest.mark.parametrize("section, match", [
    (dict(silc_weight=-1.0), "silc_weight"), (dict(tips_start_fraction=1.0), "tips_start_fraction"),
    (dict(mask_ratio=0.0), "mask_ratio"), (dict(teacher_temperature=0.0), "teacher_temperature"),
    (dict(bogus=1), "unknown fields"),
])
def test_bad_settings_are_one_sentence(section, match):
    with pytest.raises(ConfigError, match=match):
        sd.SelfDistillConfig.from_config(section)


def demo_config(**overrides):
    from test_train import demo

    config = demo.get_config("siglip2,self_distill,noeval,total_steps=4")
    config.update(batch_size=16, log_every=1, checkpoint_every=100, **overrides)
    config.data.sources.demo.size = 200
    config.model.decoder = None  # keep it small: the decoder is covered by the micro-batch test above
    config.self_distillation.update(silc_start_fraction=0.5, tips_start_fraction=0.75)
    config.ema = dict(decay=0.9, start_step=2)
    return config


def test_validation_names_what_is_missing():
    from big_contrast.train.config import validate

    for where, key, value, match in [((), "ema", None, "config.ema"),
                                     (("model",), "distill_head", None, "distill_head"),
                                     (("data",), "local_crops", None, "local_crops"),
                                     (("data",), "local_crops", dict(size=12), "multiple of the patch"),
                                     ((), "ema", dict(start_step=3), "teacher would be the student")]:
        config = demo_config()
        node = config if not where else config[where[0]]
        with node.ignore_type():
            setattr(node, key, value)
        with pytest.raises(ConfigError, match=match):
            validate(config, 8)


@pytest.mark.slow
def test_each_term_is_absent_before_its_step_and_present_after_with_one_compile_per_phase(tmp_path, monkeypatch):
    from big_contrast.train import loop, train
    from big_contrast.train.metrics import read_metrics

    compiles = []
    real = loop._compile
    monkeypatch.setattr(loop, "_compile", lambda fn, state, batch: compiles.append(int(state.step)) or real(fn, state, batch))
    train(demo_config(), tmp_path, progress=False)
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    # SILC from step index 2 (logged as step 3), TIPS from index 3 (step 4): 3 phases, 3 compiles.
    assert "loss/silc" not in rows[1] and "loss/silc" not in rows[2] and "loss/tips" not in rows[3]
    assert rows[3]["loss/silc"] > 0 and rows[4]["loss/silc"] > 0 and rows[4]["loss/tips"] > 0
    np.testing.assert_allclose(rows[4]["loss"], rows[4]["loss/contrastive"] + rows[4]["loss/silc"]
                               + 0.25 * rows[4]["loss/tips"], rtol=1e-5)
    assert compiles == [0, 2, 3]


@pytest.mark.slow
def test_kill_9_with_decoder_silc_tips_and_ema_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Every SigLIP 2 term on from step index 2; killed after the checkpoint of step 3 (inside the
    SILC / TIPS phase), the resumed run logs the uninterrupted run's losses of every term."""
    import signal
    import subprocess
    import sys

    from big_contrast.train.metrics import read_metrics
    from big_contrast.workdir import CHECKPOINTS
    from test_train import REPO, env, wait_for

    def cli(workdir):
        return [sys.executable, "-m", "big_contrast.cli", "train", "--config",
                str(REPO / "configs/demo.py:siglip2,self_distill,noeval,total_steps=7"), "--workdir", str(workdir),
                "--noplot", "--config.batch_size=16", "--config.log_every=1", "--config.checkpoint_every=3",
                "--config.data.sources.demo.size=200", "--config.self_distillation.silc_start_fraction=0.3",
                "--config.self_distillation.tips_start_fraction=0.3", "--config.ema.start_step=2"]

    straight = subprocess.run(cli(tmp_path / "straight"), env=env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (killed / CHECKPOINTS / "3").is_dir(), proc, timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cli(killed), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    by_step = lambda rows: {r["step"]: r for r in rows if "loss" in r}  # noqa: E731
    straight_rows, killed_rows = by_step(read_metrics(tmp_path / "straight")), by_step(read_metrics(killed))
    assert sorted(straight_rows) == sorted(killed_rows) == list(range(1, 8))
    for step, row in straight_rows.items():
        keys = ("loss", "loss/contrastive", "loss/caption") + (("loss/silc", "loss/tips") if step >= 3 else ())
        for key in keys:
            assert rel_err(killed_rows[step][key], row[key]) <= 1e-5, (step, key)


def test_the_siglip2_b16_config_trains_silc_and_tips_from_80_percent():
    from big_contrast.train.config import validate
    from test_configs import load_like_the_cli

    config = load_like_the_cli("siglip2_b16")
    validate(config, 256)
    settings = sd.SelfDistillConfig.from_config(config.self_distillation)
    assert sd.phases(settings, config.total_steps) == [(0, ()), (102_400, ("silc", "tips"))]
    assert config.ema["start_step"] == 102_400 and (settings.silc_weight, settings.tips_weight) == (0.25, 0.0625)
    assert models.abstract_model(config.model).distill_head.config.input_width == 768


# Compiles many train steps (about 1-3 min on a cold cache): run by `make test-slow`, keeping `make test` short.
pytestmark = pytest.mark.slow
