"""One virtual stream: a deterministic, resumable sequence of raw examples over its shards.

A streaming pipeline has a fixed number S of virtual streams (`data.streaming.num_streams`),
whatever the number of hosts. Stream s is a pure function of (seed, s, the data):

  * epoch e of source k: the source's shards in the order `permutation(seed, k, e)`; stream s
    takes every S-th of them from position s, so in each epoch the streams of a source
    together read every shard of it exactly once and no two streams share a shard;
  * `interleave` shards of a source are open at once; each record is drawn from one of them
    at random (the stream's generator), so consecutive records rarely share a shard;
  * a mixture draws the source of each record by weight (same generator);
  * a shuffle buffer of `shuffle_buffer` records: each emitted record is drawn uniformly
    from the buffer and replaced by the next one read.

The state is small and JSON: the generator's state, per source the epoch, the position in
its shard list and each open shard's byte offset, and the buffer as references
`[source, shard, start byte, end byte]`. Restoring reopens the shards at their offsets and
fetches the buffered records again with one range request each, so the resumed stream emits
exactly what the uninterrupted one would have (on data whose reads succeed: a record that was
skipped because the store failed transiently may be read on the other run).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from big_contrast.data.errors import SkipRecord
from big_contrast.data.pipeline import derive_seed
from big_contrast.data.streaming.reader import ObjectStore, ShardGone, ShardReader, ShardUnreadable
from big_contrast.data.streaming.tar import Sample, iter_samples, sample_from_bytes
from big_contrast.data.tarshards import IMAGE_EXTENSIONS, _caption_from_files
from big_contrast.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    num_streams: int = 8
    shuffle_buffer: int = 256
    interleave: int = 4
    read_ahead: int = 2
    chunk_bytes: int = 4 << 20


@dataclasses.dataclass
class StreamSource:
    """A source as the streams see it: its shard URLs, and how to read a caption."""
    name: str
    shards: list
    weight: float = 1.0
    json_caption_key: str = "caption"


class StreamExhausted(ConfigError):
    """A whole epoch of a stream's shards gave no usable record."""


class _OpenShard:
    """One shard being read: its id, the byte offset after the last record taken from it, and
    (once read) the reader and parser positioned there."""

    def __init__(self, shard_id: int, offset: int = 0):
        self.shard_id, self.offset = shard_id, offset
        self._samples = None
        self._reader = None

    def next(self, source: StreamSource, store: ObjectStore, options: StreamOptions):
        """The next `Sample` or `SkipRecord`; None at the shard's end (the shard is then closed)."""
        url = source.shards[self.shard_id]
        try:
            if self._samples is None:
                self._reader = ShardReader(url, store, start=self.offset, chunk_bytes=options.chunk_bytes,
                                           read_ahead=options.read_ahead)
                self._samples = iter_samples(self._reader, url)
            item = next(self._samples, None)
        except ShardGone as e:
            item, self._samples = SkipRecord("missing_shard", str(e)), iter(())
        except ShardUnreadable as e:
            item, self._samples = SkipRecord("unreadable_shard", str(e)), iter(())
        if isinstance(item, Sample):
            self.offset = item.end
        elif isinstance(item, SkipRecord):
            self._samples = iter(())  # a bad rest of a shard is one skip; the shard is done
        else:
            self.close()
        return item

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._samples = None


class _SourceCursor:
    """Where stream s stands in one source: epoch, next position in its shard list, open shards."""

    def __init__(self, k: int, source: StreamSource, stream: int, seed: int, options: StreamOptions):
        self.k, self.source, self.stream, self.seed, self.options = k, source, stream, seed, options
        self.epoch, self.position, self.good_in_epoch = 0, 0, 0
        self.open: list[_OpenShard] = []
        self.last_skip = None  # the latest shard-level skip, for the error of a stream that gets none

    def shard_ids(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng(derive_seed(self.seed, 11, self.k, epoch)).permutation(len(self.source.shards))
        return order[self.stream::self.options.num_streams]

    def next_with_shard(self, rng: np.random.Generator, store: ObjectStore):
        """`(shard id, Sample or SkipRecord)` of the next record, moving to the next epoch as needed."""
        while True:
            mine = self.shard_ids(self.epoch)
            while len(self.open) < self.options.interleave and self.position < len(mine):
                self.open.append(_OpenShard(int(mine[self.position])))
                self.position += 1
            if not self.open:
                if not self.good_in_epoch:
                    raise StreamExhausted(
                        f"no shard of data source {self.source.name!r} read by stream {self.stream} gave a "
                        f"usable record in epoch {self.epoch} ({len(mine)} shards; last: {self.last_skip}), so "
                        "that stream cannot fill its rows of the batch; check that the shards exist, the store "
                        "answers, and they are webdataset tars with an image and a caption per sample")
                self.epoch, self.position, self.good_in_epoch = self.epoch + 1, 0, 0
                continue
            j = int(rng.integers(len(self.open)))
            shard = self.open[j]
            item = shard.next(self.source, store, self.options)
            if item is None or isinstance(item, SkipRecord):
                self.open.pop(j)  # done: a bad rest of a shard is one skip, not one per record
            if item is None:
                continue
            if isinstance(item, Sample):
                self.good_in_epoch += 1
            else:
                self.last_skip = str(item)
            return shard.shard_id, item

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "good_in_epoch": self.good_in_epoch,
                "open": [[s.shard_id, s.offset] for s in self.open]}

    def set_state(self, state: dict) -> None:
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.good_in_epoch = int(state["good_in_epoch"])
        self.open = [_OpenShard(int(i), int(offset)) for i, offset in state["open"]]

    def close(self) -> None:
        for shard in self.open:
            shard.close()


class VirtualStream:
    """Stream `index` of `options.num_streams` over `sources` (a mixture when several).

    `next()` -> `(source index, raw example dict or SkipRecord, example number)`; the example
    number keys the augmentation randomness, so it is the same on every host layout.
    """

    def __init__(self, index: int, sources: list[StreamSource], store: ObjectStore, *, seed: int,
                 options: StreamOptions):
        self.index, self.sources, self.store, self.options = index, sources, store, options
        self.seed = seed
        self.cursors = [_SourceCursor(k, s, index, seed, options) for k, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], np.float64)
        self._cumulative = np.cumsum(weights / weights.sum())
        self.rng = np.random.default_rng(derive_seed(seed, 12, index))
        self.buffer: list = []  # [ref, raw | SkipRecord]; ref = [source, shard, start, end]
        self.emitted = 0

    def next(self):
        while len(self.buffer) < max(self.options.shuffle_buffer, 1):
            k, _, item = self._read_raw()
            if isinstance(item, SkipRecord):
                return self._emit(k, item)
            self.buffer.append(item)
        j = int(self.rng.integers(len(self.buffer)))
        entry = self.buffer[j]
        self.buffer[j] = self.buffer[-1]
        self.buffer.pop()
        return self._emit(entry[0][0], entry[1])

    def _read_raw(self):
        """(source, shard id, [ref, raw] or SkipRecord) of the next record read."""
        k = 0 if len(self.sources) == 1 else min(
            int(np.searchsorted(self._cumulative, self.rng.random(), "right")), len(self.sources) - 1)
        cursor = self.cursors[k]
        shard, item = cursor.next_with_shard(self.rng, self.store)
        if isinstance(item, SkipRecord):
            return k, shard, item
        return k, shard, [[k, shard, item.start, item.end], self._to_record(k, item)]

    def _to_record(self, k: int, sample: Sample):
        """The raw example of a sample (as `tarshards.sample_to_record`, without its image header
        check: the decode stage already counts an undecodable image, so checking here costs CPU twice)."""
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.files), None)
        if image_ext is None:
            return SkipRecord("missing_image", f"sample {sample.key!r} has no image member")
        try:
            captions = _caption_from_files(sample.files, self.sources[k].json_caption_key)
        except SkipRecord as e:
            return e
        return {"image": sample.files[image_ext], "captions": captions, "key": sample.key}

    def _emit(self, k: int, item):
        number = self.emitted
        self.emitted += 1
        return k, item, number

    def get_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "emitted": self.emitted,
                "sources": [c.get_state() for c in self.cursors],
                "buffer": [entry[0] for entry in self.buffer]}

    def set_state(self, state: dict) -> None:
        if len(state["sources"]) != len(self.cursors):
            raise ConfigError(f"a streaming state of {len(state['sources'])} sources cannot be restored into a "
                              f"pipeline of {len(self.cursors)}; resume with the config the run was saved with")
        self.rng.bit_generator.state = state["rng"]
        self.emitted = int(state["emitted"])
        for cursor, sub in zip(self.cursors, state["sources"]):
            cursor.set_state(sub)
        refs = [list(map(int, ref)) for ref in state["buffer"]]
        futures = [self.store.fetch_later(self.sources[k].shards[shard], start, end)
                   for k, shard, start, end in refs]
        self.buffer = [[ref, self._refetched(ref, future)] for ref, future in zip(refs, futures)]

    def _refetched(self, ref, future):
        k, shard, start, _ = ref
        url = self.sources[k].shards[shard]
        try:
            sample = sample_from_bytes(future.result(), start, url)
        except ShardGone as e:
            return SkipRecord("missing_shard", str(e))
        except ShardUnreadable as e:
            return SkipRecord("unreadable_shard", str(e))
        return sample if isinstance(sample, SkipRecord) else self._to_record(k, sample)

    def close(self) -> None:
        for cursor in self.cursors:
            cursor.close()
        self.buffer = []
