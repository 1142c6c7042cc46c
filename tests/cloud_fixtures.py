"""Object-store servers for the tests: a GCS emulator and moto's S3 server, on 127.0.0.1 only.

`gcs_emulator` starts `gcp-storage-emulator` in a subprocess on a free loopback port with an
in-memory store, points `STORAGE_EMULATOR_HOST` at it for the test, and always stops it. One
server per test session (start-up is ~1 s); each test gets a fresh bucket so tests do not see
each other's objects. `s3_emulator` does the same for `s3://` with `moto_server` and
`AWS_ENDPOINT_URL` (dummy keys). Imported by `conftest.py`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

_START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call). Defined here,
    not in conftest, because experiments start these servers without pytest; the tests import
    it from conftest."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the storage emulator exited with status {process.returncode} at start-up")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"the storage emulator did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def _server(command: list[str], port: int):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, _START_TIMEOUT_S)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# gcp-storage-emulator's media downloads lack the `x-goog-generation` header that real GCS
# sends; tensorstore's OCDBT driver (orbax's checkpoint format) reads it before each commit and
# fails with "Malformed StorageGeneration" without it. The server is started with that header added.
_EMULATOR_MAIN = """
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

plain_download = objects.download

def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

objects.download = download
server.HANDLERS = tuple((regex, {m: download if h is plain_download else h for m, h in handlers.items()})
                        for regex, handlers in server.HANDLERS)
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def gcs_emulator_process(bucket: str = "test-bucket"):
    """Yields `host:port` of a running gcp-storage-emulator with `bucket` created."""
    port = free_port()
    command = [sys.executable, "-c", _EMULATOR_MAIN, "start", "--host", "127.0.0.1",
               "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"]
    with _server(command, port) as host:
        yield host


def create_bucket(name: str) -> None:
    """Creates a bucket on the emulator of `STORAGE_EMULATOR_HOST` (JSON API)."""
    import json
    import urllib.request

    url = f"http://{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test"
    request = urllib.request.Request(url, data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=5).close()


_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def gcs_server():
    """One emulator for the whole session (start-up ~1 s), stopped at its end."""
    import gcp_storage_emulator  # noqa: F401  (in the test extra: missing is a broken install, an error)

    with gcs_emulator_process("test-bucket") as host:
        yield host


@pytest.fixture
def gcs_emulator(gcs_server, monkeypatch):
    """`gs://<fresh bucket>` on the module's emulator, with `STORAGE_EMULATOR_HOST` set."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    # Credential look-ups (google-auth, tensorstore) must stay on loopback: no metadata server.
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        monkeypatch.setenv(name, "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    for derived in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.setenv(derived, "")  # set from STORAGE_EMULATOR_HOST, restored afterwards
    bucket = f"bucket-{next(_bucket_counter)}-{uuid.uuid4().hex[:6]}"
    create_bucket(bucket)
    from big_contrast import paths

    paths.configure_emulator()
    yield f"gs://{bucket}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server for the whole session, stopped at its end."""
    import moto.server  # noqa: F401  (in the test extra: missing is a broken install, an error)

    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _server(command, port) as host:
        yield f"http://{host}"


@pytest.fixture
def s3_emulator(s3_server, monkeypatch):
    """`s3://<fresh bucket>` on the session's moto server, with the AWS variables set."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    import boto3

    bucket = f"bucket-{next(_bucket_counter)}-{uuid.uuid4().hex[:6]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
