"""Position-embedding resampling (models/posemb.py) against reference implementations.

The image reference is the call big_vision's ``vit.resample_posemb`` makes,
``scipy.ndimage.zoom(grid, zoom, order=1)``; the text 'interpolate' reference is open_clip's
``resize_text_pos_embed`` call, ``torch.nn.functional.interpolate(mode='linear',
align_corners=False)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from big_contrast import models
from big_contrast.errors import ConfigMismatch
from big_contrast.models import posemb
from conftest import random_model


def config(image_size=56, max_len=8, pool="tok", vocab_size=50, **image):
    """A plain-dict model config of mu/8 towers: a 56 px image is a 7x7 patch grid."""
    return dict(image=dict(variant="mu/8", image_size=image_size, num_heads=4, pool=pool, **image),
                text=dict(variant="mu", vocab_size=vocab_size, max_len=max_len, num_heads=4),
                embed_dim=16)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def big_vision_reference(grid_hwd, new_hw):
    """What big_vision's resample_posemb computes, generalised to a (h, w) zoom."""
    zoom = (new_hw[0] / grid_hwd.shape[0], new_hw[1] / grid_hwd.shape[1], 1)
    return scipy.ndimage.zoom(grid_hwd, zoom, order=1)


@pytest.mark.parametrize("old_hw,new_hw", [((7, 7), (14, 14)), ((14, 14), (7, 7)), ((5, 7), (9, 4)),
                                           ((3, 4), (1, 2)), ((1, 3), (4, 6))])
def test_grid_resampling_equals_big_visions_scipy_zoom(old_hw, new_hw):
    grid = np.random.default_rng(0).normal(size=(*old_hw, 6))
    got = posemb.resample_grid(grid, new_hw)
    want = big_vision_reference(grid, new_hw)
    assert got.shape == want.shape == (*new_hw, 6)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_grid_resampling_keeps_the_corner_embeddings_and_the_dtype():
    grid = np.random.default_rng(1).normal(size=(7, 7, 4)).astype(np.float32)
    got = posemb.resample_grid(grid, (14, 14))
    assert got.dtype == np.float32
    for (i, j), (p, q) in {(0, 0): (0, 0), (0, 6): (0, 13), (6, 0): (13, 0), (6, 6): (13, 13)}.items():
        np.testing.assert_allclose(got[p, q], grid[i, j], rtol=1e-6)


def test_class_token_row_is_kept_and_patch_rows_resampled():
    table = np.random.default_rng(2).normal(size=(1, 1 + 49, 8))
    got = posemb.resample_image_posemb(table, (7, 7), (14, 14), class_token=True)
    assert got.shape == (1, 1 + 196, 8)
    np.testing.assert_array_equal(got[0, 0], table[0, 0])
    want = big_vision_reference(table[0, 1:].reshape(7, 7, 8), (14, 14)).reshape(196, 8)
    np.testing.assert_allclose(got[0, 1:], want, rtol=1e-12, atol=1e-12)


def test_adapt_params_is_the_identity_when_nothing_changes():
    params = params_of(random_model(config()))
    adapted, changes = posemb.adapt_params(params, config(), config())
    assert changes == []
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(params), strict=True):
        assert a is b


def test_adapt_params_resamples_the_image_table_and_the_model_runs_at_the_new_size():
    params = params_of(random_model(config(image_size=56)))
    adapted, changes = posemb.adapt_params(params, config(image_size=56), config(image_size=112))
    assert len(changes) == 1 and "7x7 -> 14x14" in changes[0] and "class token" in changes[0]
    want = posemb.resample_image_posemb(params["image"]["posemb"], (7, 7), (14, 14), True)
    np.testing.assert_array_equal(adapted["image"]["posemb"], want)
    np.testing.assert_array_equal(adapted["image"]["cls"], params["image"]["cls"])
    model = models.create_from_params(config(image_size=112), adapted)
    features = nnx.jit(lambda vit, x: vit(x))(model.image, jnp.ones((2, 112, 112, 3)))
    assert features.shape == (2, 32) and np.isfinite(np.asarray(features)).all()


def test_adapt_params_handles_a_non_square_grid_without_class_token():
    old, new = config(image_size=(40, 56), pool="map"), config(image_size=(64, 24), pool="map")
    params = params_of(random_model(old))
    adapted, _ = posemb.adapt_params(params, old, new)
    want = big_vision_reference(np.asarray(params["image"]["posemb"])[0].reshape(5, 7, -1), (8, 3))
    np.testing.assert_allclose(adapted["image"]["posemb"][0], want.reshape(24, -1), rtol=1e-6, atol=1e-7)


def test_sincos_tables_are_recomputed_as_the_vit_computes_them():
    cfg = config(image_size=(48, 64), posemb="sincos2d")
    vit = models.abstract_model(cfg).image
    np.testing.assert_array_equal(posemb.sincos_posemb((6, 8), 32, class_token=True),
                                  np.asarray(vit._position_embedding()))
    params = params_of(random_model(config(posemb="sincos2d")))
    adapted, changes = posemb.adapt_params(params, config(posemb="sincos2d"), cfg)
    assert changes == [] and "posemb" not in adapted["image"]  # nothing stored: recomputed


def test_text_table_truncates_to_its_first_rows():
    params = params_of(random_model(config(max_len=8)))
    adapted, changes = posemb.adapt_params(params, config(max_len=8), config(max_len=3))
    np.testing.assert_array_equal(adapted["text"]["posemb"], np.asarray(params["text"]["posemb"])[:, :3])
    assert changes == ["text/posemb: 8 -> 3 positions, truncated"]


def test_text_table_extends_with_fresh_rows_after_the_old_ones():
    table = np.random.default_rng(3).normal(size=(1, 8, 32)).astype(np.float32)
    got = posemb.resize_text_posemb(table, 200)
    assert got.shape == (1, 200, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, :8], table)
    new_rows = got[0, 8:]
    assert abs(new_rows.std() - models.text.POSEMB_STD) < 0.1 * models.text.POSEMB_STD
    assert abs(new_rows.mean()) < 0.1 * models.text.POSEMB_STD
    np.testing.assert_array_equal(posemb.resize_text_posemb(table, 200, seed=1)[:, :8], table)
    assert not np.array_equal(posemb.resize_text_posemb(table, 200, seed=1), got)
    zeros = posemb.resize_text_posemb(table, 12, extend="zeros")  # for optimizer moments
    np.testing.assert_array_equal(zeros, np.concatenate([table, np.zeros((1, 4, 32), np.float32)], 1))


@pytest.mark.parametrize("new_len", [13, 16, 5])
def test_text_table_interpolation_equals_open_clips_torch_interpolate(new_len):
    torch = pytest.importorskip("torch")
    table = np.random.default_rng(4).normal(size=(1, 8, 6))
    got = posemb.resize_text_posemb(table, new_len, extend="interpolate")
    want = torch.nn.functional.interpolate(torch.tensor(table).permute(0, 2, 1), size=new_len,
                                           mode="linear", align_corners=False).permute(0, 2, 1)
    if new_len < 8:  # shortening always truncates (exact for texts that fit)
        want = torch.tensor(table[:, :new_len])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change,path", [({"width": 64}, "image/cls"),
                                         ({"depth": 2}, "image/encoder/blocks/1/attention/key/bias")])
def test_a_change_without_a_rule_fails_with_todays_sentence(change, path):
    old, new = config(), config(image_size=112, **change)
    params = params_of(random_model(old))
    with pytest.raises(ConfigMismatch, match=f"holds parameter {path} with shape .*, this config .*: "
                                             r"use the model config it was imported with \(its config.py\)\."):
        posemb.adapt_params(params, old, new)


def test_a_vocabulary_change_fails_with_the_callers_sentence():
    old, new = config(), config(vocab_size=60)
    params = params_of(random_model(old))
    with pytest.raises(ConfigMismatch, match=r"^text/embedding/embedding \(50, 32\) vs \(60, 32\)$"):
        posemb.adapt_params(params, old, new, on_mismatch=lambda p, s, w: f"{p} {s} vs {w}")


def test_an_unknown_text_extension_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="text_extend='nearest' is unknown; use one of"):
        posemb.resize_text_posemb(np.zeros((1, 4, 2)), 8, extend="nearest")


def test_optimizer_moments_of_the_tables_follow_their_parameters():
    import ml_collections

    from big_contrast.train.optimizer import make_optimizer

    opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
                                         grad_clip_norm=1.0, warmup_steps=1, schedule="constant", total_steps=10))
    old, new = config(image_size=56, max_len=8), config(image_size=112, max_len=12)
    old_params = params_of(random_model(old))
    tx = make_optimizer(opt, old_params)
    state = tx.init(old_params)
    state = jax.tree.map(lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)  # non-zero moments
    adapted = posemb.adapt_optimizer_state(state, old, new)
    new_params, _ = posemb.adapt_params(old_params, old, new)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), make_optimizer(opt, new_params).init(new_params))
    assert jax.tree.map(lambda x: (np.shape(x), x.dtype), adapted) == want
    flat = {posemb.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(adapted)[0]}
    mu_text = next(x for name, x in flat.items() if name.endswith("mu/text/posemb"))
    np.testing.assert_array_equal(mu_text[:, :8], 1.0)
    np.testing.assert_array_equal(mu_text[:, 8:], 0.0)  # new positions start without momentum
    mu_image = next(x for name, x in flat.items() if name.endswith("mu/image/posemb"))
    np.testing.assert_allclose(mu_image, 1.0, rtol=1e-6)  # a constant table resamples to itself


def test_the_sentence_names_the_checkpoint_directory_like_the_loop_does():
    import functools

    old, new = config(), config(vocab_size=60)
    sentence = functools.partial(posemb.mismatch_sentence, directory="/w/checkpoints")
    with pytest.raises(ConfigMismatch, match=r"^The step-0 checkpoint in /w/checkpoints holds parameter "
                                             r"text/embedding/embedding with shape \(50, 32\), this config \(60, 32\): "):
        posemb.adapt_params(params_of(random_model(old)), old, new, on_mismatch=sentence)
