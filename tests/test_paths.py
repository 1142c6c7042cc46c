"""The path layer: URL validation, local paths unchanged, gs:// through the emulator, and
reachability checks that fail within seconds with one sentence."""

import os
import time

import pytest

from big_contrast import paths
from big_contrast.paths import StorageError


@pytest.mark.parametrize("url", ["gs:/bucket/x", "gs//bucket", "gs://", "gs:///x", "s3:/b/x", "gs:bucket",
                                 "ftp://host/x"])
def test_malformed_or_unsupported_urls_are_errors_never_local_folders(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        paths.parse(url)
    assert str(info.value).count(". ") == 0 and repr(url) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_local_paths_are_kept_as_given(tmp_path):
    assert os.fspath(paths.parse("runs/demo")) == "runs/demo"
    assert not paths.is_remote("runs/demo") and paths.scheme("gs://b/x") == "gs"
    assert os.fspath(paths.join(str(tmp_path), "a", "b.txt")) == str(tmp_path / "a" / "b.txt")
    paths.write_bytes(tmp_path / "d" / "x.tar", b"1")
    paths.write_bytes(tmp_path / "d" / "y.tar", b"2")
    (tmp_path / "d" / "z.txt").write_text("3")
    assert paths.glob(f"{tmp_path}/d/*.tar") == [str(tmp_path / "d" / "x.tar"), str(tmp_path / "d" / "y.tar")]
    assert paths.glob(f"{tmp_path}/nothing/*.tar") == []
    assert paths.glob(f"{tmp_path}/*/x.tar") == [str(tmp_path / "d" / "x.tar")]
    assert paths.glob_root("gs://b/d/*/x.tar") == "gs://b/d" and paths.glob_root("gs://b/x") == "gs://b/x"
    assert paths.read_bytes(tmp_path / "d" / "y.tar") == b"2"


def test_configure_emulator_derives_the_tensorstore_endpoint(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "")
    paths.configure_emulator()
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == os.environ["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:4443"
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"


def test_gcs_read_write_glob_and_checks_on_the_emulator(gcs_emulator):
    paths.check_writable(f"{gcs_emulator}/run")
    paths.write_bytes(f"{gcs_emulator}/run/a.tar", b"abc")
    paths.write_bytes(f"{gcs_emulator}/run/b.tar", b"de")
    with paths.join(gcs_emulator, "run", "c.txt").open("w") as f:
        f.write("text")
    assert paths.glob(f"{gcs_emulator}/run/*.tar") == [f"{gcs_emulator}/run/a.tar", f"{gcs_emulator}/run/b.tar"]
    assert paths.read_bytes(f"{gcs_emulator}/run/b.tar") == b"de"
    paths.check_readable(f"{gcs_emulator}/run/a.tar")
    assert paths.glob(f"{gcs_emulator}/run/*.write-check*") == []  # the probe object is removed


def test_s3_read_write_glob_and_checks_on_moto(s3_emulator):
    paths.check_writable(f"{s3_emulator}/run")
    paths.write_bytes(f"{s3_emulator}/run/a.bin", b"abc")
    assert paths.glob(f"{s3_emulator}/run/*.bin") == [f"{s3_emulator}/run/a.bin"]
    assert paths.read_bytes(f"{s3_emulator}/run/a.bin") == b"abc"
    _fails_fast(paths.check_writable, "s3://no-such-bucket-y/run", "does not exist", "no-such-bucket-y")


def _fails_fast(check, url, *words):
    start = time.perf_counter()
    with pytest.raises(StorageError) as info:
        check(url, timeout=5)
    message = str(info.value)
    assert time.perf_counter() - start < 8, message
    assert url in message and "\n" not in message and all(w in message for w in words), message


def test_missing_bucket_and_object_are_named(gcs_emulator):
    _fails_fast(paths.check_writable, "gs://no-such-bucket-x/run", "does not exist", "no-such-bucket-x")
    _fails_fast(paths.check_readable, f"{gcs_emulator}/missing/shard.tar", "does not exist")


def test_unreachable_endpoint_fails_within_seconds(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    _fails_fast(paths.check_writable, "gs://bucket/run", "cannot reach", "STORAGE_EMULATOR_HOST")


def test_missing_credentials_are_reported_before_any_request(monkeypatch, tmp_path):
    pytest.importorskip("google.auth", reason="google-auth comes with gcsfs")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # never ask a metadata server from a test
    _fails_fast(paths.check_readable, "gs://bucket/data", "credentials", "GOOGLE_APPLICATION_CREDENTIALS")


def test_local_checks(tmp_path):
    paths.check_writable(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir()
    with pytest.raises(StorageError, match="does not exist"):
        paths.check_readable(str(tmp_path / "absent"))
