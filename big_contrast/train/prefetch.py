"""Batches built ahead, on the devices, by a background thread (big_vision's `prefetch_iterator`).

    with Prefetcher(data, depth=2) as batches:
        batch = next(batches)    # Prefetched(arrays, data_state, skip_counts)

The data iterator's `next` decodes, augments and copies the global batch to the devices; run
on the loop's thread it would wait for the previous step and then make the step wait for it.
Here a thread keeps `depth` batches ready while the devices compute. Each batch carries the
iterator state *after* it was produced (and the skip counts at that point), so a checkpoint
saved after consuming it records where an uninterrupted run continues, not where the
prefetching thread has got to. An error in the thread (a bad source, too many skipped
examples) is raised by the `next` that would have returned the failing batch. `close` stops
the thread, joins it and then closes the data iterator, so no thread outlives the loop.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

from big_contrast.errors import ConfigError


@dataclasses.dataclass
class Prefetched:
    arrays: dict
    data_state: dict  # the iterator's state once this batch was produced
    skip_counts: dict


class Prefetcher:
    _DONE = object()

    def __init__(self, data, *, depth: int = 2, fields=None):
        if depth < 1:
            raise ConfigError(f"prefetch depth={depth} must be >= 1.")
        self._data, self._fields = data, fields
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._data)
                if self._fields is not None:
                    batch = {k: v for k, v in batch.items() if k in self._fields}
                item = Prefetched(batch, self._data.get_state(), dict(self._data.skip_counts()))
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(error)

    def _put(self, item) -> bool:
        """Waits for room in the queue; False once the prefetcher is closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> Prefetched:
        while True:
            try:
                item = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch prefetching thread stopped without a batch or an error")
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops and joins the thread (dropping the batches it built ahead), then closes the data."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._data.close()

    def checkpoint_state(self, local_state):
        """What a checkpoint saves of `local_state` (this process's iterator state): the streaming
        pipeline's state gathered over every process (a collective: each process calls it), so it
        restores on any process count; other pipelines' states are per process, saved as they are."""
        gather = getattr(self._data, "global_state", None)
        return local_state if gather is None else gather(local_state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
