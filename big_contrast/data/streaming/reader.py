"""Reading one object sequentially as parallel range requests: bounded read-ahead, bounded waits.

    reader = ShardReader(url, store, start=0)   # store: a shared `ObjectStore`
    data = reader.read(n)                       # b"" at the end of the object
    reader.tell(); reader.close()

Why range requests and not one streamed GET: with one connection, one slow response stalls
every example behind it. Here an object is read as `chunk_bytes` pieces, `read_ahead` of them
in flight at once on the store's thread pool, so a slow piece overlaps the others and a
stalled one is abandoned after `timeout_s` and asked again. Memory per open shard is at most
`read_ahead * chunk_bytes`; nothing is written to disk.

Every request goes through the fsspec filesystem that `big_contrast.paths` configures (gcsfs
for `gs://`, s3fs for `s3://`, the local filesystem otherwise), so emulators and credentials
work as everywhere else. Failures: a missing object (404 / FileNotFoundError) is final at once
(`ShardGone`); any other error or a timeout is retried `retries` times with exponential
backoff, then `ShardUnreadable`. Both are turned into counted skips by the stream.
The store counts requests and bytes per process, which is how the tests check that a host
reads only its own shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

from big_contrast import paths


class ShardGone(Exception):
    """The object does not exist (any more)."""


class ShardUnreadable(Exception):
    """The store kept failing or timing out on the object after every retry."""


class ObjectStore:
    """The fsspec filesystem(s) behind the shard URLs, a bounded pool of request threads, the
    retry policy, and counters of requests / bytes / objects read (per process)."""

    def __init__(self, *, max_requests: int = 16, retries: int = 3, timeout_s: float = 30.0,
                 backoff_s: float = 0.5):
        self.retries, self.timeout_s, self.backoff_s = retries, timeout_s, backoff_s
        # Abandoned (timed-out) requests keep a thread until the server answers; the pool is
        # sized above the in-flight budget so that they cannot starve the live ones.
        self._requests = concurrent.futures.ThreadPoolExecutor(max_requests * 2, thread_name_prefix="store-request")
        # Read-ahead tasks wait on their requests, so they get a pool of their own (no deadlock).
        self._fetches = concurrent.futures.ThreadPoolExecutor(max_requests, thread_name_prefix="shard-fetch")
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_read = 0
        self.bytes_by_object: collections.Counter = collections.Counter()
        self._filesystems: dict = {}

    def _fs(self, url: str):
        key = paths.scheme(url) or "file"
        if key not in self._filesystems:
            import fsspec.core

            paths.parse(url)  # validates the URL and points gcsfs at an emulator if one is set
            self._filesystems[key] = fsspec.core.url_to_fs(url)[0]
        return self._filesystems[key]

    def fetch_later(self, url: str, start: int, end: int) -> concurrent.futures.Future:
        """`read_range` on a background thread (the read-ahead of `ShardReader`)."""
        return self._fetches.submit(self.read_range, url, start, end)

    def _call(self, url: str, what: str, fn):
        """`fn()` with a timeout per attempt and backoff between attempts."""
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            future = self._requests.submit(fn)
            try:
                return future.result(timeout=self.timeout_s)
            except FileNotFoundError as e:
                raise ShardGone(f"{url} no longer exists") from e
            except concurrent.futures.TimeoutError:
                error = f"no answer within {self.timeout_s:g} s"
            except Exception as e:  # noqa: BLE001 - a store error of any kind is retried
                if _is_not_found(e):
                    raise ShardGone(f"{url} no longer exists") from e
                error = f"{type(e).__name__}: {e}"
        raise ShardUnreadable(f"{what} of {url} failed {self.retries + 1} times ({error})")

    def size(self, url: str) -> int:
        fs = self._fs(url)
        with self._lock:
            self.requests += 1
        return int(self._call(url, "size", lambda: fs.size(url)))

    def read_range(self, url: str, start: int, end: int) -> bytes:
        fs = self._fs(url)
        with self._lock:
            self.requests += 1
        data = self._call(url, f"bytes {start}-{end}", lambda: fs.cat_file(url, start=start, end=end))
        if len(data) != end - start:
            raise ShardUnreadable(f"{url} returned {len(data)} bytes for range {start}-{end}")
        with self._lock:
            self.bytes_read += len(data)
            self.bytes_by_object[url] += len(data)
        return data

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes_read,
                    "objects": sorted(self.bytes_by_object)}

    def close(self) -> None:
        self._fetches.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)


def _is_not_found(error: BaseException) -> bool:
    status = getattr(error, "code", None) or getattr(error, "status", None)
    return status == 404 or "nosuchkey" in str(error).lower()


class ShardReader:
    """A file-like, forward-only view of one object from byte `start`, read ahead in chunks."""

    def __init__(self, url: str, store: ObjectStore, *, start: int = 0, size: int | None = None,
                 chunk_bytes: int = 4 << 20, read_ahead: int = 2):
        self.url, self._store = url, store
        self.size = store.size(url) if size is None else size
        self._chunk, self._read_ahead = max(int(chunk_bytes), 512), max(int(read_ahead), 1)
        self._position = start  # offset of the first byte not yet returned by read()
        self._next_fetch = start
        self._pending: collections.deque = collections.deque()  # futures of consecutive chunks
        self._buffer, self._buffer_at = b"", start
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._read_ahead and self._next_fetch < self.size:
            end = min(self._next_fetch + self._chunk, self.size)
            self._pending.append(self._store.fetch_later(self.url, self._next_fetch, end))
            self._next_fetch = end

    def tell(self) -> int:
        return self._position

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (fewer only at the end of the object)."""
        out = []
        while n > 0:
            offset = self._position - self._buffer_at
            if offset < len(self._buffer):
                piece = self._buffer[offset:offset + n]
                out.append(piece)
                self._position += len(piece)
                n -= len(piece)
                continue
            if not self._pending:
                break
            self._buffer_at += len(self._buffer)
            self._buffer = self._pending.popleft().result()  # the store bounds each attempt
            self._fill()
        return b"".join(out)

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._buffer = b""
