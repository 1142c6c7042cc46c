"""The NaFlex forward (models/naflex.py) against transformers' Siglip2VisionModel, torch's
antialiased interpolation, the fixed-resolution ViT, and itself in other batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from big_contrast import models
from big_contrast.data import naflex as naflex_data
from big_contrast.models import naflex
from conftest import random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PATCH, GRID, BUDGET = 4, 4, 24  # a 4x4 learned table; up to 24 patches per image
SIZES = [(37, 91), (50, 17), (9, 9), (16, 16)]  # wide, tall, enlarged, the table's own grid


def config(pool="map"):
    return dict(image=dict(variant="mu/4", image_size=PATCH * GRID, pool=pool, depth=2, num_heads=4),
                text=dict(variant="mu", vocab_size=50, max_len=8, num_heads=4), embed_dim=16)


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in SIZES]


_naflex_features = nnx.jit(naflex.naflex_features)  # one trace per input shape


def features(vit, batch):
    return np.asarray(_naflex_features(vit, jnp.asarray(batch["patches"]), jnp.asarray(batch["patch_mask"]),
                                       jnp.asarray(batch["spatial_shapes"])))


@pytest.mark.parametrize("new_hw", [(2, 7), (3, 5), (4, 4), (8, 3), (1, 9)])
def test_resize_weights_equal_torch_antialiased_bilinear(new_hw):
    table = np.random.default_rng(0).normal(size=(GRID, GRID, 6)).astype(np.float32)
    weights = naflex.resize_weights(jnp.asarray([new_hw], jnp.int32), (GRID, GRID), 30)
    got = np.asarray(weights[0] @ table.reshape(-1, 6))
    want = torch.nn.functional.interpolate(torch.tensor(table).permute(2, 0, 1)[None], size=new_hw,
                                           mode="bilinear", align_corners=False, antialias=True)
    want = want[0].permute(1, 2, 0).reshape(-1, 6).numpy()
    n = new_hw[0] * new_hw[1]
    np.testing.assert_allclose(got[:n], want, rtol=1e-5, atol=1e-6)
    # big_vision's naflex_vit resizes with jax.image.scale_and_translate: the same weights.
    big_vision = jax.image.scale_and_translate(
        jnp.asarray(table), (*new_hw, 6), (0, 1), jnp.asarray(new_hw, jnp.float32) / GRID,
        jnp.zeros(2), method="linear", antialias=True)
    np.testing.assert_allclose(got[:n], np.asarray(big_vision).reshape(-1, 6), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[n:], np.broadcast_to(got[0], (30 - n, 6)))  # padding: position (0, 0)


@pytest.mark.parametrize("pool", ["map", "gap", "tok"])
def test_a_square_image_at_the_tables_grid_embeds_as_the_fixed_resolution_vit(pool):
    vit = random_model(config(pool)).image
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    batch = dict(patches=np.stack([naflex_data.patchify(p, PATCH) for p in pixels]),
                 patch_mask=np.ones((2, GRID * GRID), bool), spatial_shapes=np.full((2, 2), GRID, np.int32))
    fixed = np.asarray(nnx.jit(lambda m, x: m(x))(vit, jnp.asarray(pixels)))
    np.testing.assert_allclose(features(vit, batch), fixed, rtol=1e-5, atol=1e-5)


def test_two_tower_embeddings_of_naflex_inputs_equal_the_fixed_resolution_ones():
    model = random_model(config())
    pixels = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    zimg = nnx.jit(naflex.naflex_embed_images)(
        model, jnp.asarray(np.stack([naflex_data.patchify(p, PATCH) for p in pixels])),
        jnp.ones((2, GRID * GRID), bool), jnp.full((2, 2), GRID, jnp.int32))
    fixed = nnx.jit(lambda m, x: m.embed_images(x))(model, jnp.asarray(pixels))
    assert zimg.shape == (2, 16) and zimg.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(zimg), np.asarray(fixed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["map", "gap", "tok"])
def test_each_image_embeds_the_same_alone_and_in_a_mixed_batch(pool):
    vit = random_model(config(pool)).image
    batch = naflex_data.naflex_batch(images(), patch_size=PATCH, max_num_patches=BUDGET)
    together = features(vit, batch)
    garbage = dict(batch, patches=np.where(batch["patch_mask"][..., None], batch["patches"], 7.0))
    np.testing.assert_allclose(features(vit, garbage), together, rtol=1e-5, atol=1e-6)
    for i in range(len(SIZES)):  # image i in every row: nothing of the other images is left
        alone = features(vit, {k: np.repeat(v[i:i + 1], len(SIZES), axis=0) for k, v in batch.items()})
        np.testing.assert_allclose(alone, np.broadcast_to(together[i], alone.shape), rtol=1e-5, atol=1e-6)
    if pool == "map":  # literally alone, and with 9 more padding rows
        np.testing.assert_allclose(features(vit, {k: v[1:2] for k, v in batch.items()})[0], together[1],
                                   rtol=1e-5, atol=1e-6)
        longer = dict(batch, patches=np.pad(batch["patches"], ((0, 0), (0, 9), (0, 0))),
                      patch_mask=np.pad(batch["patch_mask"], ((0, 0), (0, 9))))
        np.testing.assert_allclose(features(vit, longer), together, rtol=1e-5, atol=1e-6)


def hf_vision_model(seed=0):
    torch.manual_seed(seed)
    hf_config = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_channels=3, num_patches=GRID * GRID, patch_size=PATCH, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6)
    model = transformers.Siglip2VisionModel(hf_config).eval()
    with torch.no_grad():  # the init leaves biases at zero: make every weight matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def our_vit_with(hf_model):
    """Our ViT holding the HF weights, mapped with the SigLIP import rules (interop/hf.py);
    NaFlex's patch embedding is a Linear over flattened patches, read as our conv kernel."""
    from big_contrast.interop import hf, weights

    cfg = models.resolve_config(config())
    rules = [weights.Rule(r.ours, r.theirs, "lin" if r.ours == "image/embedding/kernel" else r.kind)
             for r in hf.rules(cfg) if r.ours.startswith("image/")]
    state = hf.unfuse({f"vision_model.{k}": v.detach().numpy() for k, v in hf_model.state_dict().items()})
    model = random_model(config())
    expected = {f"image/{k}": v.shape for k, v in _flat(nnx.to_pure_dict(nnx.state(model.image, nnx.Param)))}
    flat = weights.to_ours(rules, state, expected, "Siglip2VisionModel")
    models.load_tower_params(model, "image", _nested({k[len("image/"):]: v for k, v in flat.items()}))
    return model.image


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _nested(flat):
    out = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def test_pooled_features_match_transformers_siglip2_vision_model():
    hf_model = hf_vision_model()
    vit = our_vit_with(hf_model)
    pil_images = [Image.fromarray(x) for x in images(2)]
    inputs = transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=BUDGET)(
        images=pil_images, return_tensors="pt")
    with torch.no_grad():
        want = hf_model(**inputs).pooler_output.numpy()
    ours = naflex_data.naflex_batch(pil_images, patch_size=PATCH, max_num_patches=BUDGET)
    np.testing.assert_array_equal(ours["patches"], inputs["pixel_values"].numpy())
    got = features(vit, ours)
    cosine = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(1 - cosine <= 1e-5), 1 - cosine
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_sincos_vit_and_wrong_patches_are_refused_in_one_sentence():
    vit = random_model(config()).image
    with pytest.raises(ValueError, match=r"do not match the model's \[B, N, 48\] and \[B, 2\]"):
        naflex.naflex_features(vit, jnp.zeros((1, 8, 27)), jnp.ones((1, 8), bool), jnp.ones((1, 2), jnp.int32))
    sincos = models.abstract_model(dict(config(), image=dict(config()["image"], posemb="sincos2d"))).image
    with pytest.raises(NotImplementedError, match="NaFlex needs a learned position table"):
        naflex.naflex_features(sincos, jnp.zeros((1, 8, 48)), jnp.ones((1, 8), bool), jnp.ones((1, 2), jnp.int32))


def test_padding_gets_no_gradient_and_the_table_gets_a_finite_one():
    vit = random_model(config()).image
    batch = naflex_data.naflex_batch(images(), patch_size=PATCH, max_num_patches=BUDGET)
    graphdef, params = nnx.split(vit)

    def loss(params, patches):
        pooled = naflex.naflex_features(nnx.merge(graphdef, params), patches, jnp.asarray(batch["patch_mask"]),
                                        jnp.asarray(batch["spatial_shapes"]))
        return jnp.sum(pooled ** 2)

    grad_params, grad_patches = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(batch["patches"]))
    grad_patches = np.asarray(grad_patches)
    assert not grad_patches[~batch["patch_mask"]].any()  # exactly zero on every padding row
    assert np.abs(grad_patches[batch["patch_mask"]]).sum(-1).min() > 0
    table_grad = np.asarray(grad_params["posemb"].get_value())
    assert np.isfinite(table_grad).all() and np.abs(table_grad).sum(-1).min() > 0


_embed = jax.jit(lambda graphdef, state, *inputs: naflex.naflex_embed_images(nnx.merge(graphdef, state), *inputs),
                 static_argnums=0, compiler_options=dict(xla_backend_optimization_level=0))


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_sharded_naflex_embeddings_equal_unsharded(axis_types):
    from big_contrast import sharding

    graphdef, state = nnx.split(random_model(config()))
    batch = naflex_data.naflex_batch(images() + images(1), patch_size=PATCH, max_num_patches=BUDGET)
    inputs = tuple(jnp.asarray(batch[k]) for k in ("patches", "patch_mask", "spatial_shapes"))
    expected = np.asarray(_embed(graphdef, state, *inputs))
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)), axis_types=axis_types)
    sharded = jax.device_put(inputs, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        zimg = _embed(graphdef, sharding.shard_state(state, mesh), *sharded)
    assert zimg.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    np.testing.assert_allclose(np.asarray(zimg), expected, rtol=1e-5, atol=1e-6)
