"""One preprocessing: the op string `big-contrast import` writes equals transformers' PIL
image processors pixel for pixel, the resize ops' `method` is parsed and checked, and the op
strings written before the method existed still give the pixels they gave.

The references are transformers' `SiglipImageProcessorPil` / `CLIPImageProcessorPil`, Pillow
and OpenCV called directly; images are odd-sized, encoded as PNG and as JPEG bytes.
"""
import io
import json

import cv2
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from big_contrast.cli import main as cli_main
from big_contrast.data import image_ops
from big_contrast.data.device_ops import device_normalization, host_spec, normalize_on_device
from big_contrast.data.image_ops import parse_image_pp, sample_crop_box
from big_contrast.interop import preprocess
from big_contrast.interop.imported import load_config

SIZES = [(37, 23), (50, 81), (17, 17), (203, 301)]  # (height, width)
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
ATOL = 1e-5  # as tests/test_interop.py's Transform parity (float32 normalisation round-off)


def random_image(height, width, seed=0) -> Image.Image:
    """A smooth random RGB image (JPEG-realistic) of odd size."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.uniform(size=(5, 7, 3)) * 255).astype(np.uint8))
    noise = rng.integers(-20, 21, (height, width, 3))
    smooth = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.int64)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def encode(image, fmt) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def encoded_images():
    for i, (h, w) in enumerate(SIZES):
        image = random_image(h, w, seed=i)
        for fmt in ("PNG", "JPEG"):
            yield f"{h}x{w} {fmt}", encode(image, fmt)


def assert_matches_processor(spec, processor):
    pipeline = parse_image_pp(spec)
    for name, data in encoded_images():
        expected = processor(Image.open(io.BytesIO(data)), return_tensors="np").pixel_values[0]
        got = pipeline(data, np.random.default_rng(0))
        assert got.shape == expected.transpose(1, 2, 0).shape, name
        np.testing.assert_allclose(got, expected.transpose(1, 2, 0), atol=ATOL, err_msg=name)


# ----------------------------------------------------------------------------- import parity


def _hf_directory(tmp_path_factory, family):
    """A tiny random transformers model directory with a non-default image processor."""
    directory = tmp_path_factory.mktemp(f"hf_{family}")
    torch.manual_seed(0)
    text = dict(TINY, vocab_size=64, max_position_embeddings=16)
    vision = dict(TINY, image_size=32, patch_size=8)
    if family == "siglip":
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
        processor = transformers.SiglipImageProcessorPil(size={"height": 24, "width": 40})
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=16))
        processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40},
                                                       crop_size={"height": 32, "width": 28})
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, processor


@pytest.fixture(scope="module", params=["siglip", "clip"])
def imported(request, tmp_path_factory):
    """`big-contrast import` of a tiny HF directory: (its image processor, the workdir's config)."""
    directory, processor = _hf_directory(tmp_path_factory, request.param)
    workdir = tmp_path_factory.mktemp(f"imported_{request.param}") / "W"
    assert cli_main(["big-contrast", "import", str(directory), "--workdir", str(workdir)]) == 0
    return processor, load_config(workdir / "config.py")


def test_the_op_string_an_import_writes_equals_the_hf_image_processor(imported):
    processor, config = imported
    assert 'method="bicubic"' in config.data.pp_eval
    assert config.data.pp_train == config.data.pp_eval
    assert_matches_processor(config.data.pp_eval, processor)


def test_the_imported_op_string_normalised_on_the_device_gives_the_same_pixels(imported):
    _, config = imported
    spec = config.data.pp_eval
    norm = device_normalization(spec)
    assert norm is not None and host_spec(spec, True) != spec
    host_uint8, host_float = parse_image_pp(host_spec(spec, True)), parse_image_pp(spec)
    for name, data in encoded_images():
        on_device = normalize_on_device(host_uint8(data, None)[None], norm)[0]
        np.testing.assert_allclose(np.asarray(on_device), host_float(data, None), atol=ATOL, err_msg=name)


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.LANCZOS,
                                      Image.Resampling.NEAREST])
def test_every_hf_resampling_filter_has_an_equal_op_string(family, resample, tmp_path):
    if family == "siglip":
        processor = transformers.SiglipImageProcessorPil(size={"height": 29, "width": 21}, resample=resample)
    else:
        processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 27}, resample=resample,
                                                       crop_size={"height": 25, "width": 27})
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    settings = preprocess.from_hf_preprocessor(config, family)
    spec = preprocess.pp_string(settings)
    assert f'method="{preprocess.RESIZE_METHOD[settings["resample"]]}"' in spec
    assert_matches_processor(spec, processor)


def test_the_transform_is_its_op_string():
    transform = preprocess.Transform(preprocess.CLIP)
    assert transform.spec == preprocess.pp_string(preprocess.CLIP)
    image = random_image(230, 301)
    np.testing.assert_array_equal(transform(image), parse_image_pp(transform.spec)(image, None))
    assert preprocess.CLIP["mean"] == list(image_ops.CLIP_MEAN)
    assert preprocess.SIGLIP["std"] == list(image_ops.SIGLIP_STD)


# ----------------------------------------------------------------------------- the method argument


def test_the_method_is_parsed_positionally_and_by_keyword():
    by_keyword = parse_image_pp('decode|resize_small(24, method="lanczos")').ops[1]
    assert by_keyword == parse_image_pp('decode|resize_small(24, "lanczos")').ops[1]
    assert by_keyword == ("resize_small", {"size": 24, "method": "lanczos"})
    crop = parse_image_pp("decode|random_resized_crop(16, (0.5, 1.0), (0.75, 1.33), 'bicubic')").ops[1]
    assert crop[1]["method"] == "bicubic"


@pytest.mark.parametrize("spec", ['decode|resize(8, method="bicubik")', "decode|resize_small(8, 'area')",
                                  "decode|random_resized_crop(8, method=3)"])
def test_an_unknown_method_fails_with_one_sentence_when_parsed(spec):
    with pytest.raises(ValueError, match="resize method .* is unknown; use one of bilinear, bicubic") as info:
        parse_image_pp(spec)
    assert "\n" not in str(info.value)


def test_an_unknown_method_fails_when_the_op_is_called_directly():
    with pytest.raises(ValueError, match="resize method 'cubic' is unknown"):
        image_ops.resize(np.zeros((4, 4, 3), np.uint8), None, size=2, method="cubic")


def test_a_pillow_method_after_normalisation_fails_with_a_sentence():
    with pytest.raises(ValueError, match="resamples uint8 pixels; put value_range / normalize after"):
        parse_image_pp('decode|value_range|resize(4, "bicubic")')(np.zeros((8, 8, 3), np.uint8), None)


@pytest.mark.parametrize("method", sorted(image_ops.PIL_METHODS))
def test_pillow_methods_equal_pillow_on_the_decoded_pixels(method):
    image = random_image(50, 81, seed=3)
    data, pil_filter = encode(image, "JPEG"), image_ops.PIL_METHODS[method]
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    got = parse_image_pp(f"decode|resize((13, 30), method={method!r})")(data, None)
    np.testing.assert_array_equal(got, np.asarray(decoded.resize((30, 13), pil_filter)))
    got = parse_image_pp(f"decode|resize_small(32, method={method!r})")(data, None)
    np.testing.assert_array_equal(got, np.asarray(decoded.resize((51, 32), pil_filter)))  # 81*32/50 floored
    got = parse_image_pp(f"decode|random_resized_crop(20, method={method!r})")(data, np.random.default_rng(5))
    box = sample_crop_box(81, 50, np.random.default_rng(5), (0.08, 1.0), (3 / 4, 4 / 3))
    np.testing.assert_array_equal(got, np.asarray(decoded.crop(box).resize((20, 20), pil_filter)))


def test_a_crop_larger_than_the_resize_fails_with_a_sentence():
    with pytest.raises(ValueError, match="crops \\[48, 48\\] out of an image resized to 40"):
        preprocess.Transform(dict(preprocess.CLIP, size=40, crop=[48, 48]))
    with pytest.raises(ValueError, match="resample one of"):
        preprocess.Transform(dict(preprocess.SIGLIP, resample="box"))


# ----------------------------------------------------------------------------- old op strings


def test_op_strings_without_a_method_resample_with_opencv_as_before():
    image = random_image(50, 81, seed=4)
    data, x = encode(image, "PNG"), np.asarray(image)
    for spec, expected in [
            ("decode|resize((100, 120))", cv2.resize(x, (120, 100), interpolation=cv2.INTER_LINEAR)),
            ("decode|resize(20)", cv2.resize(x, (20, 20), interpolation=cv2.INTER_AREA)),
            ("decode|resize_small(32)", cv2.resize(x, (52, 32), interpolation=cv2.INTER_LINEAR))]:  # rounded
        got = parse_image_pp(spec)(data, None)
        np.testing.assert_array_equal(got, expected, err_msg=spec)
        explicit = spec[:-1] + ', method="bilinear")'
        np.testing.assert_array_equal(parse_image_pp(explicit)(data, None), got, err_msg=explicit)


def test_the_default_method_still_decodes_large_jpegs_at_a_reduced_size():
    """301 x 203 -> 24 x 24 decodes at 1/8 scale (38 x 26 pixels), then resizes bilinearly."""
    data = encode(random_image(203, 301, seed=5), "JPEG")
    reduced = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8),
                           cv2.COLOR_BGR2RGB)
    expected = cv2.resize(reduced, (24, 24), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(parse_image_pp("decode|resize(24)")(data, None), expected)
