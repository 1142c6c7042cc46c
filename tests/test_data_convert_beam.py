"""`data convert` on Apache Beam's DirectRunner: the serial converter's records and skip counts,
one shard per input, resumable, local or in a (emulated) bucket, and the CLI's runner flags."""

import json
import os
import subprocess
import sys

import apache_beam  # noqa: F401  (a dependency: a broken install fails here, never skips)
import pytest

from big_contrast import paths
from big_contrast.data.array_record import ArrayRecordSource
from big_contrast.data.commands import convert
from test_data_convert import good_samples, shards, write_tar  # noqa: F401  (fixture)


def records_of(output_dir):
    source = ArrayRecordSource(output_dir)
    return [source[i] for i in range(len(source))]


def test_direct_runner_equals_the_serial_converter_and_resumes(tmp_path, shards):
    inputs, expected = shards
    serial = convert(inputs, str(tmp_path / "serial"), examples_per_shard=4, progress=False)
    beam = convert(inputs, str(tmp_path / "beam"), runner="DirectRunner", workers=2)
    assert records_of(str(tmp_path / "beam")) == records_of(str(tmp_path / "serial")) == expected
    assert (beam.written, beam.skipped, beam.skipped_by_input) == (
        serial.written, serial.skipped, serial.skipped_by_input)
    assert [os.path.basename(s) for s in beam.shards] == [f"data-{i:05d}-of-00003.array_record" for i in range(3)]
    summary = json.loads((tmp_path / "beam" / "convert_summary.json").read_text())
    assert summary["beam_metrics"]["skipped/empty_caption"] == 2 and summary["beam_metrics_match"]
    assert summary["resumed_shards"] == 0

    # A crash after shard 0 and 2 were published: the re-run converts only shard 1.
    os.remove(tmp_path / "beam" / "data-00001-of-00003.array_record")
    finished = {n: os.stat(tmp_path / "beam" / n).st_mtime_ns for n in ("data-00000-of-00003.array_record",
                                                                       "data-00002-of-00003.array_record")}
    again = convert(inputs, str(tmp_path / "beam"), runner="DirectRunner", workers=1,
                    pipeline_args=["--direct_running_mode=in_memory"])
    summary = json.loads((tmp_path / "beam" / "convert_summary.json").read_text())
    assert summary["resumed_shards"] == 2 and summary["beam_metrics"]["written"] == 4
    assert {n: os.stat(tmp_path / "beam" / n).st_mtime_ns for n in finished} == finished
    assert (again.written, again.skipped) == (serial.written, serial.skipped)
    assert records_of(str(tmp_path / "beam")) == expected

    with pytest.raises(ValueError, match="other inputs"):
        convert(inputs[:2], str(tmp_path / "beam"), runner="DirectRunner")


def test_manifest_rows_are_split_into_shards(tmp_path):
    from test_data_convert import image_bytes

    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
    (tmp_path / "m.csv").write_text("filepath,title\n" + "".join(f"{i}.png,t{i}\n" for i in range(6)))
    beam = convert([str(tmp_path / "m.csv")], str(tmp_path / "out"), examples_per_shard=4,
                   runner="DirectRunner", workers=1, pipeline_args=["--direct_running_mode=in_memory"])
    assert len(beam.shards) == 2 and beam.written == 5 and dict(beam.skipped) == {"missing_image": 1}
    assert [r["captions"] for r in records_of(str(tmp_path / "out"))] == [[f"t{i}"] for i in range(5)]


def test_cli_converts_from_and_to_a_bucket(tmp_path, gcs_emulator):
    members, expected = good_samples(0, 3)
    local = write_tar(tmp_path / "s.tar", members + [("bad/0.txt", b"no image")])
    paths.write_bytes(f"{gcs_emulator}/shards/s-000.tar", open(local, "rb").read())
    paths.write_bytes(f"{gcs_emulator}/shards/s-001.tar", open(write_tar(tmp_path / "t.tar", good_samples(3, 5)[0]), "rb").read())
    out = f"{gcs_emulator}/converted"
    command = [sys.executable, "-m", "big_contrast.cli", "data", "convert", f"{gcs_emulator}/shards/*.tar", out,
               "--workers", "1", "--direct_running_mode=in_memory"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 5 of 6 records to 2 ArrayRecord shard(s)" in result.stdout
    assert paths.glob(f"{out}/*.array_record") == [f"{out}/data-0000{i}-of-00002.array_record" for i in range(2)]
    shard = paths.read_bytes(f"{out}/data-00000-of-00002.array_record")
    (tmp_path / "copy.array_record").write_bytes(shard)
    assert [r["key"] for r in records_of(str(tmp_path / "copy.array_record"))] == [e["key"] for e in expected]
    summary = json.loads(paths.parse(f"{out}/convert_summary.json").read_text())
    assert summary["skipped_by_input"][f"{gcs_emulator}/shards/s-000.tar"] == {"missing_image": 1}
    assert sorted(os.listdir(tmp_path)) == ["copy.array_record", "s.tar", "t.tar"]  # nothing else here


def test_cli_rejects_pipeline_options_for_the_serial_runner(tmp_path, shards, capsys):
    from big_contrast.cli import main

    assert main(["big-contrast", "data", "convert", shards[0][0], str(tmp_path / "o"), "--runner", "serial",
                 "--project=p"]) == 2
    assert "need a Beam runner" in capsys.readouterr().err
    assert main(["big-contrast", "data", "train-tokenizer", "demo", "--vocab_size", "9", "--output", "x",
                 "--bogus=1"]) == 2
    assert "Unknown command line flag 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown Beam runner"):
        convert(shards[0], str(tmp_path / "o"), runner="DataFlowRunner")


def test_cli_fails_in_one_sentence_on_a_missing_bucket_or_malformed_url(tmp_path, shards, gcs_emulator, capsys):
    from big_contrast.cli import main

    for output, words in (("gs://no-such-bucket/out", "bucket 'no-such-bucket'"), ("gs:/bucket/out", "malformed")):
        assert main(["big-contrast", "data", "convert", shards[0][0], output]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar", "c.tar"]  # no local folder made of a URL
