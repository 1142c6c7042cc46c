"""The path layer: URL validation, local paths unchanged, gs:// through the emulator, and
reachability checks that fail with one sentence, bounded by the connections they make and by
their own timeout (never by a wall-clock assertion, which flakes on a loaded machine)."""

import os
import socket

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
    _fails_with(paths.check_writable, "s3://no-such-bucket-y/run", "does not exist", "no-such-bucket-y")


def _fails_with(check, url, *words, timeout=5):
    """The check's StorageError, one sentence with `words`. Every step of a check is bounded
    (a TCP connect of at most 5 s, then the probe by `timeout`), so a check that hung would end
    in its 'no answer ... within' sentence instead; `words` say which failure was found."""
    with pytest.raises(StorageError) as info:
        check(url, timeout=timeout)
    message = str(info.value)
    assert url in message and "\n" not in message and all(w in message for w in words), message
    return message


@pytest.fixture
def connections(monkeypatch):
    """The (host, port) of every TCP connection attempted while the test runs (the preflight's
    and any client's: all go through socket.connect)."""
    attempts, connect = [], socket.socket.connect

    def counted(sock, address):
        attempts.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    return attempts


def test_missing_bucket_and_object_are_named(gcs_emulator):
    _fails_with(paths.check_writable, "gs://no-such-bucket-x/run", "does not exist", "no-such-bucket-x")
    _fails_with(paths.check_readable, f"{gcs_emulator}/missing/shard.tar", "does not exist")


def test_unreachable_endpoint_fails_within_seconds(monkeypatch, connections):
    """One refused TCP connect and no client retries: the preflight stops the check."""
    from conftest import free_port

    port = free_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")  # nothing listens
    _fails_with(paths.check_writable, "gs://bucket/run", "cannot reach", "STORAGE_EMULATOR_HOST")
    assert [a for a in connections if a[1] == port] == [("127.0.0.1", port)], connections


def test_a_silent_endpoint_is_reported_when_the_check_times_out(monkeypatch):
    """A server that accepts connections and never answers: the check's own timeout must fire."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{silent.getsockname()[1]}")
        for derived in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
            monkeypatch.setenv(derived, "")
        paths.configure_emulator()  # clients bound to another emulator are dropped
        _fails_with(paths.check_readable, "gs://bucket/data", "no answer", "within 1 s", timeout=1)


def test_missing_credentials_are_reported_before_any_request(monkeypatch, tmp_path, connections):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # never ask a metadata server from a test
    _fails_with(paths.check_readable, "gs://bucket/data", "credentials", "GOOGLE_APPLICATION_CREDENTIALS")
    assert connections == []


def test_local_checks(tmp_path):
    paths.check_writable(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir()
    with pytest.raises(StorageError, match="does not exist"):
        paths.check_readable(str(tmp_path / "absent"))
