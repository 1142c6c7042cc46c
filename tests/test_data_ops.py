"""Image ops and tokenizers against independent references (PIL / numpy / hand-built ids)."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from big_contrast.data import image_ops
from big_contrast.data.errors import SkipRecord
from big_contrast.data.image_ops import parse_image_pp, sample_crop_box
from big_contrast.data.tokenizer import (PAD_ID, ByteTokenizer, SentencePieceTokenizer,
                                         WordTokenizer, encode_fixed, make_tokenizer,
                                         train_sentencepiece)


def smooth_image(width, height, seed=0, mode="RGB"):
    """A smooth random image (realistic for JPEG, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.uniform(size=(6, 8, 3)) * 255).astype(np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC).convert(mode)


def encode(image, fmt="PNG", **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_value_range_and_normalize_match_formulas():
    image = smooth_image(20, 10)
    x = np.asarray(image).astype(np.float64)
    out = parse_image_pp("decode|value_range(0, 2)")(encode(image), np.random.default_rng(0))
    np.testing.assert_allclose(out, x / 255 * 2, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (10, 20, 3)
    out = parse_image_pp("decode|normalize")(encode(image), np.random.default_rng(0))
    expected = (x / 255 - np.array(image_ops.CLIP_MEAN)) / np.array(image_ops.CLIP_STD)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_central_crop_and_flip_are_slices():
    image = smooth_image(30, 20)
    x = np.asarray(image)
    crop = parse_image_pp("decode|central_crop((8, 12))")(encode(image), np.random.default_rng(0))
    np.testing.assert_array_equal(crop, x[6:14, 9:21])
    flipped = parse_image_pp("decode|flip_lr(p=1.0)")(encode(image), np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, x[:, ::-1])
    kept = parse_image_pp("decode|flip_lr(p=0.0)")(encode(image), np.random.default_rng(0))
    np.testing.assert_array_equal(kept, x)


def _resample_weights(n_in, n_out, area):
    """[n_out, n_in] weights of one axis: area overlap, or linear with half-pixel centres and
    clamped edges."""
    weights = np.zeros((n_out, n_in))
    step = n_in / n_out
    for i in range(n_out):
        if area:
            for j in range(n_in):
                weights[i, j] = max(0.0, min((i + 1) * step, j + 1) - max(i * step, j)) / step
        else:
            src = min(max((i + 0.5) * step - 0.5, 0.0), n_in - 1)
            j = int(np.floor(src))
            weights[i, j] += 1 - (src - j)
            weights[i, min(j + 1, n_in - 1)] += src - j
    return weights


def reference_resize(pixels, box, out_hw):
    """Plain numpy version of what image_ops documents: the integer `box` region resampled
    bilinearly, or by area averaging when it shrinks by >= 2x in both directions."""
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0:x1].astype(float)
    area = (y1 - y0) / out_hw[0] >= 2 and (x1 - x0) / out_hw[1] >= 2
    wy = _resample_weights(y1 - y0, out_hw[0], area)
    wx = _resample_weights(x1 - x0, out_hw[1], area)
    return np.einsum("oh,hwc,pw->opc", wy, region, wx)


def assert_resampled(out, pixels, box, out_hw, image):
    """Within rounding (1 / 255) of the plain reference, and close to Pillow's bilinear
    resampling that image_ops used before OpenCV (the documented tolerance)."""
    assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
    assert np.abs(out - reference_resize(pixels, box, out_hw)).max() <= 1.0
    pil = np.asarray(image.resize(out_hw[::-1], Image.Resampling.BILINEAR, box=box), float)
    # Pillow widens its bilinear filter when shrinking: ~3 / 255 apart on these tiny, steep
    # images at 1.7-2x; ~0.3 / 255 (rounding) when enlarging
    assert np.abs(out - pil).mean() < (4.0 if out_hw[0] < box[3] - box[1] else 0.5)


def test_resize_ops_match_a_plain_reference():
    image = smooth_image(40, 30)
    data, pixels = encode(image), np.asarray(image)  # PNG: lossless, no reduced-size decoding
    out = parse_image_pp("decode|resize((16, 24))")(data, np.random.default_rng(0))  # 1-2x: linear
    assert_resampled(out, pixels, (0, 0, 40, 30), (16, 24), image)
    out = parse_image_pp("decode|resize_small(15)")(data, np.random.default_rng(0))  # 2x: area
    assert_resampled(out, pixels, (0, 0, 40, 30), (15, 20), image)
    out = parse_image_pp("decode|resize((45, 70))")(data, np.random.default_rng(0))  # enlarging
    assert_resampled(out, pixels, (0, 0, 40, 30), (45, 70), image)
    # The check can fail: a box shifted by one pixel is far from the reference.
    assert np.abs(out - reference_resize(pixels, (1, 0, 40, 30), (45, 70))).max() > 1.0


def test_random_resized_crop_matches_the_reference_on_the_sampled_box():
    image = smooth_image(50, 40)
    data, pixels = encode(image), np.asarray(image)
    for seed in range(5):
        out = parse_image_pp("decode|random_resized_crop(16, scale=(0.3, 0.6))")(
            data, np.random.default_rng(seed))
        box = sample_crop_box(50, 40, np.random.default_rng(seed), (0.3, 0.6), (3 / 4, 4 / 3))
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 40
        area = (x1 - x0) * (y1 - y0) / (50 * 40)
        assert 0.25 <= area <= 0.65  # scale range, up to rounding of w and h
        assert 3 / 4 - 0.1 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 0.1
        assert_resampled(out, pixels, box, (16, 16), image)


def test_opencv_jpeg_decode_equals_pillow():
    """cv2.imdecode (RGB, EXIF orientation ignored) gives Pillow's pixels, full and reduced size."""
    data = encode(smooth_image(96, 64), "JPEG", quality=90)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(image_ops.to_uint8(image_ops.decode(data, None)), pil)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (48, 32))
    reduced = parse_image_pp("decode|resize((32, 48))")(data, np.random.default_rng(0))
    np.testing.assert_array_equal(reduced, np.asarray(drafted.convert("RGB")))  # 1/2 decode, no resampling
    grey = encode(smooth_image(16, 8, mode="L"), "JPEG")
    np.testing.assert_array_equal(image_ops.to_uint8(image_ops.decode(grey, None)),
                                  np.asarray(Image.open(io.BytesIO(grey)).convert("RGB")))


def test_reduced_size_jpeg_decode_stays_close_to_full_decode():
    image = smooth_image(256, 256)
    data = encode(image, "JPEG", quality=95)
    fast = parse_image_pp("decode|resize(32)")(data, np.random.default_rng(0)).astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BOX)
    assert np.abs(fast - np.asarray(full, float)).mean() < 3.0


def test_fast_jpeg_decode_is_close_to_exact_decode():
    data = encode(smooth_image(96, 64), "JPEG", quality=95)
    exact = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), float)
    out = parse_image_pp("decode(fast=True)|resize((64, 96))")(data, np.random.default_rng(0))
    difference = np.abs(out.astype(float) - exact).mean()
    assert 0 < difference < 8  # differs (so the fast path ran) but only slightly
    exact_path = parse_image_pp("decode|resize((64, 96))")(data, np.random.default_rng(0))
    np.testing.assert_array_equal(exact_path, exact)


def test_decode_converts_modes_to_rgb():
    for mode in ("L", "RGBA", "P"):
        data = encode(smooth_image(12, 8, mode=mode))
        out = parse_image_pp("decode|resize(4)")(data, np.random.default_rng(0))
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8


def test_bad_image_bytes_raise_skip_with_reason():
    pp = parse_image_pp("decode|resize(8)")
    jpeg = encode(smooth_image(64, 64), "JPEG")
    cases = {b"not an image at all": "undecodable_image", jpeg[: len(jpeg) // 2]: "undecodable_image",
             None: "missing_image", b"": "missing_image"}
    for data, reason in cases.items():
        with pytest.raises(SkipRecord) as e:
            pp(data, np.random.default_rng(0))
        assert e.value.reason == reason


@pytest.mark.parametrize("spec", ["resize(8)", "decode|nope", "decode|resize(1, 2)",
                                  "decode|resize(size=x)", "decode|flip_lr(q=1)", "decode|resize"])
def test_bad_op_strings_fail_when_parsed(spec):
    with pytest.raises(ValueError):
        parse_image_pp(spec)


def test_image_pipeline_pickles():
    pp = parse_image_pp("decode|random_resized_crop(8)|flip_lr|value_range")
    data = encode(smooth_image(20, 20))
    again = pickle.loads(pickle.dumps(pp))
    np.testing.assert_array_equal(pp(data, np.random.default_rng(3)), again(data, np.random.default_rng(3)))


def test_encode_fixed_truncates_appends_eos_and_pads():
    tok = ByteTokenizer()
    text = "héllo"
    ids = [b + 3 for b in text.encode("utf-8")]  # 6 bytes: é is two
    np.testing.assert_array_equal(encode_fixed(tok, text, 10), ids + [1] + [PAD_ID] * 3)
    np.testing.assert_array_equal(encode_fixed(tok, text, 4), ids[:3] + [1])
    assert encode_fixed(tok, "", 3).tolist() == [1, 0, 0]


def test_word_tokenizer_lowercases_and_maps_unknown_words():
    tok = WordTokenizer(["red", "circle"], lowercase=True)
    assert tok.encode("Red CIRCLE, blue!") == [3, 4, tok.unk_id]
    assert make_tokenizer("demo").encode("a red circle") == [
        make_tokenizer("demo")._ids[w] for w in ("a", "red", "circle")]


def test_sentencepiece_train_save_load_roundtrip(tmp_path):
    captions = [f"a {c} {s} in the corner" for c in ("red", "green", "blue") for s in ("circle", "square")]
    model = train_sentencepiece(captions * 20, vocab_size=40, lowercase=True)
    path = tmp_path / "tok.model"
    path.write_bytes(model)
    tok = make_tokenizer(str(path), lowercase=True)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.eos_id, tok._sp.pad_id(), tok._sp.unk_id()) == (1, 0, 2)
    tokens = encode_fixed(tok, "A RED Circle in the corner", 32)
    n = int(np.argmax(tokens == tok.eos_id))
    assert tokens[n + 1:].tolist() == [0] * (31 - n) and 0 not in tokens[:n]
    assert tok.decode(tokens) == "a red circle in the corner"
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(encode_fixed(clone, "green square", 8), encode_fixed(tok, "green square", 8))


def test_sentencepiece_model_without_eos_is_rejected():
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 20), model_writer=buffer,
                                   vocab_size=10, eos_id=-1, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="EOS"):
        SentencePieceTokenizer(buffer.getvalue())


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError):
        make_tokenizer(str(tmp_path / "missing.model"))
