"""The one path layer: local folders, `gs://` and `s3://` behind `etils.epath`.

    path = paths.parse("gs://bucket/run")          # an epath.Path; local strings stay local
    paths.check_writable("gs://bucket/run")        # fails in seconds, one sentence, if it can't
    files = paths.glob("gs://bucket/shards/*.tar") # sorted URLs

`pathlib.Path("gs://b/x")` is the local folder `gs:/b/x`; that mistake is why every user path
goes through `parse`, which also refuses a malformed URL (`gs:/b/x`, `gs//b`, `gs://`) instead of
making a folder of it. epath is what orbax, grain and TFDS already use; for `gs://` it reads and
writes through gcsfs (fsspec), orbax through tensorstore. Both honour the standard
`STORAGE_EMULATOR_HOST` once `configure_emulator()` has run (every function here calls it), so the
same command works against real GCS and against a local emulator.

The reachability checks exist because a cloud client's own retry loop turns a typo in a bucket
name, or a missing login, into minutes of silence and a 60-line traceback; they bound every step
with a timeout and say which URL failed and what to check.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Callable

from etils import epath

from big_contrast.errors import BigContrastError, MissingFileError

_EPATH_SCHEMES = ("gs", "s3", "az", "hf")  # what etils.epath turns into a cloud path
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]+)(/.*)?$")
# A cloud scheme followed by anything but '://' + bucket: 'gs:/b', 'gs//b', 'gs:b', 's3:///b'.
_MALFORMED_RE = re.compile(r"^(%s)(:/?(?!/)|//|:///)" % "|".join(_EPATH_SCHEMES + ("gcs",)),
                           re.IGNORECASE)
CHECK_TIMEOUT_S = 15.0
GCS_ENDPOINT = "https://storage.googleapis.com"


class StorageError(BigContrastError, ValueError):
    """A user path that is malformed, unreachable or not usable; the message is one sentence."""


def scheme(path) -> str | None:
    """`'gs'` for `gs://b/x`, None for a local path."""
    match = _URL_RE.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return match.group(1).lower() if match else None


def is_remote(path) -> bool:
    return scheme(path) is not None


def validate(path) -> str:
    """The path as a string; raises `StorageError` for a malformed or unsupported URL."""
    text = os.fspath(path)
    if not text:
        raise StorageError("an empty path was given; pass a local folder or a gs:// / s3:// URL")
    if _MALFORMED_RE.match(text):
        raise StorageError(f"{text!r} is a malformed URL; write it as "
                           f"{text.split(':')[0].split('/')[0].lower()}://BUCKET/PATH")
    match = _URL_RE.match(text)
    if "://" in text and not match:
        raise StorageError(f"{text!r} is a malformed URL (no bucket after '://'); "
                           "write it as SCHEME://BUCKET/PATH")
    if match and match.group(1).lower() not in _EPATH_SCHEMES:
        raise StorageError(f"{text!r} uses the unsupported scheme {match.group(1)!r}; use a local "
                           f"path or one of {', '.join(s + '://' for s in _EPATH_SCHEMES)}")
    return text


def parse(path) -> epath.Path:
    """A validated `epath.Path` (local paths exactly as given, not made absolute)."""
    text = validate(path)
    if scheme(text):
        configure_emulator()
    return epath.Path(text)


def join(base, *parts) -> epath.Path:
    return parse(base).joinpath(*parts)


def glob(pattern) -> list[str]:
    """Sorted matches of a path with `*`, `?` or `[...]` in it (local or cloud)."""
    text = validate(pattern)
    root, _, rest = _split_magic(text)
    if not rest:
        return [text] if parse(text).exists() else []
    base = parse(root)
    matches = [os.fspath(p) for p in base.glob(rest)] if base.exists() else []
    return sorted(matches)


def has_magic(path) -> bool:
    return bool(re.search(r"[*?\[]", os.fspath(path)))


def glob_root(pattern) -> str:
    """The folder a glob searches: `'gs://b/d/*/x.tar'` -> `'gs://b/d'` (the path itself if no wildcard)."""
    return _split_magic(os.fspath(pattern))[0]


def _split_magic(text: str) -> tuple[str, str, str]:
    """`'gs://b/d/*.tar'` -> `('gs://b/d', '/', '*.tar')`: the longest prefix without a wildcard."""
    if not has_magic(text):
        return text, "", ""
    head, sep, rest = text, "", ""
    while has_magic(head):
        head, sep, tail = head.rpartition("/")
        rest = tail + ("/" + rest if rest else "")
        if not sep:
            return ".", "/", rest
    return head, sep, rest


def read_bytes(path) -> bytes:
    return parse(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
    """Writes `data` in one piece; the parent folder is created (a no-op on object stores)."""
    target = parse(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


# --------------------------------------------------------------------- emulators / endpoints

def configure_emulator() -> None:
    """Makes every `gs://` client honour `STORAGE_EMULATOR_HOST` (idempotent, cheap).

    gcsfs reads the variable itself; tensorstore (orbax) reads only `TENSORSTORE_GCS_HTTP_URL`,
    so that one is derived from it when unset. Against an emulator nothing needs credentials:
    gcsfs gets `token='anon'` (otherwise it first asks the metadata server, slow off-GCP).
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    # google-cloud-storage (which orbax and tensorboardX use besides tensorstore / gcsfs) takes
    # the variable as the endpoint verbatim, so `host:port` must become `http://host:port`.
    os.environ["STORAGE_EMULATOR_HOST"] = url
    if not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    # gcsfs >= 2025 defaults to a subclass that first asks the bucket's layout over gRPC, which
    # an emulator never answers (a 30 s timeout, retried); the plain JSON-API client is what
    # emulators speak. Read at gcsfs import, so it must be set before the first gs:// access.
    if not os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
    global _configured_endpoint
    if _configured_endpoint not in (None, url):  # a new emulator: drop clients bound to the old one
        _drop_cached_gcs_clients()
    _configured_endpoint = url


_configured_endpoint = None


def _drop_cached_gcs_clients() -> None:
    import sys

    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


def gcs_endpoint() -> str:
    """The GCS endpoint every client uses: the emulator's when `STORAGE_EMULATOR_HOST` is set."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        return host if host.startswith(("http://", "https://")) else f"http://{host}"
    return GCS_ENDPOINT


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


# --------------------------------------------------------------------- reachability checks

def check_readable(url, *, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raises `StorageError` (one sentence) unless `url` exists and can be listed or read."""
    text = validate(url)
    if not scheme(text):
        if not os.path.exists(text):
            raise StorageError(f"{text!r} does not exist; check the path")
        return
    _preflight(text, timeout)

    def probe():
        target = parse(text)
        if not target.exists():
            raise MissingFileError(text)

    _bounded(text, probe, timeout, "read")


def check_writable(url, *, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raises `StorageError` unless a small object can be written and deleted under `url`."""
    text = validate(url)
    if not scheme(text):
        try:
            os.makedirs(text, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the folder {text!r} ({e.strerror}); "
                               "choose a writable location") from None
        if not os.access(text, os.W_OK):
            raise StorageError(f"the folder {text!r} is not writable; check its permissions")
        return
    _preflight(text, timeout)

    def probe():
        target = parse(text).joinpath(f".write-check-{uuid.uuid4().hex}")
        target.write_bytes(b"ok")
        target.unlink()

    _bounded(text, probe, timeout, "write")


def _bucket(text: str) -> str:
    return _URL_RE.match(text).group(2)


def _preflight(text: str, timeout: float) -> None:
    """Credentials found and the endpoint reachable over TCP, before any client retries anything."""
    kind = scheme(text)
    if kind == "gs" and not os.environ.get("STORAGE_EMULATOR_HOST"):
        _check_gcs_credentials(text)
    endpoint = gcs_endpoint() if kind == "gs" else s3_endpoint()
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(timeout, 5.0)).close()
        except OSError as e:
            hint = ("check STORAGE_EMULATOR_HOST or the network" if kind == "gs"
                    else "check AWS_ENDPOINT_URL or the network")
            raise StorageError(f"cannot reach the storage endpoint {endpoint} for {text!r} "
                               f"({e.__class__.__name__}: {e}); {hint}") from None


def _check_gcs_credentials(text: str) -> None:
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        raise StorageError(f"{text!r} needs gcsfs and google-auth, which are not installed; "
                           "run `pip install -e .` in the project") from None

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise StorageError(
            f"no Google Cloud credentials found for {text!r}; run `gcloud auth application-default "
            "login` or set GOOGLE_APPLICATION_CREDENTIALS (on a TPU VM, check its service "
            "account)") from None


def _bounded(text: str, probe: Callable[[], None], timeout: float, action: str) -> None:
    """Runs `probe` in a daemon thread; a timeout or an error becomes one `StorageError`."""
    outcome: dict = {}

    def target():
        try:
            probe()
        except BaseException as e:  # noqa: BLE001 - reported below, in one sentence
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"check-{action}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise StorageError(f"no answer from the storage service for {text!r} within {timeout:.0f} s; "
                           "check the endpoint, the network and the credentials")
    if "error" in outcome:
        raise StorageError(_explain(text, outcome["error"], action)) from None


def _explain(text: str, error: BaseException, action: str) -> str:
    """One sentence for the usual failures: missing bucket, permission, credentials."""
    bucket = _bucket(text)
    message = f"{error.__class__.__name__}: {error}".replace("\n", " ")[:200]
    status = getattr(error, "code", None) or getattr(error, "status", None)
    lowered = message.lower()
    if status == 404 or "nosuchbucket" in lowered or "bucket does not exist" in lowered or (
            isinstance(error, FileNotFoundError) and action == "write"):
        return f"the bucket {bucket!r} of {text!r} does not exist; create it or fix the URL"
    if isinstance(error, FileNotFoundError):
        return f"{text!r} does not exist; check the URL (bucket {bucket!r})"
    if isinstance(error, PermissionError) or status in (401, 403) or "forbidden" in lowered \
            or "accessdenied" in lowered:
        return (f"permission denied to {action} {text!r}; check that your account may {action} "
                f"the bucket {bucket!r}")
    if "credential" in lowered:
        return f"no usable credentials for {text!r} ({message}); log in or set the credentials"
    return f"cannot {action} {text!r} ({message}); check the URL, the network and the credentials"
