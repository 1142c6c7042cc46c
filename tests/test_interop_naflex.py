"""SigLIP 2 NaFlex checkpoints (transformers' Siglip2Model) in and out: parity of the imported
embeddings and preprocessing with transformers, the workdir `big-contrast import` writes, and
`big-contrast export` back to a Siglip2Model.

The reference is a tiny Siglip2Model with random weights built here (a 4 x 4 position table of
4 px patches, a processor budget of 24 patches, so images are fed at grids other than the
table's) and the Gemma-style tokenizer of test_interop.py; nothing downloads.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from big_contrast import interop, models
from big_contrast.cli import main as cli_main
from big_contrast.interop import hf
from big_contrast.interop.imported import load_config
from big_contrast.interop.preprocess import Transform
from big_contrast.models import naflex
from test_interop import TRICKY, cosine_gap, gemma_dir  # noqa: F401  (gemma_dir is a fixture)

PATCH, GRID, BUDGET, MAX_LEN = 4, 4, 24, 16
LOG_SCALE, BIAS = float(np.log(7.0)), -3.0
# Odd aspect ratios (wide, tall, enlarged, one row), and a square one.
SIZES = [(37, 91), (50, 17), (9, 9), (3, 40), (21, 21)]


@pytest.fixture(scope="module")
def hf_siglip2(gemma_dir, tmp_path_factory):  # noqa: F811
    """A tiny Siglip2Model directory: weights, Gemma tokenizer, Siglip2ImageProcessor config."""
    tokenizer_dir, tokenizer = gemma_dir
    directory = tmp_path_factory.mktemp("hf_siglip2")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=MAX_LEN,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(tower, num_channels=3, patch_size=PATCH, num_patches=GRID * GRID))
    torch.manual_seed(0)
    model = transformers.Siglip2Model(config).eval()
    with torch.no_grad():  # the init leaves biases at zero: make every weight matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(LOG_SCALE)
        model.logit_bias.fill_(BIAS)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=BUDGET).save_pretrained(directory)
    return directory, model, tokenizer


def pil_images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in SIZES]


def text_ids(tokenizer):
    texts = ["a photo of a red cat", "blue square", "", "naïve café on the left"] + ["x"]
    return tokenizer(texts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids


def reference_outputs(model, inputs, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(inputs["patches"]),
                    pixel_attention_mask=torch.tensor(inputs["patch_mask"].astype(np.int64)),
                    spatial_shapes=torch.tensor(inputs["spatial_shapes"].astype(np.int64)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


@nnx.jit
def _ours(model, patches, mask, shapes, ids):
    zimg = naflex.naflex_embed_images(model, patches, mask, shapes)
    ztxt = model.embed_texts(ids)
    return zimg, ztxt, model.scale() * ztxt @ zimg.T + model.bias[...]


def our_outputs(model, inputs, ids):
    out = _ours(model, *(jnp.asarray(inputs[k]) for k in ("patches", "patch_mask", "spatial_shapes")),
                jnp.asarray(ids, jnp.int32))
    return tuple(np.asarray(x) for x in out)


def assert_same_outputs(got, want):
    assert cosine_gap(got[0], want[0]) <= 1e-5
    assert cosine_gap(got[1], want[1]) <= 1e-5
    np.testing.assert_allclose(got[2], want[2], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- import


def test_the_import_is_a_learned_table_vit_at_the_tables_grid(hf_siglip2):
    record = interop.read(hf_siglip2[0])
    vit = models.image_config(record.model_config)
    assert record.family == "siglip" and vit.posemb == "learn" and vit.grid == (GRID, GRID)
    assert record.params["image/posemb"].shape == (1, GRID * GRID, 32)
    assert record.preprocess == dict(resize="naflex", patch_size=PATCH, max_num_patches=BUDGET,
                                     resample="bilinear", mean=[0.5] * 3, std=[0.5] * 3)


def test_preprocessing_equals_siglip2_image_processor_on_odd_aspect_images(hf_siglip2):
    directory = hf_siglip2[0]
    images = pil_images()
    ours = Transform(interop.read(directory).preprocess).batch(images)
    pil = transformers.Siglip2ImageProcessorPil.from_pretrained(str(directory))(images=images, return_tensors="np")
    assert {tuple(s) for s in ours["spatial_shapes"]} >= {(3, 8), (8, 3), (1, 14)}  # not the table's grid
    np.testing.assert_array_equal(ours["spatial_shapes"], pil["spatial_shapes"])
    np.testing.assert_array_equal(ours["patch_mask"], pil["pixel_attention_mask"].astype(bool))
    np.testing.assert_array_equal(ours["patches"], pil["pixel_values"])
    # The default (torchvision) processor: the same grids and masks; its uint8 resize rounds
    # differently from Pillow's when shrinking (data/naflex.py), by at most one grey level.
    torchvision = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=BUDGET)(
        images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["spatial_shapes"], torchvision["spatial_shapes"])
    np.testing.assert_array_equal(ours["patch_mask"], torchvision["pixel_attention_mask"].astype(bool))
    assert np.abs(ours["patches"] - torchvision["pixel_values"]).max() * 127.5 < 1 + 1e-5


def test_imported_embeddings_and_logits_equal_transformers_siglip2_model(hf_siglip2):
    directory, reference, tokenizer = hf_siglip2
    model, _, transform = interop.load(directory)
    inputs, ids = transform.batch(pil_images(1)), text_ids(tokenizer)
    assert_same_outputs(our_outputs(model, inputs, ids), reference_outputs(reference, inputs, ids))


def test_a_square_image_embeds_the_same_through_the_fixed_resolution_forward(hf_siglip2):
    """The workdir's default pp (the table's own square) gives NaFlex's embedding of a square image."""
    from big_contrast.interop import preprocess

    record = interop.read(hf_siglip2[0])
    model = record.model()
    square = [pil_images()[-1]]
    naflex_inputs = Transform(record.preprocess).batch(square)
    assert tuple(naflex_inputs["spatial_shapes"][0]) == (GRID, GRID)
    pixels = Transform(preprocess.square_equivalent(record.preprocess, GRID * PATCH)).batch(square)
    fixed = np.asarray(nnx.jit(lambda m, x: m.embed_images(x))(model, jnp.asarray(pixels)))
    zimg = our_outputs(model, naflex_inputs, [[0] * MAX_LEN])[0]
    np.testing.assert_allclose(fixed, zimg, atol=1e-6)


# ----------------------------------------------------------------------------- workdir and export


@pytest.fixture(scope="module")
def naflex_workdir(hf_siglip2, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imported_naflex") / "W"
    assert cli_main(["big-contrast", "import", str(hf_siglip2[0]), "--workdir", str(workdir)]) == 0
    return workdir


def test_the_workdir_records_naflex_and_evaluates(hf_siglip2, naflex_workdir, capsys):
    directory, reference, tokenizer = hf_siglip2
    info = json.loads((naflex_workdir / "interop.json").read_text())
    assert info["preprocess"]["resize"] == "naflex" and info["model"]["image"]["posemb"] == "learn"
    config = load_config(naflex_workdir / "config.py")
    module_text = (naflex_workdir / "config.py").read_text()
    assert f"NAFLEX = {{'patch_size': {PATCH}, 'max_num_patches': {BUDGET}}}" in module_text
    assert config.data.pp_eval.startswith(f"decode|resize(({GRID * PATCH}, {GRID * PATCH})")
    assert config.model.image.image_size == GRID * PATCH
    import importlib.util
    spec = importlib.util.spec_from_file_location("naflex_workdir_config", naflex_workdir / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    naflex_config = module.get_config("naflex")
    assert naflex_config.data.pp_eval == naflex_config.data.pp_train == (
        f"decode|naflex(patch_size={PATCH}, max_num_patches={BUDGET}, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))")
    # The step-0 checkpoint holds the reference's weights.
    model, _, transform = interop.load(naflex_workdir)
    inputs, ids = transform.batch(pil_images(2)), text_ids(tokenizer)
    assert_same_outputs(our_outputs(model, inputs, ids), reference_outputs(reference, inputs, ids))
    assert cli_main(["big-contrast", "eval", "--config", str(naflex_workdir / "config.py"),
                     "--workdir", str(naflex_workdir)]) == 0
    assert "shape" in capsys.readouterr().out


def test_export_writes_a_siglip2_model_transformers_loads_with_the_same_outputs(hf_siglip2, naflex_workdir,
                                                                                 tmp_path):
    directory, reference, tokenizer = hf_siglip2
    out = tmp_path / "hf"
    assert cli_main(["big-contrast", "export", "--workdir", str(naflex_workdir), "--to", "hf", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip2"
    back = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert isinstance(back, transformers.Siglip2Model)
    images = pil_images(3)
    processor = transformers.Siglip2ImageProcessorPil.from_pretrained(str(out))
    assert (processor.patch_size, processor.max_num_patches) == (PATCH, BUDGET)
    theirs = processor(images=images, return_tensors="np")
    inputs = dict(patches=theirs["pixel_values"], patch_mask=theirs["pixel_attention_mask"].astype(bool),
                  spatial_shapes=theirs["spatial_shapes"])
    back_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert back_tokenizer(TRICKY[:3]).input_ids == tokenizer(TRICKY[:3]).input_ids
    ids = text_ids(tokenizer)
    for got, want in zip(reference_outputs(back, inputs, ids), reference_outputs(reference, inputs, ids)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # and back in: the same parameters as the first import
    again, first = interop.read(out), interop.read(naflex_workdir)
    assert again.preprocess == first.preprocess
    assert all(np.array_equal(again.params[k], v) for k, v in first.params.items())


def test_what_naflex_cannot_take_fails_with_a_sentence(hf_siglip2, tmp_path):
    config = hf.read_config(hf_siglip2[0])
    config["vision_config"]["num_patches"] = 20
    with pytest.raises(ValueError, match="num_patches=20 is not a square grid"):
        hf.model_config(config)
    with pytest.raises(ValueError, match="model_type='blip'"):
        hf.family_of({"model_type": "blip"})
    from big_contrast.interop import preprocess

    with pytest.raises(ValueError, match="resizes bilinearly"):
        preprocess.from_hf_naflex_preprocessor({"resample": 3})
    record = interop.read(hf_siglip2[0])
    cfg = models.resolve_config(dict(record.model_config, image=dict(record.model_config["image"],
                                                                     image_size=(16, 20))))
    with pytest.raises(ValueError, match="square grid: use a square image_size"):
        hf.hf_config(cfg, pad_id=0, eos_id=1, naflex=True)
