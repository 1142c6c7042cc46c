"""2D axial RoPE in the image tower (models/rope.py, ViTConfig.rope) against a NumPy float64
reference: the rotation, its relative-position property, positions under patch dropout, another
resolution, and the config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import models
from big_contrast.errors import ConfigError
from big_contrast.models import naflex, posemb, rope
from big_contrast.models.vit import ViT, ViTConfig
from conftest import max_rel_err, random_model


def reference_rotation(x_lhk, positions_l2, theta):
    """x [L, H, K] times each token's block-diagonal rotation matrix, built entry by entry in
    float64: pair j = dims (2j, 2j+1) turns by column * theta^(-4j/K) for j < K/4, else by
    row * theta^(-4(j - K/4)/K)."""
    x = np.asarray(x_lhk, np.float64)
    length, _, dim = x.shape
    out = np.empty_like(x)
    for t in range(length):
        row, col = positions_l2[t]
        matrix = np.zeros((dim, dim))
        for j in range(dim // 2):
            i, position = (j, col) if j < dim // 4 else (j - dim // 4, row)
            angle = position * theta ** (-4.0 * i / dim)
            c, s = np.cos(angle), np.sin(angle)
            matrix[2 * j:2 * j + 2, 2 * j:2 * j + 2] = [[c, -s], [s, c]]
        out[t] = x[t] @ matrix.T
    return out


def rotate(x_blhk, positions_bl2, theta=10_000.0):
    return rope.apply_rotary(x_blhk, rope.rotary_table(positions_bl2, x_blhk.shape[-1], theta))


def vit_config(**overrides):
    base = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, image_size=32,
                pool="gap", posemb="none", rope="2d")
    return ViTConfig(**{**base, **overrides})


# Jitted once per shape (an eager first call compiles every op on its own: many times slower).
encode = nnx.jit(lambda vit, x, keys=None: vit.encode(x, keys))
tokens_of = nnx.jit(lambda vit, x, keys=None: vit.tokens(x, keys))
run_encoder = nnx.jit(lambda vit, tokens, rotary: vit.encoder(tokens, rotary=rotary))


def images(batch=3, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.mark.parametrize("grid,class_token", [((3, 5), False), ((4, 4), True), ((1, 7), True),
                                              ((6, 2), False)])
@pytest.mark.parametrize("head_dim,theta", [(4, 10_000.0), (8, 100.0), (12, 10_000.0),
                                            (32, 10_000.0)])
def test_rotation_equals_the_float64_reference(grid, class_token, head_dim, theta):
    positions = rope.grid_positions(grid, class_token)
    x = np.random.default_rng(head_dim).normal(size=(1, len(positions), 3, head_dim))
    got = rotate(jnp.asarray(x, jnp.float32), positions[None], theta)
    want = reference_rotation(x[0], positions, theta)
    assert max_rel_err(got[0], want) < 2e-6


def test_grid_positions_are_perception_encoders_layout():
    np.testing.assert_array_equal(rope.grid_positions((2, 3), False),
                                  [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    # A class token sits at (0, 0) (no rotation), the patches one step further on both axes.
    np.testing.assert_array_equal(rope.grid_positions((2, 2), True),
                                  [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2]])
    np.testing.assert_allclose(rope.axial_frequencies(16, 10_000.0),
                               [1.0, 10_000.0 ** -0.25, 10_000.0 ** -0.5, 10_000.0 ** -0.75])


def test_a_token_at_the_origin_is_not_rotated():
    x = jax.random.normal(jax.random.key(1), (2, 1, 3, 8))
    np.testing.assert_array_equal(rotate(x, jnp.zeros((1, 1, 2), jnp.int32)), x)


@pytest.mark.parametrize("shift", [(1, 0), (0, 3), (-5, 7), (20, 20)])
def test_logits_depend_only_on_the_position_difference(shift):
    key_q, key_k, key_p = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(key_q, (1, 9, 2, 16))
    k = jax.random.normal(key_k, (1, 9, 2, 16))
    positions = jax.random.randint(key_p, (1, 9, 2), 0, 12)

    def logits(pos):
        return jnp.einsum("bqhk,bvhk->bhqv", rotate(q, pos), rotate(k, pos))

    base = logits(positions)
    assert max_rel_err(logits(positions + jnp.asarray(shift)), base) < 1e-5
    # The property is not vacuous: moving one token alone changes its logits.
    moved = positions.at[0, 0].add(jnp.asarray([1, 2]))
    assert max_rel_err(logits(moved), base) > 1e-2


def test_encoder_output_is_invariant_to_shifting_every_position():
    vit = ViT(vit_config(), rngs=nnx.Rngs(0))
    x = images()
    tokens = tokens_of(vit, x)
    positions = vit.token_positions()
    head_dim = vit.width // vit.config.num_heads
    plain = run_encoder(vit, tokens, rope.rotary_table(positions, head_dim))
    assert max_rel_err(plain, encode(vit, x)) < 1e-6
    shifted = run_encoder(vit, tokens, rope.rotary_table(positions + jnp.asarray([3, -2]), head_dim))
    assert max_rel_err(shifted, plain) < 1e-5
    # ... while the rotation itself matters: the same weights without it give other features.
    unrotated = ViT(vit_config(posemb="sincos2d"), rngs=nnx.Rngs(0))
    nnx.update(unrotated, nnx.state(vit, nnx.Param))
    assert max_rel_err(encode(unrotated, x), plain) > 1e-2


def test_attention_rotates_queries_and_keys_as_the_reference():
    attention = models.transformer.Attention(16, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    positions = rope.grid_positions((2, 3), False)
    got = attention(x, rotary=rope.rotary_table(positions[None], 8))
    project = {name: np.asarray(getattr(attention, name).kernel.get_value(), np.float64)
               for name in ("query", "key", "value", "out")}
    bias = {name: np.asarray(getattr(attention, name).bias.get_value(), np.float64)
            for name in ("query", "key", "value", "out")}
    want = []
    for xb in np.asarray(x, np.float64):
        q, k, v = (np.einsum("ld,dhk->lhk", xb, project[n]) + bias[n] for n in ("query", "key", "value"))
        q, k = reference_rotation(q, positions, 10_000.0), reference_rotation(k, positions, 10_000.0)
        logits = np.einsum("qhk,vhk->hqv", q, k) / np.sqrt(8)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        want.append(np.einsum("hqv,vhk,hkd->qd", weights, v, project["out"]) + bias["out"])
    assert max_rel_err(got, np.stack(want)) < 1e-5


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_patch_dropout_keeps_each_kept_token_at_its_grid_position(pool):
    vit = ViT(vit_config(pool=pool, patch_dropout=0.5), rngs=nnx.Rngs(0))
    x = images()
    keys = jax.random.split(jax.random.key(5), 3)
    cls = int(pool == "tok")
    full, kept = tokens_of(vit, x), tokens_of(vit, x, keys)
    assert kept.shape[1] == cls + 8
    # Which patches were kept, found independently: the kept rows are rows of the full grid.
    distance = jnp.linalg.norm(kept[:, cls:, None] - full[:, None, cls:], axis=-1)
    kept_bk = np.asarray(jnp.argmin(distance, axis=-1))
    assert np.all(np.diff(kept_bk, axis=1) > 0)
    grid = rope.grid_positions(vit.grid, pool == "tok")
    want = np.stack([np.concatenate([grid[:cls], grid[cls:][row]]) for row in kept_bk])
    head_dim = vit.width // vit.config.num_heads
    expected = run_encoder(vit, kept, rope.rotary_table(want, head_dim))
    assert max_rel_err(encode(vit, x, keys), expected) < 1e-6
    # Renumbering the kept tokens 0..K-1 (a full-grid assumption) would give other features.
    packed = rope.grid_positions((1, 8), pool == "tok")[None]
    assert max_rel_err(run_encoder(vit, kept, rope.rotary_table(packed, head_dim)), expected) > 1e-3


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "full")])
def test_scan_and_remat_pass_the_rotary_table_to_every_layer(scan, remat):
    plain = ViT(vit_config(), rngs=nnx.Rngs(0))
    other = ViT(vit_config(scan=scan, remat=remat), rngs=nnx.Rngs(0))
    flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    stacked = []
    for path, variable in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        if scan and path[:2] == ("encoder", "blocks"):
            value = jnp.stack([flat[("encoder", "blocks", i, *path[2:])].get_value() for i in range(2)])
        else:
            value = flat[path].get_value()
        stacked.append((path, variable.replace(value)))
    nnx.update(other, nnx.from_flat_state(stacked))
    assert max_rel_err(encode(other, images()), encode(plain, images())) < 1e-5


def test_another_resolution_recomputes_positions_and_resamples_nothing():
    cfg32 = dict(image=dict(variant="mu/8", image_size=32, num_heads=2, pool="gap", posemb="none",
                            rope="2d"), text=dict(variant="mu", vocab_size=50, max_len=8), embed_dim=16)
    cfg64 = dict(cfg32, image=dict(cfg32["image"], image_size=64))
    assert posemb.geometry(cfg32) == posemb.geometry(cfg64)  # no table: not a resampling
    sincos = {size: dict(cfg32, image=dict(cfg32["image"], image_size=size, posemb="sincos2d"))
              for size in (32, 64)}
    assert posemb.geometry(sincos[32]) == posemb.geometry(sincos[64])  # recomputed, the same rule
    params = nnx.to_pure_dict(nnx.state(random_model(cfg32), nnx.Param))
    adapted, changes = posemb.adapt_params(params, cfg32, cfg64)
    assert changes == []
    vit64 = ViT(models.image_config(cfg64), rngs=nnx.Rngs(1))
    shapes64 = jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(vit64, nnx.Param)))
    assert jax.tree.map(np.shape, adapted["image"]) == shapes64  # the same parameters fit as they are
    nnx.update(vit64, adapted["image"])
    np.testing.assert_array_equal(vit64.token_positions()[0, -1], [7, 7])
    features = encode(vit64, images(size=64))
    assert features.shape == (3, 64, 32) and np.all(np.isfinite(features))


def test_a_learned_table_beside_rope_is_resampled_as_usual():
    cfg = dict(image=dict(variant="mu/8", image_size=32, num_heads=2, pool="tok", rope="2d"),
               text=dict(variant="mu", vocab_size=50, max_len=8), embed_dim=16)
    big = dict(cfg, image=dict(cfg["image"], image_size=64))
    params = nnx.to_pure_dict(nnx.state(random_model(cfg), nnx.Param))
    adapted, changes = posemb.adapt_params(params, cfg, big)
    assert len(changes) == 1 and "4x4 -> 8x8" in changes[0], changes
    assert np.shape(adapted["image"]["posemb"]) == (1, 65, 32)


def test_default_towers_have_no_rotation():
    config = models.image_config({"image": {"variant": "mu/8", "image_size": 16}})
    assert config.rope == "none" and config.rope_theta == 10_000.0
    vit = ViT(config, rngs=nnx.Rngs(0))
    assert vit.rotary_table() is None and not vit.encoder.uses_rotary


@pytest.mark.parametrize("overrides,message", [
    (dict(width=24, num_heads=4), "head dimension .* divisible by 4 .*, got 6;"),
    (dict(width=40, num_heads=4), "divisible by 4 .*, got 10;"),
    (dict(width=20, num_heads=4), "divisible by 4 .*, got 5;"),
    (dict(rope="3d"), "rope='3d' is unknown"),
    (dict(rope_theta=1.0), "rope_theta=1.0 must be greater than 1"),
    (dict(rope="none", posemb="none"), "without any position information; set rope='2d'"),
])
def test_bad_rope_configs_fail_in_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        vit_config(**overrides)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_naflex_with_rope_is_refused_in_one_sentence():
    vit = ViT(vit_config(posemb="learn"), rngs=nnx.Rngs(0))
    patches = jnp.zeros((1, 16, 8 * 8 * 3))
    with pytest.raises(NotImplementedError, match=r"NaFlex with 2D RoPE is not built\): use rope='none'"):
        naflex.naflex_features(vit, patches, jnp.ones((1, 16)), jnp.asarray([[4, 4]]))


def test_a_rotary_table_for_an_encoder_without_rope_is_refused():
    vit = ViT(vit_config(posemb="learn", rope="none"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="built without RoPE"):
        vit.encoder(vit.tokens(images()), rotary=rope.rotary_table(vit.token_positions(), 16))


@pytest.mark.slow  # `make test-slow`: a demo training run and an evaluation
def test_a_rope_demo_tower_trains_with_patch_dropout_and_evaluates_at_another_resolution(
        tmp_path, capfd):
    import pathlib
    import sys

    from big_contrast.commands.eval import evaluate_checkpoint
    from big_contrast.train import train

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
    import demo

    def rope_config(image_size, evals):
        config = demo.get_config("sigmoid" if evals else "sigmoid,noeval")
        config.batch_size, config.total_steps, config.log_every = 32, 3, 1
        config.checkpoint_every = 3
        config.data.sources.demo.size = 500
        config.optimizer.warmup_steps = 0
        config.model.image.update(posemb="none", rope="2d", patch_dropout=0.5, image_size=image_size)
        config.data.pp_train = f"decode|resize({image_size})|value_range(-1, 1)"
        config.data.pp_eval = f"decode|resize({image_size})|value_range(-1, 1)"
        return config

    result = train(rope_config(32, evals=False), tmp_path, progress=False)
    assert np.isfinite(result["loss"])
    capfd.readouterr()
    results, step = evaluate_checkpoint(rope_config(64, evals=True), tmp_path)
    err = capfd.readouterr().err
    assert step == 3 and "Resampled" not in err, err  # RoPE has nothing to resample
    for key in ("shape/top1", "colour/top1", "retrieval/i2t_recall@1"):
        assert 0.0 <= results[key] <= 1.0, results
    print({k: round(v, 3) for k, v in results.items() if "top1" in k or "recall@1" in k})


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_sharded_rope_forward_with_patch_dropout_matches_unsharded(axis_types):
    from big_contrast import sharding

    cfg = dict(image=dict(variant="mu/8", image_size=32, num_heads=4, pool="tok", rope="2d",
                          patch_dropout=0.5), text=dict(variant="mu", vocab_size=50, max_len=8),
               embed_dim=16)
    graphdef, state = nnx.split(random_model(cfg))
    x, keys = images(batch=8), jax.random.split(jax.random.key(6), 8)
    forward = jax.jit(lambda state, x, keys: nnx.merge(graphdef, state).embed_images(x, keys))
    expected = forward(state, x, keys)
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)), axis_types=axis_types)
    data = jax.device_put((x, keys), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        out = forward(sharding.shard_state(state, mesh), *data)
    assert max_rel_err(out, expected) < 1e-5


def test_bfloat16_inputs_are_rotated_in_float32_and_returned_in_bfloat16():
    x = jax.random.normal(jax.random.key(7), (2, 5, 2, 8))
    table = rope.rotary_table(rope.grid_positions((1, 5), False)[None], 8)
    got = rope.apply_rotary(x.astype(jnp.bfloat16), table)
    assert got.dtype == jnp.bfloat16
    assert max_rel_err(got, rope.apply_rotary(x, table)) < 1e-2
