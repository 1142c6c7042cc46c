"""Towers, two-tower wrapper, registry: parameter counts, sharded forward, masking, options.

Weights for forward tests come from numpy (``random_model``), not from the
initialisers: compiling dozens of threefry draws costs seconds per model on
this CPU, and the forward checks do not depend on how weights were drawn.
``test_create_sharded_*`` covers the real initialisation path.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import models, sharding
from big_contrast.models import transformer
from conftest import max_rel_err, random_model

B = 8  # global test batch: divides every test mesh's batch shards
# XLA:CPU compiles ~3x faster without its expensive LLVM passes; tests only need the numbers.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def tiny_config(**overrides):
    cfg = models.default_model_config()
    cfg.image.update(variant="mu/8", image_size=16, num_heads=4, pool="map")  # mu: depth 1
    cfg.text.update(variant="mu", vocab_size=50, max_len=8, num_heads=4)
    cfg.embed_dim = 16
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return cfg


def batch(seed=0, length=8, vocab=50):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
    tokens = rng.integers(2, vocab, size=(B, length)).astype(np.int32)  # no pad (0) / eos (1)
    return jnp.asarray(images), jnp.asarray(tokens)


forward = jax.jit(lambda graphdef, state, images, tokens: nnx.merge(graphdef, state)(images, tokens),
                  static_argnums=0, compiler_options=FAST)


# ----------------------------------------------------------------------------
# Parameter counts against closed forms
# ----------------------------------------------------------------------------

def encoder_count(D, depth, F):
    attention = 4 * D * D + 4 * D  # q, k, v, out kernels and biases
    mlp = 2 * D * F + F + D
    return depth * (attention + mlp + 4 * D) + 2 * D  # 2 LayerNorms per block, final LayerNorm


def map_head_count(D, F):
    return D + (4 * D * D + 4 * D) + 2 * D + (2 * D * F + F + D)


def vit_count(D, depth, F, patch, image_size, pool, posemb, channels=3):
    tokens = (image_size // patch) ** 2 + (pool == "tok")
    count = patch * patch * channels * D + D + encoder_count(D, depth, F)
    count += tokens * D if posemb == "learn" else 0
    count += D if pool == "tok" else 0
    return count + (map_head_count(D, F) if pool == "map" else 0)


def text_count(D, depth, F, vocab, max_len, pool):
    return vocab * D + max_len * D + encoder_count(D, depth, F) + (
        map_head_count(D, F) if pool == "map" else 0)


def abstract_image_tower(variant, image_size=224, pool="tok", posemb="learn", scan=False):
    cfg = models.resolve_config(dict(image=dict(variant=variant, image_size=image_size, pool=pool,
                                                posemb=posemb), scan_layers=scan))
    return nnx.eval_shape(lambda: models.create_image_tower(cfg, nnx.Rngs(0)))


def test_vit_b16_count_is_the_published_figure():
    vit = abstract_image_tower("B/16", pool="tok", posemb="learn")
    assert models.num_params(vit) == 85_798_656
    assert models.num_params(vit) == vit_count(768, 12, 3072, 16, 224, "tok", "learn")


@pytest.mark.parametrize("variant,image_size,pool,posemb,size", [
    ("So400m/14", 224, "map", "learn", (1152, 27, 4304)),
    ("L/14", 336, "gap", "sincos2d", (1024, 24, 4096)),
    ("g/14", 224, "map", "learn", (1408, 40, 6144)),
    ("M/16", 256, "tok", "learn", (512, 12, 2048)),
])
def test_vit_counts_match_closed_form(variant, image_size, pool, posemb, size):
    vit = abstract_image_tower(variant, image_size, pool, posemb, scan=True)  # scan: fast trace
    patch = int(variant.split("/")[1])
    assert models.num_params(vit) == vit_count(*size, patch, image_size, pool, posemb)


def test_two_tower_counts_per_tower():
    cfg = models.default_model_config()  # B/16 map + B text, sigmoid, embed_dim 768
    cfg.text.update(causal=True, vocab_size=49_408, max_len=77)
    cfg.scan_layers = True
    counts = models.count_params(models.abstract_model(cfg))
    head = 768 * 768 + 768
    assert counts["image"] == vit_count(768, 12, 3072, 16, 224, "map", "learn") + head
    assert counts["text"] == text_count(768, 12, 3072, 49_408, 77, "eos") + head
    assert counts["total"] == counts["image"] + counts["text"] + 2  # log-scale and bias


def test_scan_does_not_change_the_count():
    counts = [models.count_params(models.abstract_model(tiny_config(scan_layers=s)))
              for s in (False, True)]
    assert counts[0] == counts[1]


# ----------------------------------------------------------------------------
# Sharded forward == unsharded forward
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    """A tiny causal-text model, a batch, and its unsharded forward on one device."""
    model = random_model(tiny_config(**{"text.causal": True}))
    graphdef, state = nnx.split(model)
    images, tokens = batch()
    return graphdef, state, images, tokens, forward(graphdef, state, images, tokens)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_forward_matches_unsharded(reference, shape, axis_types):
    graphdef, state, images, tokens, expected = reference
    mesh = sharding.make_mesh(tuple(zip(("data", "fsdp", "tensor"), shape)), axis_types=axis_types)
    sharded_state = sharding.shard_state(state, mesh)
    data = jax.device_put((images, tokens), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        out = forward(graphdef, sharded_state, *data)
    fc1 = sharded_state["image"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.get_value().sharding.spec == jax.P("fsdp", "tensor")  # size-1 axes kept: harmless
    assert out.zimg.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    for name in ("zimg", "ztxt", "scale", "bias"):
        assert max_rel_err(getattr(out, name), getattr(expected, name)) <= 1e-5, name


def test_create_sharded_initialises_into_shardings():
    cfg = tiny_config(scan_layers=True, loss="softmax", **{"image.pool": "gap"})
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    key = jax.random.key(3, impl="rbg")  # rbg keys compile much faster than threefry on CPU
    model = models.create_sharded(cfg, mesh, seed=key, compiler_options=FAST)
    state = nnx.state(model, nnx.Param)
    fc1 = state["text"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].get_value()
    assert fc1.shape == (1, 32, 128)  # stacked layers
    assert fc1.sharding.spec == jax.P(None, "fsdp", "tensor")
    expected = sharding.state_shardings(state, mesh)
    for value, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        assert value.sharding.is_equivalent_to(want, value.ndim)
    # Same numbers as an unsharded initialisation with the same seed.
    unsharded = jax.jit(lambda: nnx.state(models.create(cfg, nnx.Rngs(key)), nnx.Param),
                        compiler_options=FAST)()
    for value, want in zip(jax.tree.leaves(state), jax.tree.leaves(unsharded)):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want))
    # Softmax defaults: scale 1/0.07 and no bias parameter.
    np.testing.assert_allclose(np.exp(state["log_scale"].get_value()), 1 / 0.07, rtol=1e-6)
    assert model.bias is None


# ----------------------------------------------------------------------------
# Text towers: padding and tokens after EOS never change the embedding
# ----------------------------------------------------------------------------

def text_embed(model, tokens):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s).embed_texts(t), compiler_options=FAST)(
        state, tokens)


@pytest.mark.parametrize("eos_id", [1, None])
def test_causal_tower_ignores_tokens_after_eos(eos_id):
    model = random_model(tiny_config(**{"text.causal": True, "text.eos_id": eos_id}))
    rng = np.random.default_rng(1)
    eos = 1 if eos_id is not None else 49  # argmax convention: EOT is the largest id
    tokens = rng.integers(2, 49, size=(B, 8))
    eos_at = rng.integers(1, 7, size=B)
    tokens[np.arange(B), eos_at] = eos
    after_eos = np.arange(8)[None] > eos_at[:, None]
    padded = np.where(after_eos, 0, tokens)
    garbage = np.where(after_eos, rng.integers(2, 49, size=(B, 8)), tokens)
    before = np.where(np.arange(8)[None] == eos_at[:, None] - 1, (tokens + 1) % 47 + 2, tokens)
    z = text_embed(model, jnp.asarray(np.stack([padded, garbage, before]).reshape(3 * B, 8)))
    z_padded, z_garbage, z_before = z[:B], z[B:2 * B], z[2 * B:]
    np.testing.assert_allclose(z_garbage, z_padded, atol=1e-6)
    # The check can fail: a token before EOS does change the embedding.
    assert float(jnp.min(jnp.abs(z_before - z_padded).max(axis=1))) > 1e-3


@pytest.mark.parametrize("pool", ["last", "mean", "map"])
def test_bidirectional_tower_ignores_padding(pool):
    model = random_model(tiny_config(**{"text.pool": pool}))
    rng = np.random.default_rng(2)
    words = rng.integers(2, 50, size=(B, 5))
    padded = np.concatenate([words, np.zeros((B, 3), words.dtype)], axis=1)
    z = text_embed(model, jnp.asarray(padded))
    z_unpadded = text_embed(model, jnp.asarray(words))  # same text, no padding at all
    np.testing.assert_allclose(z, z_unpadded, atol=1e-6)


def test_mask_is_what_makes_padding_invisible():
    """Brute force: without the key mask padding leaks in, so the tests above can fail."""
    q, k, v = np.random.default_rng(0).normal(size=(3, 1, 8, 2, 4)).astype(np.float32)
    valid = (np.arange(8) < 5)[None, None, None, :]

    @jax.jit
    def attend(q, k, v):
        return (transformer.dot_product_attention(q, k, v, valid)[:, :5],
                transformer.dot_product_attention(q, k, v)[:, :5],
                transformer.dot_product_attention(q[:, :5], k[:, :5], v[:, :5]))

    masked, unmasked, alone = attend(q, k, v)
    np.testing.assert_allclose(masked, alone, atol=1e-6)
    assert float(jnp.abs(unmasked - alone).max()) > 1e-3


def attention_inputs(dtype, length=9, seed=0):
    q, k, v = np.random.default_rng(seed).normal(size=(3, 2, length, 4, 8))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def attention_masks(length=9):
    """[B, 1, Q, K] as text.py builds them: keys past each row's length masked, and causal."""
    valid_bk = np.arange(length)[None] < np.array([[length], [4]])
    padding = np.broadcast_to(valid_bk[:, None, None, :], (2, 1, length, length))
    causal = padding & np.tril(np.ones((length, length), bool))
    return {"none": None, "padding": padding, "causal": causal, "probe": padding[:, :, :1]}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def attention_and_grads(impl, q, k, v):
    """{mask name: (output, d/dq, d/dk, d/dv)} of `impl`; 'probe' is one query (the MAP head)."""
    results = {}
    for name, mask in attention_masks(q.shape[1]).items():
        q_used = q[:, :1] if name == "probe" else q

        def attend(q, k, v):
            with transformer.attention_implementation(impl):
                return transformer.dot_product_attention(q, k, v, mask).astype(jnp.float32)

        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(attend(*a))), argnums=(0, 1, 2))(q_used, k, v)
        results[name] = (attend(q_used, k, v), *(g.astype(jnp.float32) for g in grads))
    return results


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fused_attention_equals_einsum_reference_with_masks_and_gradients(dtype, tol):
    """jax.nn.dot_product_attention (the default) against the materialised einsum it replaced:
    outputs and input gradients, unmasked, with a padding mask, a causal one, and one query."""
    fused = attention_and_grads("auto", *attention_inputs(dtype))
    ref = attention_and_grads("einsum", *attention_inputs(dtype))
    for name in fused:
        for what, a, b in zip(("out", "dq", "dk", "dv"), fused[name], ref[name]):
            assert max_rel_err(a, b) < tol, (name, what, max_rel_err(a, b))
    # The check can fail: the masks change the numbers.
    assert max_rel_err(fused["padding"][0], ref["none"][0]) > 1e-2
    assert max_rel_err(fused["causal"][0], ref["padding"][0]) > 1e-2


def test_towers_give_the_same_embeddings_with_fused_and_einsum_attention():
    """Whole model (ViT with a MAP head, causal text tower with padding): the default kernel
    against the einsum reference."""
    images, tokens = batch()
    tokens = tokens.at[:, 5:].set(0)  # padding
    graphdef, state = nnx.split(random_model(tiny_config(**{"text.causal": True, "text.pool": "last"})))
    results = {}
    for impl in ("auto", "einsum"):  # a fresh jit each: the kernel is chosen while tracing
        with transformer.attention_implementation(impl):
            results[impl] = jax.jit(lambda s, i, t: nnx.merge(graphdef, s)(i, t),
                                    compiler_options=FAST)(state, images, tokens)
    for field in ("zimg", "ztxt"):
        np.testing.assert_allclose(getattr(results["auto"], field), getattr(results["einsum"], field),
                                   atol=1e-5, rtol=1e-5)


def test_auto_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
    """On a GPU 'auto' asks cuDNN first for bf16; here (no cuDNN) it raises while tracing and
    the XLA kernel answers instead."""
    q, k, v = attention_inputs(jnp.bfloat16)
    with transformer.attention_implementation("xla"):
        expected = transformer.dot_product_attention(q, k, v)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(RuntimeError):
        jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    np.testing.assert_array_equal(transformer.dot_product_attention(q, k, v), expected)


def test_attention_implementation_rejects_unknown_names():
    with pytest.raises(ValueError, match="einsum"):
        with transformer.attention_implementation("flash"):
            pass


# ----------------------------------------------------------------------------
# Options: scan, remat, bfloat16, LiT, loading towers
# ----------------------------------------------------------------------------

def encoder(scan, remat="none", seed=0):
    """A two-block encoder (width 32, 4 heads) with numpy weights, unstacked or stacked."""
    def build():
        return transformer.Encoder(width=32, depth=2, mlp_dim=64, num_heads=4, dtype=jnp.float32,
                                   param_dtype=jnp.float32, remat=remat, scan=scan,
                                   rngs=nnx.Rngs(0))

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    if scan:  # stacked weights of the unscanned encoder with the same seed
        plain = dict(nnx.to_flat_state(nnx.state(encoder(False, seed=seed))))
        state = stack_blocks(plain, state)
    else:
        state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def stack_blocks(plain, stacked_state):
    """``stacked_state`` filled with the per-layer values of the flat state ``plain``."""
    loaded = []
    for path, variable in nnx.to_flat_state(stacked_state):
        if "blocks" in path:
            i = path.index("blocks") + 1
            depth = variable.get_value().shape[0]
            value = jnp.stack([plain[path[:i] + (layer,) + path[i:]].get_value()
                               for layer in range(depth)])
        else:
            value = plain[path].get_value()
        loaded.append((path, variable.replace(value)))
    return nnx.from_flat_state(loaded)


def test_scan_and_remat_match_plain_layers():
    plain, scanned = encoder(scan=False), encoder(scan=True, remat="dots_saveable")
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]

    def loss_and_grads(model):
        graphdef, state = nnx.split(model)
        loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, mask)))
        return jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(state)

    (loss_plain, grads_plain), (loss_scan, grads_scan) = map(loss_and_grads, (plain, scanned))
    assert max_rel_err(loss_scan, loss_plain) <= 1e-5
    expected = dict(nnx.to_flat_state(stack_blocks(dict(nnx.to_flat_state(grads_plain)),
                                                   nnx.state(scanned))))
    for path, grad in nnx.to_flat_state(grads_scan):  # some biases have exactly-zero gradients
        np.testing.assert_allclose(grad.get_value(), expected[path].get_value(), rtol=1e-4,
                                   atol=1e-6, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_params(reference):
    graphdef, state, images, tokens, expected = reference
    model = random_model(tiny_config(dtype="bfloat16", remat="full", **{"text.causal": True}))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)  # the reference model's weights
    out = forward(*nnx.split(model), images, tokens)
    assert out.zimg.dtype == out.ztxt.dtype == jnp.float32
    for name in ("zimg", "ztxt"):  # bf16 round-off, not float32 exactness
        assert 0 < max_rel_err(getattr(out, name), getattr(expected, name)) < 5e-2
    np.testing.assert_allclose(jnp.linalg.norm(out.ztxt, axis=-1), 1.0, rtol=1e-5)


def test_locked_image_tower_gets_no_gradient():
    model = random_model(tiny_config(lock_image=True))
    mask = models.frozen_mask(model)
    flat_mask = {sharding.path_str(p): v for p, v in nnx.to_flat_state(mask)}
    assert all(frozen == name.startswith("image/") for name, frozen in flat_mask.items())
    images, tokens = batch()

    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(images, tokens)
        return jnp.sum(out.zimg * out.ztxt)

    grads = jax.jit(jax.grad(loss), compiler_options=FAST)(state)
    for path, grad in nnx.to_flat_state(grads):
        norm = float(jnp.abs(grad.get_value()).max())
        if flat_mask[sharding.path_str(path)]:
            assert norm == 0.0, path
    assert float(jnp.abs(grads["image_head"]["kernel"].get_value()).max()) > 0  # head trains
    assert float(jnp.abs(grads["text"]["embedding"]["embedding"].get_value()).max()) > 0


def test_two_tower_outputs_and_scale_clamp():
    model = random_model(tiny_config(loss="softmax"))
    model.log_scale.set_value(jnp.asarray(10.0))  # above the log(100) cap
    images, tokens = batch()
    out = forward(*nnx.split(model), images, tokens)
    np.testing.assert_allclose(out.scale, 100.0, rtol=1e-6)
    assert out.bias is None
    np.testing.assert_allclose(jnp.linalg.norm(out.zimg, axis=-1), 1.0, rtol=1e-5)
    only_text = jax.jit(lambda s, t: nnx.merge(graphdef, s)(texts=t), compiler_options=FAST)
    graphdef, state = nnx.split(model)
    out_text = only_text(state, tokens)
    assert out_text.zimg is None
    np.testing.assert_allclose(out_text.ztxt, out.ztxt, atol=1e-6)


def test_sigmoid_defaults():
    cfg = tiny_config(loss="sigmoid")
    scalars = jax.jit(lambda: {k: v for k, v in nnx.state(models.create(cfg, 0), nnx.Param).items()
                               if k in ("log_scale", "bias")}, compiler_options=FAST)()
    np.testing.assert_allclose(np.exp(scalars["log_scale"].get_value()), 10.0, rtol=1e-6)
    np.testing.assert_allclose(scalars["bias"].get_value(), -10.0)


def test_load_tower_params_copies_and_checks_shapes():
    source, target = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    text_before = nnx.to_pure_dict(nnx.state(target.text))
    models.load_tower_params(target, "image", nnx.to_pure_dict(nnx.state(source.image, nnx.Param)))
    for a, b in zip(jax.tree.leaves(nnx.state(target.image)), jax.tree.leaves(nnx.state(source.image))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(nnx.state(target.text)), jax.tree.leaves(text_before)):
        np.testing.assert_array_equal(a, b)
    other = random_model(tiny_config(**{"image.image_size": 24}))
    with pytest.raises(ValueError, match="posemb"):
        models.load_tower_params(target, "image", nnx.state(other.image, nnx.Param))
    with pytest.raises(ValueError, match="'audio'"):
        models.load_tower_params(target, "audio", {})


# ----------------------------------------------------------------------------
# Errors name the offending value
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"image.variant": "X/16"}, "'X'"),
    ({"image.variant": "B"}, "'B'"),
    ({"text.variant": "B/16"}, "'B/16'"),
    ({"image.image_size": 100}, "does not divide image size 100"),
    ({"image.width": 30}, "width 30 is not divisible by num_heads 4"),
    ({"text.num_heads": 5}, "width 32 is not divisible by num_heads 5"),
    ({"image.pool": "avg"}, "'avg'.*'tok', 'gap', 'map'"),
    ({"text.pool": "cls"}, "'cls'"),
    ({"image.posemb": "rope"}, "'rope'"),
    ({"loss": "hinge"}, "'hinge'"),
    ({"remat": "some"}, "'some'"),
    ({"dtype": "float8"}, "'float8'"),
    ({"embed_dim": None, "image.width": 64}, "set config.embed_dim"),
])
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.abstract_model(tiny_config(**overrides))


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="poool"):
        models.resolve_config({"image": {"poool": "map"}})


@pytest.mark.parametrize("config_class,build", [
    ("ViTConfig", lambda: models.image_config(tiny_config())),
    ("TextConfig", lambda: models.text_config(tiny_config())),
])
def test_each_tower_config_is_frozen_and_is_what_the_tower_holds(config_class, build):
    config = build()
    assert type(config).__name__ == config_class
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 64
    tower = (models.ViT if config_class == "ViTConfig" else models.TextTransformer)(
        config, rngs=nnx.Rngs(0))
    assert tower.config is config
    # A field added to the config class is picked up by name from the model config.
    assert models.image_config(tiny_config(**{"image.ln_pre": True})).ln_pre is True
    assert models.text_config(tiny_config(**{"text.causal": True})).pool == "eos"


@pytest.mark.parametrize("build,message", [
    (lambda: models.ViTConfig(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2,
                              image_size=20), r"^patch size 8 does not divide image size 20; [^.]*\.$"),
    (lambda: models.ViTConfig(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2,
                              patch_dropout=1.0), r"^patch_dropout=1\.0 must be in \[0, 1\)"),
    (lambda: models.TextConfig(width=32, depth=1, mlp_dim=64, num_heads=2, pool="cls"),
     r"^text pool='cls' is unknown; use one of \('eos', 'last', 'first', 'mean', 'map'\)\.$"),
    (lambda: models.TextConfig(width=32, depth=1, mlp_dim=64, num_heads=2, act="relu"),
     r"^text act='relu' is unknown; use one of .*\.$"),
    (lambda: models.image_config({"image": {"poool": "map"}}),
     r"^config\.image\.poool is not a model option; known options: \[.*\]\.$"),
    (lambda: models.text_config({"text": {"bogus": 1}}), r"^config\.text\.bogus is not a model option"),
])
def test_an_invalid_or_unknown_tower_field_fails_in_one_sentence(build, message):
    with pytest.raises(ValueError, match=message) as raised:
        build()
    assert "\n" not in str(raised.value)


def test_image_shape_is_checked():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\)"):
        model.embed_images(jnp.zeros((2, 8, 8, 3)))



# ----------------------------------------------------------------------------
# Patch dropout (FLIP)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["tok", "gap", "map"])
def test_patch_dropout_keeps_a_random_subset_of_patches_in_training_only(pool):
    cfg = tiny_config(**{"image.pool": pool, "image.patch_dropout": 0.5})
    model = random_model(cfg)
    plain = random_model(tiny_config(**{"image.pool": pool}))  # same weights, no dropout
    images, tokens = batch()
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(B))
    tokens_fn = jax.jit(lambda graphdef, state, images, keys: nnx.merge(graphdef, state).tokens(images, keys),
                        static_argnums=0, compiler_options=FAST)
    cls = int(pool == "tok")
    assert model.image.num_kept_patches == 2  # int(4 patches * 0.5)
    kept = tokens_fn(*nnx.split(model.image), images, keys)
    full = tokens_fn(*nnx.split(model.image), images, None)
    assert kept.shape == (B, 2 + cls, 32) and full.shape == (B, 4 + cls, 32)
    # The kept tokens are rows of the full sequence, in order; images draw different subsets.
    full_np, kept_np = np.asarray(full), np.asarray(kept)
    chosen = [tuple(int(np.argmin(np.abs(full_np[b] - t).sum(-1))) for t in kept_np[b]) for b in range(B)]
    assert all(list(c) == sorted(c) and len(set(c)) == len(c) for c in chosen)
    if cls:
        assert all(c[0] == 0 for c in chosen)  # the class token is always kept
    np.testing.assert_allclose(kept_np, np.take_along_axis(full_np, np.array(chosen)[..., None], 1), atol=1e-6)
    assert len(set(chosen)) > 1
    # Evaluation (no keys) is unchanged by the option.
    for name in ("zimg", "ztxt"):
        np.testing.assert_array_equal(getattr(forward(*nnx.split(model), images, tokens), name),
                                      getattr(forward(*nnx.split(plain), images, tokens), name))


def test_text_tower_starts_with_words_louder_than_positions():
    """Token and position embeddings are initialised as in CLIP (std 0.02 and 0.01). Mixing
    CLIP's 0.02 for tokens with big_vision's 1/sqrt(width) for positions made positions 9x
    louder than words in the width-32 demo tower, whose embeddings then encoded caption length
    more than content (experiments/demo_recipe: demo colour top-1 with short prompts 0.52 -> 0.97)."""
    from big_contrast.models.text import TextConfig, TextTransformer

    text = TextTransformer(TextConfig(vocab_size=64, max_len=16, width=32, depth=1, mlp_dim=64,
                                      num_heads=2), rngs=nnx.Rngs(0))
    token_std = float(jnp.std(text.embedding.embedding[...]))
    position_std = float(jnp.std(text.posemb[...]))
    assert token_std == pytest.approx(0.02, rel=0.1) and position_std == pytest.approx(0.01, rel=0.1)
    assert token_std > position_std
