"""A run whose workdir is a bucket (`gs://`, on the loopback GCS emulator): it trains, survives
kill -9 and resumes from the bucket with the losses of an uninterrupted run, evaluates, and
writes nothing under the current directory; a bad `--workdir` URL is one sentence, found by the
checks before anything is built."""

import json
import os
import signal
import subprocess

import pytest

from big_contrast import cli, paths
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS
from conftest import free_port, rel_err
from test_failures import SMALL_EVALS, messages
from test_train import cli as train_command
from test_train import env, wait_for

STEPS = ["--config.total_steps=6", "--config.checkpoint_every=3"]


def objects(url, prefix=""):
    """Every object under `url`, relative to it (epath refuses `**` on a bucket)."""
    found = []
    for child in paths.parse(url).iterdir():
        name = prefix + child.name
        found += objects(os.fspath(child), name + "/") if child.is_dir() else [name]
    return sorted(found)


@pytest.mark.slow
def test_a_bucket_workdir_trains_resumes_after_kill_9_and_evaluates(gcs_emulator, tmp_path, monkeypatch, capfd):
    workdir, cwd = f"{gcs_emulator}/run", tmp_path / "cwd"
    cwd.mkdir()
    killed = subprocess.Popen(train_command(workdir, *STEPS), env=env(), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: paths.join(workdir, CHECKPOINTS, "3", "commit_success.txt").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert {row["step"] for row in read_metrics(workdir)} >= {1, 2, 3}  # flushed before the checkpoint
    resumed = subprocess.run(train_command(workdir, *STEPS), env=env(), cwd=cwd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.listdir(cwd) == []  # nothing of the run is on the local disk

    stored = objects(workdir)
    assert "config.json" in stored and "metrics.jsonl" in stored
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in stored), stored
    assert {name.split("/")[1] for name in stored if name.startswith("checkpoints/")} >= {"3", "6"}

    # The uninterrupted run, locally and in this process.
    straight = tmp_path / "straight"
    assert cli.main(train_command(straight, *STEPS)[2:]) == 0
    by_step = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    expected, got = by_step(read_metrics(straight)), by_step(read_metrics(workdir))
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step, loss in expected.items():
        assert rel_err(got[step], loss) <= 1e-5, step

    monkeypatch.chdir(cwd)
    config = train_command(workdir)[train_command(workdir).index("--config") + 1].replace(",noeval", "")
    out_json = f"{gcs_emulator}/eval/results.json"
    capfd.readouterr()
    code = cli.main(["big-contrast", "eval", "--workdir", workdir, "--config", config, "--json", out_json,
                     "--config.batch_size=32", "--config.data.sources.demo.size=500", *SMALL_EVALS])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert out.startswith("step 6\n"), out
    assert json.loads(paths.read_bytes(out_json))["step"] == 6
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("case", ["malformed", "missing_bucket", "unreachable"])
def test_a_bad_workdir_url_is_one_sentence_within_seconds(case, gcs_emulator, tmp_path, monkeypatch, capfd):
    workdir, expected = {
        "malformed": ("gs:/bucket/run", "is a malformed URL"),
        "missing_bucket": ("gs://no-such-bucket-here/run", "the bucket 'no-such-bucket-here' of "),
        "unreachable": (f"{gcs_emulator}/run", "cannot reach the storage endpoint"),
    }[case]
    if case == "unreachable":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    # Bounded by the checks, not by a clock: the URL checks run before the model is built, so
    # building it at all means a check was skipped.
    from big_contrast.train import loop

    def build(*args, **kwargs):
        raise AssertionError("the model was built before the workdir URL was checked")

    monkeypatch.setattr(loop, "build", build)
    code = cli.main(train_command(workdir)[2:])
    _, err = capfd.readouterr()
    lines = messages(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("big-contrast train: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_training_reads_array_record_shards_and_a_manifest_from_the_bucket(gcs_emulator, tmp_path):
    """Both sources in one mixture: the shards are copied once into the cache folder; the
    manifest's images are read from the bucket, a missing one is skipped and counted."""
    import ml_collections

    from big_contrast.data import array_record
    from big_contrast.commands import report
    from big_contrast.train import train
    from test_data_pipeline import jpeg, write_array_record
    from test_train import tiny_config

    for shard in range(2):
        local = write_array_record(tmp_path / f"part-{shard}.array_record", range(shard * 20, shard * 20 + 20))
        paths.write_bytes(f"{gcs_emulator}/ar/part-{shard}.array_record", open(local, "rb").read())
    rows = ["filepath,title"] + [f"images/{i}.jpg,a photo number {i}" for i in range(24)]
    for i in range(23):  # images/23.jpg is missing
        paths.write_bytes(f"{gcs_emulator}/data/images/{i}.jpg", jpeg(i))
    paths.write_bytes(f"{gcs_emulator}/data/m.csv", ("\n".join(rows) + "\n").encode())

    cache = tmp_path / "cache"
    config = tiny_config(total_steps=2, checkpoint_every=2)
    config.data.sources = ml_collections.ConfigDict({
        "ar": {"kind": "array_record", "path": f"{gcs_emulator}/ar/*.array_record", "cache_dir": str(cache)},
        "m": {"kind": "manifest", "path": f"{gcs_emulator}/data/m.csv"}})
    last = train(config, f"{gcs_emulator}/run", progress=False)
    assert os.fspath(report.plot_run(f"{gcs_emulator}/run")) == f"{gcs_emulator}/run/plot.png"
    assert paths.read_bytes(f"{gcs_emulator}/run/plot.png").startswith(b"\x89PNG")
    assert last["seen/ar"] > 0 and last["seen/m"] > 0, last
    assert last["skipped/m/missing_image"] == 1, last
    copies = sorted(p.name for p in (cache / "gs").rglob("*.array_record"))
    assert copies == ["part-0.array_record", "part-1.array_record"]
    assert array_record.local_copies([f"{gcs_emulator}/ar/part-0.array_record"], str(cache)) == [
        str(next((cache / "gs").rglob("part-0.array_record")))]  # reused, not copied again


def test_shards_that_do_not_fit_in_the_cache_fail_before_copying(gcs_emulator, tmp_path, monkeypatch):
    import shutil

    from big_contrast.data import array_record

    paths.write_bytes(f"{gcs_emulator}/ar/a.array_record", b"x" * 4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ValueError, match=r"need 0\.0 GiB but the cache folder .* has 0\.0 GiB free"):
        array_record.local_copies([f"{gcs_emulator}/ar/a.array_record"], str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("*.array_record"))


def test_eval_of_a_missing_bucket_is_one_sentence(gcs_emulator, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = cli.main(["big-contrast", "eval", "--workdir", "gs://no-such-bucket-here/run"])
    lines = messages(capfd.readouterr().err)
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_a_sentencepiece_model_in_a_bucket_loads_and_a_tfds_data_dir_there_is_refused(gcs_emulator):
    from big_contrast.data import tfds_source
    from big_contrast.data.tokenizer import make_tokenizer, train_sentencepiece

    model = train_sentencepiece([f"a photo of a {w} number {i}" for i, w in enumerate(["cat", "dog", "bird"] * 20)], 40)
    paths.write_bytes(f"{gcs_emulator}/tok/spm.model", model)
    tokenizer = make_tokenizer(f"{gcs_emulator}/tok/spm.model")
    assert tokenizer.decode(tokenizer.encode("a photo of a dog")) == "a photo of a dog"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_tokenizer(f"{gcs_emulator}/tok/missing.model")
    with pytest.raises(paths.StorageError, match="malformed URL"):
        tfds_source._check_data_dir("gs:/bucket/tfds")
    paths.write_bytes(f"{gcs_emulator}/tfds/x/1.0.0/dataset_info.json", b"{}")
    with pytest.raises(ValueError, match="is in a bucket, which the array_record reader cannot open"):
        tfds_source._check_data_dir(f"{gcs_emulator}/tfds")


def test_an_s3_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch, capfd):
    """orbax 0.12.8 would turn s3://b/run into the local folder ./s3:/b/run."""
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert cli.main(train_command("s3://some-bucket/run")[2:]) == 2
    lines = messages(capfd.readouterr().err)
    assert len(lines) == 1 and "local folders and gs:// only" in lines[0], lines
    assert os.listdir(tmp_path) == []
