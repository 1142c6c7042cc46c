"""Released checkpoints in and out: parity with transformers, open_clip and a big_vision tree.

Every reference is built here from a tiny config with random weights (nothing downloads):
transformers' SiglipModel / CLIPModel with in-process trained tokenizers, open_clip models
from registered tiny configs (one CLIP ViT, one timm SigLIP ViT), and a big_vision-layout
tree written from the SigLIP reference by an explicit converter in this file.
"""
import json
import math

import numpy as np
import pytest
# The references are in the test extra that `make test` installs: a broken install fails here,
# never skips (open_clip is imported by the tests that use it, to keep collection fast).
import tokenizers
import torch
import transformers
from flax import nnx
from PIL import Image

from big_contrast import interop
from big_contrast.cli import main as cli_main
from big_contrast.interop import hf
from big_contrast.interop.preprocess import Transform
from big_contrast.interop.tokenizers import PretrainedTokenizer
from big_contrast.workdir import CHECKPOINTS

TRICKY = ["A photo of a CAT.", "  many   spaces\tand\nnew lines ", "", "naïve café — Ünïcödé 東京",
          "word " * 90, "punctuation!!! (yes) [no] {maybe} 'quoted' \"double\"", "UPPER lower MiXeD"]
CORPUS = [f"a photo of a {c} {s}, on the left!" for c in ("red", "green", "blue", "big", "small")
          for s in ("cat", "dog", "square", "circle", "café", "naïve", "tokyo")] * 4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VISION = dict(TOWER, image_size=32, patch_size=8)
# Logit scales and biases the references get, none of them this project's defaults (softmax:
# log(1/0.07), clamped at log 100; sigmoid: log 10 and -10), so a fallback to a default fails.
# The CLIP scale lies above log 100: the import must lift the clamp too.
CLIP_LOG_SCALE = 5.0
SIGLIP_LOG_SCALE, SIGLIP_BIAS = math.log(7.0), -3.0


def cosine_gap(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.max(1 - np.sum(a * b, axis=-1))


def random_inputs(vocab_size, length, image_size=32, n=3, eos_id=None):
    pixels = np.random.RandomState(0).randn(n, image_size, image_size, 3).astype(np.float32)
    ids = np.random.RandomState(1).randint(3, vocab_size - 1, size=(n, length))
    if eos_id is not None:
        ids[:, length // 2] = eos_id
    return pixels, ids


def reference_outputs(model, pixels, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def forward(model, pixels, ids):
    """The model's Embeddings, jitted (eager dispatch of a first call costs seconds)."""
    return _forward(model, pixels, np.asarray(ids, np.int32))


@nnx.jit
def _forward(model, pixels, ids):
    return model(images=pixels, texts=ids)


def assert_same_outputs(model, pixels, ids, reference):
    ref_img, ref_txt, ref_logits = reference
    out = forward(model, pixels, ids)
    assert cosine_gap(out.zimg, ref_img) <= 1e-5
    assert cosine_gap(out.ztxt, ref_txt) <= 1e-5
    logits = float(out.scale) * np.asarray(out.ztxt) @ np.asarray(out.zimg).T
    logits += 0.0 if out.bias is None else float(out.bias)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    """A tiny SiglipModel directory with an in-process sentencepiece tokenizer."""
    from big_contrast.data.tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("hf_siglip")
    spm_path = directory / "source.model"
    spm_path.write_bytes(train_sentencepiece(CORPUS, 96, lowercase=True))
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(spm_path))
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(TOWER, vocab_size=len(tokenizer), max_position_embeddings=64),
        vision_config=VISION)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_LOG_SCALE)
        model.logit_bias.fill_(SIGLIP_BIAS)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory, model, tokenizer


def clip_tokenizer_json(path):
    """A CLIP-style byte-level BPE (lowercase, </w> word ends, <|startoftext|> ... <|endoftext|>)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", eos), ("<|startoftext|>", bos),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.save(str(path))
    return tok.get_vocab_size(), eos


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny CLIPModel directory with an in-process CLIP-style tokenizer.json."""
    directory = tmp_path_factory.mktemp("hf_clip")
    vocab_size, eos = clip_tokenizer_json(directory / "tokenizer.json")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory))
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=dict(TOWER, vocab_size=vocab_size, max_position_embeddings=77, eos_token_id=eos,
                         bos_token_id=0, pad_token_id=eos, hidden_act="quick_gelu"),
        vision_config=dict(VISION, hidden_act="quick_gelu"), projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(CLIP_LOG_SCALE)
    model.save_pretrained(directory)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(directory)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A Gemma-style tokenizer.json (byte-fallback BPE over '▁'-joined words) saved by
    transformers' Siglip2Tokenizer, which lowercases and pads on the left."""
    from tokenizers import normalizers, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("gemma")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([c.replace(" ", "▁") for c in CORPUS],
                            trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    reference = transformers.Siglip2Tokenizer(vocab=tok.get_vocab(), merges=merges)
    reference.save_pretrained(str(directory))
    return directory, transformers.AutoTokenizer.from_pretrained(str(directory))


# ----------------------------------------------------------------------------- weights


def test_hf_siglip_import_gives_the_reference_embeddings_and_logits(hf_siglip):
    directory, reference, _ = hf_siglip
    model, _, _ = interop.load(directory)
    pixels, ids = random_inputs(reference.config.text_config.vocab_size, 64)
    assert_same_outputs(model, pixels, ids, reference_outputs(reference, pixels, ids))


def test_hf_clip_import_gives_the_reference_embeddings_and_logits(hf_clip):
    directory, reference, _ = hf_clip
    model, _, _ = interop.load(directory)
    eos = reference.config.text_config.eos_token_id
    pixels, ids = random_inputs(reference.config.text_config.vocab_size - 1, 77, eos_id=eos)
    assert_same_outputs(model, pixels, ids, reference_outputs(reference, pixels, ids))


OPEN_CLIP_ARCHS = {
    "bc-tiny-clip": {"embed_dim": 24, "quick_gelu": True,
                     "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                    "patch_size": 8},
                     "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                                  "layers": 2}},
    "bc-tiny-siglip": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                       "vision_cfg": {"image_size": 32, "timm_model_name": "vit_mu_patch8_siglip_32",
                                      "timm_model_pretrained": False, "timm_pool": "map",
                                      "timm_proj": "none"},
                       "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                                    "layers": 2, "no_causal_mask": True, "proj_bias": True,
                                    "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
}


def _register_tiny_timm_siglip():
    """timm's SigLIP ViT at big_vision's test size 'mu' (width 32, depth 1, 2 heads)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if "vit_mu_patch8_siglip_32" in timm.list_models("vit_mu_*"):
        return

    @timm.models.register_model
    def vit_mu_patch8_siglip_32(pretrained=False, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
        return VisionTransformer(**{**dict(patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                           mlp_ratio=4.0, class_token=False, global_pool="map",
                                           img_size=32), **kwargs})


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_ARCHS))
def test_open_clip_import_gives_the_reference_embeddings(name, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    _register_tiny_timm_siglip()
    arch_path = tmp_path / f"{name}.json"
    arch_path.write_text(json.dumps(OPEN_CLIP_ARCHS[name]))
    open_clip.add_model_config(str(arch_path))
    torch.manual_seed(2)
    reference = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():  # both archs' defaults are this project's: move them off
        reference.logit_scale.fill_(CLIP_LOG_SCALE if name == "bc-tiny-clip" else SIGLIP_LOG_SCALE)
        if reference.logit_bias is not None:
            reference.logit_bias.fill_(SIGLIP_BIAS)
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    model, _, _ = interop.load(weights, arch=str(arch_path))
    if name == "bc-tiny-clip":  # a torch pickle holds the same weights
        from big_contrast.interop.weights import read_weights

        torch.save(reference.state_dict(), tmp_path / "model.bin")
        pickled, safe = read_weights(tmp_path / "model.bin"), read_weights(weights)
        assert pickled.keys() == safe.keys() and all(np.array_equal(pickled[k], safe[k]) for k in safe)
    pixels, ids = random_inputs(64, 16)
    images, texts = torch.tensor(pixels.transpose(0, 3, 1, 2)), torch.tensor(ids)
    with torch.no_grad():
        ref_img, ref_txt = reference.encode_image(images, normalize=True), reference.encode_text(texts, normalize=True)
        _, ref_logits = reference.get_logits(images, texts)  # exp(logit_scale) * cosines + logit_bias
    assert_same_outputs(model, pixels, ids, (ref_img.numpy(), ref_txt.numpy(), ref_logits.numpy()))
    out = forward(model, pixels, ids)
    np.testing.assert_allclose(float(out.scale), float(reference.logit_scale.exp()), rtol=1e-6)
    if reference.logit_bias is None:
        assert out.bias is None
    else:
        np.testing.assert_allclose(float(out.bias), float(reference.logit_bias), rtol=1e-6)


def big_vision_tree(hf_state: dict, depth: int) -> dict:
    """transformers' SiglipModel weights in big_vision's layout (the inverse of transformers'
    convert_siglip_to_hf.py), written out name by name."""
    s = {k: v.numpy() for k, v in hf_state.items()}
    heads, width = 2, 32

    def dense(prefix):
        return {"kernel": s[prefix + ".weight"].T, "bias": s[prefix + ".bias"]}

    def attention(q, k, v, out):
        def split(w, b):
            return {"kernel": w.T.reshape(width, heads, -1), "bias": b.reshape(heads, -1)}
        return {"query": split(*q), "key": split(*k), "value": split(*v),
                "out": {"kernel": out[0].T.reshape(heads, -1, width), "bias": out[1]}}

    def norm(prefix):
        return {"scale": s[prefix + ".weight"], "bias": s[prefix + ".bias"]}

    def encoder(tower):
        blocks = {}
        for i in range(depth):
            p = f"{tower}.encoder.layers.{i}"
            qkv = [(s[f"{p}.self_attn.{n}_proj.weight"], s[f"{p}.self_attn.{n}_proj.bias"])
                   for n in ("q", "k", "v", "out")]
            blocks[f"encoderblock_{i}"] = {
                "LayerNorm_0": norm(f"{p}.layer_norm1"), "LayerNorm_1": norm(f"{p}.layer_norm2"),
                "MultiHeadDotProductAttention_0": attention(*qkv),
                "MlpBlock_0": {"Dense_0": dense(f"{p}.mlp.fc1"), "Dense_1": dense(f"{p}.mlp.fc2")}}
        return blocks

    head = "vision_model.head"
    in_w, in_b = np.split(s[f"{head}.attention.in_proj_weight"], 3), np.split(s[f"{head}.attention.in_proj_bias"], 3)
    img = {"embedding": {"kernel": s["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                         "bias": s["vision_model.embeddings.patch_embedding.bias"]},
           "pos_embedding": s["vision_model.embeddings.position_embedding.weight"][None],
           "Transformer": {**encoder("vision_model"), "encoder_norm": norm("vision_model.post_layernorm")},
           "MAPHead_0": {"probe": s[f"{head}.probe"],
                         "MultiHeadDotProductAttention_0": attention(
                             *zip(in_w, in_b), (s[f"{head}.attention.out_proj.weight"],
                                                s[f"{head}.attention.out_proj.bias"])),
                         "LayerNorm_0": norm(f"{head}.layernorm"),
                         "MlpBlock_0": {"Dense_0": dense(f"{head}.mlp.fc1"),
                                        "Dense_1": dense(f"{head}.mlp.fc2")}}}
    txt = {"Embed_0": {"embedding": s["text_model.embeddings.token_embedding.weight"]},
           "pos_embedding": s["text_model.embeddings.position_embedding.weight"][None],
           "Encoder_0": {**encoder("text_model"), "encoder_norm": norm("text_model.final_layer_norm")},
           "head": dense("text_model.head")}
    return {"img": img, "txt": txt, "t": s["logit_scale"], "b": s["logit_bias"]}


def flat_npz(tree, prefix="params"):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        out.update(flat_npz(value, name) if isinstance(value, dict) else {name: value})
    return out


def test_big_vision_npz_import_gives_the_reference_embeddings(hf_siglip, tmp_path):
    _, reference, _ = hf_siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **flat_npz(big_vision_tree(reference.state_dict(), depth=2)))
    vocab = reference.config.text_config.vocab_size
    model, _, transform = interop.load(path, arch=bv_arch(vocab))
    assert transform.output_size == (32, 32)
    pixels, ids = random_inputs(vocab, 64)
    assert_same_outputs(model, pixels, ids, reference_outputs(reference, pixels, ids))
    with pytest.raises(ValueError, match="--arch option 'bad=1' is unknown"):
        interop.load(path, arch=bv_arch(vocab) + ",bad=1")


def bv_arch(vocab):
    """big_vision's test size 'mu' with the reference's depth and MLP width."""
    return (f"mu/8,mu,vocab={vocab},size=32,len=64,img_depth=2,txt_depth=2,img_mlp_dim=64,"
            "txt_mlp_dim=64")


def test_safetensors_import_does_not_import_torch(hf_siglip):
    import subprocess
    import sys

    code = ("import sys; from big_contrast.interop import hf; d = sys.argv[1]; "
            "state = hf.read_state(d); cfg = hf.model_config(hf.read_config(d)); "
            "tok = hf.tokenizer_of(d, 'siglip', 64); "
            "assert state and tok and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(hf_siglip[0])], check=True)


def test_mis_shaped_and_unexpected_weights_are_named(hf_siglip, tmp_path):
    _, reference, _ = hf_siglip
    tree = flat_npz(big_vision_tree(reference.state_dict(), depth=2))
    tree["params/txt/head/bias"] = np.zeros(7, np.float32)
    tree["params/extra/kernel"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **tree)
    vocab = reference.config.text_config.vocab_size
    with pytest.raises(ValueError) as error:
        interop.read(path, arch=bv_arch(vocab))
    message = str(error.value)
    assert "txt/head/bias: shape (7,)" in message and "unexpected extra/kernel" in message


# ----------------------------------------------------------------------------- tokenizers


def test_siglip_sentencepiece_ids_equal_transformers(hf_siglip):
    directory, _, reference = hf_siglip
    ours = interop.read(directory).make_tokenizer()
    expected = reference(TRICKY, padding="max_length", max_length=64, truncation=True).input_ids
    assert ours.max_len == 64 and ours.pad_id == reference.pad_token_id
    np.testing.assert_array_equal(ours(TRICKY), np.asarray(expected))


def test_clip_bpe_ids_equal_transformers(hf_clip):
    directory, _, reference = hf_clip
    ours = interop.read(directory).make_tokenizer()
    expected = reference(TRICKY, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.max_len == 77
    np.testing.assert_array_equal(ours(TRICKY), np.asarray(expected))


def test_gemma_ids_equal_transformers_siglip2_tokenizer(gemma_dir):
    directory, reference = gemma_dir
    settings = hf.tokenizer_of(directory, "siglip", 64)["settings"]
    ours = PretrainedTokenizer(directory, settings=settings)
    expected = reference(TRICKY, padding="max_length", max_length=64, truncation=True).input_ids
    np.testing.assert_array_equal(ours(TRICKY), np.asarray(expected))
    assert ours("A CAT")[0].tolist() == ours("a cat")[0].tolist()  # SigLIP 2 lowercases


def test_open_clip_clip_tokenizer_ids_equal_open_clip(tmp_path):
    import open_clip
    from big_contrast.interop.open_clip import clip_tokenizer

    record = clip_tokenizer(tmp_path, 77)
    ours = PretrainedTokenizer(record["directory"], settings=record["settings"])
    captions = TRICKY + ["it's &amp; they're 123 4.5", "emoji 😀🎉 ok", "<start_of_text> x"]
    np.testing.assert_array_equal(ours(captions), open_clip.get_tokenizer("ViT-B-32")(captions).numpy())


def test_canonicalisation_is_big_vision_s():
    from big_contrast.interop.tokenizers import canonicalize

    assert canonicalize("  A photo, of a CAT!!  (big)  ") == "a photo of a cat big"
    assert canonicalize("naïve\tCafé.") == "naïve café"


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(37, 23), (50, 81), (17, 17)])
def test_transform_equals_the_hf_image_processors(hf_siglip, hf_clip, size):
    image = Image.fromarray(np.random.RandomState(size[0]).randint(0, 256, (*size, 3), np.uint8))
    for directory, processor in ((hf_siglip[0], transformers.SiglipImageProcessorPil),
                                 (hf_clip[0], transformers.CLIPImageProcessorPil)):
        transform = Transform(interop.read(directory).preprocess)
        expected = processor.from_pretrained(str(directory))(image, return_tensors="np").pixel_values[0]
        np.testing.assert_allclose(transform(image), expected.transpose(1, 2, 0), atol=1e-5)


# ----------------------------------------------------------------------------- workdirs


@pytest.fixture(scope="module")
def siglip_workdir(hf_siglip, tmp_path_factory):
    """`big-contrast import` of the SigLIP reference."""
    workdir = tmp_path_factory.mktemp("imported") / "W"
    assert cli_main(["big-contrast", "import", str(hf_siglip[0]), "--workdir", str(workdir)]) == 0
    return workdir


def test_import_eval_export_round_trip(hf_siglip, siglip_workdir, tmp_path, capsys):
    directory, reference, tokenizer = hf_siglip
    workdir = siglip_workdir
    assert {"config.py", "interop.json", "tokenizer", CHECKPOINTS} <= {p.name for p in workdir.iterdir()}
    assert cli_main(["big-contrast", "eval", "--config", str(workdir / "config.py"),
                     "--workdir", str(workdir)]) == 0
    assert "shape" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert cli_main(["big-contrast", "export", "--workdir", str(workdir), "--to", "hf", str(out)]) == 0
    back = transformers.AutoModel.from_pretrained(str(out)).eval()
    back_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert back_tokenizer(TRICKY[:3]).input_ids == tokenizer(TRICKY[:3]).input_ids
    pixels, ids = random_inputs(reference.config.text_config.vocab_size, 64)
    for got, want in zip(reference_outputs(back, pixels, ids), reference_outputs(reference, pixels, ids)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    npz = tmp_path / "siglip.npz"
    assert cli_main(["big-contrast", "export", "--workdir", str(workdir), "--to", "npz", str(npz)]) == 0
    again = interop.read(npz, arch=bv_arch(reference.config.text_config.vocab_size))
    original = interop.read(workdir)
    assert all(np.array_equal(again.params[k], v) for k, v in original.params.items())


def test_a_workdir_that_was_not_imported_exports_with_its_config(hf_siglip, siglip_workdir, tmp_path):
    import shutil

    from big_contrast.commands.export import run_export

    _, reference, _ = hf_siglip
    plain = tmp_path / "plain"  # checkpoints only, as a run of this project leaves them
    shutil.copytree(siglip_workdir / CHECKPOINTS, plain / CHECKPOINTS)
    with pytest.raises(ValueError, match="pass --config"):
        run_export(plain, "hf", tmp_path / "x")
    run_export(plain, "hf", tmp_path / "hf", config=str(siglip_workdir / "config.py"))
    back = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    pixels, ids = random_inputs(reference.config.text_config.vocab_size, 64)
    for got, want in zip(reference_outputs(back, pixels, ids), reference_outputs(reference, pixels, ids)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_npz_import_takes_the_tokenizer_of_an_hf_directory(hf_siglip, tmp_path):
    from big_contrast.commands.import_ import run_import

    directory, reference, tokenizer = hf_siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **flat_npz(big_vision_tree(reference.state_dict(), depth=2)))
    saved = []
    run_import(path, tmp_path / "W", bv_arch(reference.config.text_config.vocab_size),
               lambda config, workdir, params: saved.append(params), tokenizer=str(directory))
    ours = PretrainedTokenizer(tmp_path / "W" / "tokenizer")
    expected = tokenizer(TRICKY, padding="max_length", max_length=64, truncation=True).input_ids
    np.testing.assert_array_equal(ours(TRICKY), np.asarray(expected))
    assert saved and set(saved[0]) == {"image", "text", "text_head", "log_scale", "bias"}


def test_clip_exports_to_transformers_and_refuses_npz(hf_clip, tmp_path):
    from big_contrast.commands.export import run_export
    from big_contrast.interop.imported import write_workdir
    from big_contrast.commands.import_ import save_initial_checkpoint

    directory, reference, _ = hf_clip
    workdir = write_workdir(tmp_path / "W", interop.read(directory), save_initial_checkpoint)
    run_export(workdir, "hf", tmp_path / "hf")
    back = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    eos = reference.config.text_config.eos_token_id
    pixels, ids = random_inputs(reference.config.text_config.vocab_size - 1, 77, eos_id=eos)
    for got, want in zip(reference_outputs(back, pixels, ids), reference_outputs(reference, pixels, ids)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="softmax loss"):
        run_export(workdir, "npz", tmp_path / "x.npz")


@pytest.mark.parametrize("how", ["lit", "fine_tune"])
def test_an_imported_model_trains_a_step_with_the_image_tower_frozen(siglip_workdir, tmp_path, how):
    """LiT: a fresh workdir loads the imported image tower (`init_towers`); fine-tuning: a copy
    of the imported workdir resumes from its step-0 checkpoint. Both lock the image tower, so
    they compile the same step."""
    import shutil

    import jax

    from big_contrast import sharding
    from big_contrast.checkpoint import Checkpointer
    from big_contrast.interop.imported import flatten, load_config
    from big_contrast.train import train

    config = load_config(siglip_workdir / "config.py")
    config.model.lock_image = True
    config.evals = {}
    workdir = tmp_path / how
    if how == "lit":
        config.init_towers = {"image": str(siglip_workdir)}
    else:
        shutil.copytree(siglip_workdir / CHECKPOINTS, workdir / CHECKPOINTS)
    one_device = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])  # a faster save
    train(config, workdir, mesh=one_device, progress=False)
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    state, step = ckpt.restore_arrays()
    ckpt.close()
    imported, trained = interop.read(siglip_workdir).params, flatten(state["params"])
    assert step == 1
    assert all(np.array_equal(trained[k], v) for k, v in imported.items() if k.startswith("image/"))
    assert not np.array_equal(trained["text_head/kernel"], imported["text_head/kernel"])
    if how == "fine_tune":  # started from the imported text tower, moved by one small step
        np.testing.assert_allclose(trained["text_head/kernel"], imported["text_head/kernel"], atol=1e-3)


# ----------------------------------------------------------------------------- what has no counterpart


def test_what_has_no_counterpart_fails_with_a_sentence(hf_siglip, tmp_path):
    from big_contrast.interop import open_clip as oc

    with pytest.raises(ValueError, match="ResNet tower"):
        oc.model_config({"embed_dim": 1024, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64},
                         "text_cfg": {}})
    with pytest.raises(ValueError, match="text_cfg.hf_model_name has no counterpart"):
        oc.model_config({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "x"}})
    with pytest.raises(ValueError, match="model_type='blip' has no counterpart"):
        hf.family_of({"model_type": "blip"})
    with pytest.raises(ValueError, match="--arch"):
        interop.read(tmp_path.joinpath("w.safetensors").write_bytes(b"") or tmp_path / "w.safetensors")
    cfg = hf.model_config(hf.read_config(hf_siglip[0]))
    cfg["image"]["pool"] = "gap"
    from big_contrast import models
    with pytest.raises(ValueError, match="image.pool='gap'"):
        hf.check_exportable(models.resolve_config(cfg))
    cfg["image"].update(pool="map", rope="2d")  # a RoPE tower would export without its rotation
    with pytest.raises(ValueError, match="image.rope='2d'"):
        hf.check_exportable(models.resolve_config(cfg))


def test_checkpoint_arrays_restore_on_fewer_devices_than_wrote_them(tmp_path):
    """Export and init_towers read a pod's checkpoint on a one-device machine."""
    import subprocess
    import sys

    import jax

    from big_contrast.checkpoint import Checkpointer

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    w = jax.device_put(np.arange(16, dtype=np.float32).reshape(8, 2),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    ckpt = Checkpointer(tmp_path / CHECKPOINTS, async_save=False)
    ckpt.save(0, {"params": {"w": w}}, {"step": 0}, wait=True)
    ckpt.close()
    code = ("import sys, numpy as np, jax; from big_contrast.checkpoint import Checkpointer; "
            "assert jax.device_count() == 1; c = Checkpointer(sys.argv[1], async_save=False); "
            "state, _ = c.restore_arrays(); c.close(); "
            "assert np.array_equal(state['params']['w'], np.arange(16).reshape(8, 2))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / CHECKPOINTS)], check=True, env=env)
