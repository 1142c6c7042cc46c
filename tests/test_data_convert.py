"""`big-contrast data convert` / `train-tokenizer`: tar shards and manifests -> ArrayRecord, the
skip summary, the sentencepiece training command and the `data` command line."""

import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_contrast.data import default_data_config, make_pipeline
from big_contrast.data.array_record import ArrayRecordSource
from big_contrast.data.commands import convert, source_config_from_spec, train_tokenizer
from big_contrast.data.tarshards import iter_tar_samples
from big_contrast.data.tokenizer import make_tokenizer


def image_bytes(i, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6), (10 * i % 256, 40, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_samples(start, stop):
    """img2dataset layout: even keys have .jpg + .txt, odd keys .png + .json (caption field)."""
    members, expected = [], []
    for i in range(start, stop):
        key = f"000/{i:06d}"
        if i % 2 == 0:
            image = image_bytes(i)
            members += [(f"{key}.jpg", image), (f"{key}.txt", f"caption {i}".encode())]
        else:
            image = image_bytes(i, "PNG")
            members += [(f"{key}.png", image), (f"{key}.json", json.dumps({"caption": f"caption {i}", "url": "u"}).encode())]
        expected.append({"key": key, "image": image, "captions": [f"caption {i}"]})
    return members, expected


@pytest.fixture
def shards(tmp_path):
    """Two good shards with one bad sample per reason, and one shard cut inside a member."""
    members_a, expected_a = good_samples(0, 5)
    bad = [("bad/0.txt", b"no image here"),  # missing_image
           ("bad/1.jpg", image_bytes(1)), ("bad/1.txt", b"  \n"),  # empty_caption
           ("bad/2.jpg", image_bytes(2)), ("bad/2.txt", b"\xff\xfe\xfa"),  # non_text_caption
           ("bad/3.jpg", image_bytes(3)), ("bad/3.json", b'{"url": "u"}'),  # empty_caption
           ("bad/4.jpg", b"<html>404</html>"), ("bad/4.txt", b"x")]  # undecodable_image
    members_b, expected_b = good_samples(5, 9)
    a = write_tar(tmp_path / "a.tar", members_a + bad)
    b = write_tar(tmp_path / "b.tar", members_b)
    members_c, expected_c = good_samples(9, 12)
    full = open(write_tar(tmp_path / "full_c.tar", members_c), "rb").read()
    # Cut where the last sample's image data starts (a 512-byte block boundary, so only the
    # tar reader's error reveals it): samples 9 and 10 survive, sample 11 is truncated.
    (tmp_path / "c.tar").write_bytes(full[: full.index(expected_c[2]["image"])])
    os.remove(tmp_path / "full_c.tar")
    return [a, b, str(tmp_path / "c.tar")], expected_a + expected_b + expected_c[:2]


def test_tar_shards_round_trip_through_array_record(tmp_path, shards):
    inputs, expected = shards
    summary = convert(inputs, str(tmp_path / "out"), examples_per_shard=4, progress=True)
    assert summary.written == len(expected) == 11
    assert dict(summary.skipped) == {"missing_image": 1, "empty_caption": 2, "non_text_caption": 1,
                                     "undecodable_image": 1, "truncated_tar_member": 1}
    assert summary.skipped_by_input[inputs[2]] == {"truncated_tar_member": 1}
    assert [os.path.basename(s) for s in summary.shards] == [
        f"data-{i:05d}-of-00003.array_record" for i in range(3)]
    with open(tmp_path / "out" / "convert_summary.json") as f:
        assert json.load(f)["skipped"]["empty_caption"] == 2
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert [source[i] for i in range(len(source))] == expected


def test_a_tar_cut_between_blocks_is_truncated_too(tmp_path):
    members, expected = good_samples(0, 3)
    full = open(write_tar(tmp_path / "full.tar", members), "rb").read()
    (tmp_path / "cut.tar").write_bytes(full[: full.index(expected[2]["image"]) + 10])
    items = list(iter_tar_samples(str(tmp_path / "cut.tar")))
    assert items[:2] == expected[:2]
    assert len(items) == 3 and items[2].reason == "truncated_tar_member"


def test_converted_shards_feed_the_pipeline(tmp_path, shards):
    inputs, expected = shards
    convert(inputs, str(tmp_path / "out"), examples_per_shard=5, progress=False)
    config = default_data_config()
    config.sources = ml_collections.ConfigDict({"web": {"kind": "array_record", "path": str(tmp_path / "out")}})
    config.batch_size, config.tokenizer, config.max_len = 4, "bytes", 16
    config.pp_eval = "decode|resize(6)"
    captions = []
    for batch in make_pipeline(config, train=False):
        assert batch["image"].shape[1:] == (6, 6, 3)
        captions += [bytes(int(t) - 3 for t in row if t > 2).decode()
                     for row, keep in zip(batch["text"], batch["mask"]) if keep]
    assert sorted(captions) == sorted(e["captions"][0] for e in expected)


def test_manifest_conversion_skips_missing_images(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\ttitle\talt\n" + "".join(f"{i}.png\tt{i}\ta{i}\n" for i in range(4)))
    summary = convert([str(manifest)], str(tmp_path / "out"), image_key="path",
                      caption_key="title,alt", progress=False)
    assert summary.written == 3 and dict(summary.skipped) == {"missing_image": 1}
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert [source[i]["captions"] for i in range(3)] == [[f"t{i}", f"a{i}"] for i in range(3)]
    assert source[2]["image"] == image_bytes(2, "PNG")


def test_convert_bad_input(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert([str(tmp_path / "nope-*.tar")], str(tmp_path / "out"), progress=False)
    convert(shards[0][:1], str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="already holds"):
        convert(shards[0][:1], str(tmp_path / "out"), progress=False)
    summary = convert(shards[0][1:2], str(tmp_path / "out"), overwrite=True, progress=False)
    assert len(ArrayRecordSource(str(tmp_path / "out"))) == summary.written == 4


def test_train_tokenizer_from_a_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("filepath,title\n" + "".join(
        f"x.jpg,A {c} {s} on the grass\n" for c in ("red", "green", "blue", "small") for s in ("dog", "cat", "bird")))
    result = train_tokenizer(str(tmp_path / "m.csv"), 50, str(tmp_path / "tok.model"))
    tok = make_tokenizer(result["path"], lowercase=True)
    assert tok.vocab_size == result["vocab_size"] <= 50 and result["records"] == 12
    assert tok.decode(tok.encode("A GREEN cat on the grass")) == "a green cat on the grass"
    # The tokenizer lowercases before encoding, as in training: capitals map to known pieces.
    assert tok.unk_id not in tok.encode("RED DOG")


def test_source_specs():
    assert source_config_from_spec("demo:eval") == {"kind": "demo", "split": "eval"}
    assert source_config_from_spec("tfds:coco_captions", data_dir="/d", caption_key="captions/text") == {
        "kind": "tfds", "name": "coco_captions", "split": "train", "data_dir": "/d", "caption_key": "captions/text"}
    assert source_config_from_spec("m.jsonl")["kind"] == "manifest"
    assert source_config_from_spec("out/")["kind"] == "array_record"
    with pytest.raises(ValueError, match="convert it first"):
        source_config_from_spec("shard-000.tar")


def test_cli_runs_both_data_commands(tmp_path, shards, capsys):
    from big_contrast.cli import main

    assert main(["big-contrast", "data", "convert", *shards[0], str(tmp_path / "out"),
                 "--examples_per_shard", "100", "--runner", "serial"]) == 0
    assert len(ArrayRecordSource(str(tmp_path / "out"))) == 11
    assert main(["big-contrast", "data", "train-tokenizer", str(tmp_path / "out"), "--vocab_size", "30",
                 "--output", str(tmp_path / "tok" / "t.model")]) == 0
    tok = make_tokenizer(str(tmp_path / "tok" / "t.model"))
    assert np.all(np.asarray(tok.encode("caption 7")) > 2)
    capsys.readouterr()
    assert main(["big-contrast", "data", "train-tokenizer", "demo"]) == 2
    assert capsys.readouterr().err.strip() == "big-contrast data train-tokenizer: --vocab_size is required."


def test_cli_converts_to_streamable_tar_shards_that_train_reads_in_order(tmp_path, shards, capsys):
    """`data convert --format tar`: the same records and skip counts as the ArrayRecord path,
    as tar shards that the streaming pipeline (kind='stream') reads, each record once per epoch."""
    from big_contrast.cli import main

    inputs, expected = shards
    out = str(tmp_path / "tars")
    assert main(["big-contrast", "data", "convert", *inputs, out, "--format", "tar", "--examples_per_shard", "4"]) == 0
    assert "truncated_tar_member" in capsys.readouterr().out  # the summary names the skipped reasons
    written = sorted(os.listdir(out))
    assert written == [f"data-{i:05d}-of-00003.tar" for i in range(3)]
    records = [s for name in written for s in iter_tar_samples(os.path.join(out, name))]
    assert [(r["image"], r["captions"]) for r in records] == [(e["image"], e["captions"]) for e in expected]

    config = default_data_config()
    config.sources = ml_collections.ConfigDict({"web": {"kind": "stream", "path": out}})
    config.batch_size, config.tokenizer, config.max_len = 11, "bytes", 16
    config.pp_train = "decode|resize(6)"
    config.streaming.num_streams, config.streaming.shuffle_buffer = 1, 0
    data = make_pipeline(config, process_index=0, process_count=1)
    batch = next(data)
    data.close()
    captions = [bytes(int(t) - 3 for t in row if t > 2).decode() for row in batch["text"]]
    assert sorted(captions) == sorted(e["captions"][0] for e in expected)

    assert main(["big-contrast", "data", "convert", *inputs, out, "--format", "tar"]) == 2  # not empty
    assert "already holds 3 data-*.tar" in capsys.readouterr().err
    assert main(["big-contrast", "data", "convert", *inputs[:1], out, "--format", "tar", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["data-00000-of-00001.tar"]
    assert main(["big-contrast", "data", "convert", *inputs, out, "--format", "tar", "--runner", "DirectRunner"]) == 2
    assert "--format tar writes the shards in this process" in capsys.readouterr().err
