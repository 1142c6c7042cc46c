"""The streaming pipeline: virtual streams -> per-process batches, the same on any host count.

    it = make_streaming_iterator(config.data, sharding, ...)   # what make_pipeline returns for
    batch = next(it)                                          # sources of kind='stream'
    state = it.get_state()                 # this process's streams (JSON)
    state = it.global_state(state)         # every process's streams (a collective; at checkpoints)
    it.set_state(state)                    # on any process count that divides num_streams

The global batch of B examples is S = `streaming.num_streams` runs of B / S consecutive
examples, run s coming from virtual stream s (`stream.py`). Process p of P owns streams
p*S/P ... (p+1)*S/P - 1, i.e. exactly its B / P rows of the global batch, so it reads only
those streams' shards, and the global batch does not depend on P. A layout where P does not
divide S, or S does not divide B, is refused with a sentence.

Within a process, its streams advance in parallel on a thread pool (each stream by one thread
at a time, so its sequence stays deterministic) and decoding + augmentation run on a second
pool of `data.num_threads` threads; the augmentation generator of each example is seeded by
(seed, stream, example number), so it does not depend on which thread or host ran it. Skipped
records are counted per source and reason into the same `_seen` / `_skipped` arrays as the
random-access pipeline, so `SkipCounter` (and `max_skip_fraction`) works unchanged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from big_contrast import paths
from big_contrast.data.batching import stack_examples
from big_contrast.data.device_ops import host_spec
from big_contrast.data.errors import REASON_INDEX, SKIP_REASONS, SkipCounter, SkipRecord
from big_contrast.data.preprocess import ProcessExample
from big_contrast.data.streaming.reader import ObjectStore
from big_contrast.data.pipeline import derive_seed
from big_contrast.data.streaming.stream import StreamOptions, StreamSource, VirtualStream
from big_contrast.data.tokenizer import make_tokenizer
from big_contrast.errors import ConfigError, MissingFileError

STREAM_KIND = "stream"
STORE_FIELDS = ("max_requests", "retries", "timeout_s", "backoff_s")
STREAMING_DEFAULTS = {
    "num_streams": 8,  # fixed for a run: the batches depend on it, not on the host count
    "shuffle_buffer": 256,  # records per stream held for shuffling
    "interleave": 4,  # shards per source and stream read at once
    "read_ahead": 2,  # chunks in flight per open shard
    "chunk_bytes": 4 << 20,  # bytes per range request
    "max_requests": 16,  # concurrent store requests per process
    "retries": 3,  # per request, with exponential backoff from backoff_s
    "timeout_s": 30.0,  # per request attempt
    "backoff_s": 0.5,
}


def is_streaming(config) -> bool:
    """Whether the data section's sources stream (all kind='stream'); a mix of kinds is refused."""
    kinds = [source.get("kind") for source in config.sources.values()]
    if STREAM_KIND not in kinds:
        return False
    if any(kind != STREAM_KIND for kind in kinds):
        raise ConfigError(
            f"config.data.sources mixes kind='stream' with {sorted(set(kinds) - {STREAM_KIND})}; a mixture "
            "streams only when every source is kind='stream' (write the others as tar shards)")
    return True


def streaming_settings(config) -> dict:
    """`config.streaming` over the defaults; unknown or non-positive values fail with a sentence."""
    given = dict(config.get("streaming") or {})
    unknown = sorted(set(given) - set(STREAMING_DEFAULTS))
    if unknown:
        raise ConfigError(f"config.data.streaming has unknown field(s) {unknown}; its fields are "
                          f"{sorted(STREAMING_DEFAULTS)}")
    settings = {**STREAMING_DEFAULTS, **given}
    for key, value in settings.items():
        minimum = 0 if key in ("shuffle_buffer", "retries") else 1e-9
        if not isinstance(value, (int, float)) or value < minimum:
            raise ConfigError(f"config.data.streaming.{key}={value!r} must be a number >= {minimum:g}")
    return settings


def resolve_shards(name: str, path) -> list[str]:
    """A tar file, a folder of *.tar, a glob, or a list of those -> the sorted shard URLs."""
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
    if not patterns:
        raise ConfigError(f"data source {name!r} (kind='stream') needs 'path': tar shards, a folder or a glob")
    shards = []
    for pattern in map(paths.validate, patterns):
        if paths.is_remote(pattern):
            paths.check_readable(paths.glob_root(pattern))
        if not paths.has_magic(pattern) and paths.parse(pattern).is_dir():
            pattern = pattern.rstrip("/") + "/*.tar"
        found = paths.glob(pattern) if paths.has_magic(pattern) else [pattern]
        if not found or not all(f.endswith(".tar") for f in found):
            raise MissingFileError(
                f"data source {name!r}: {pattern!r} matches no uncompressed webdataset .tar shard; point "
                "'path' at img2dataset's output (or `big-contrast data convert --format tar`)")
        shards.extend(found)
    return sorted(set(shards))


def stream_sources(config, num_streams: int) -> list[StreamSource]:
    sources = []
    for name, source in config.sources.items():
        extra = sorted(set(source) - {"kind", "path", "weight", "json_caption_key"})
        if extra:
            raise ConfigError(f"data source {name!r} (kind='stream') has unknown field(s) {extra}; its fields "
                              "are ['json_caption_key', 'path', 'weight']")
        shards = resolve_shards(name, source.get("path"))
        if len(shards) < num_streams:
            raise ConfigError(
                f"data source {name!r} has {len(shards)} shards, fewer than data.streaming.num_streams="
                f"{num_streams}; every stream needs a shard, so lower num_streams or split the shards")
        sources.append(StreamSource(name, shards, float(source.get("weight", 1.0)),
                                    source.get("json_caption_key", "caption")))
    return sources


def owned_streams(num_streams: int, process_index: int, process_count: int, global_batch: int) -> range:
    """The streams process `process_index` reads; refuses layouts that cannot be host-independent."""
    if num_streams % process_count:
        raise ConfigError(
            f"data.streaming.num_streams={num_streams} does not divide over {process_count} processes; the "
            "batches are the same on every host count only when it does (choose a multiple of every host "
            "count you will use, e.g. 256)")
    if global_batch % num_streams:
        raise ConfigError(f"global batch size {global_batch} is not a multiple of data.streaming.num_streams="
                          f"{num_streams}; each stream gives B / num_streams rows")
    per = num_streams // process_count
    return range(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass
class _Counts:
    seen: np.ndarray
    skipped: np.ndarray


class StreamingBatches:
    """This process's batches: for each owned stream, B / S processed examples, in stream order.

    Iterable with `get_state` / `set_state` / `close`, the interface `DataIterator` wraps."""

    def __init__(self, config, *, global_batch: int, process_index: int, process_count: int, seed: int):
        settings = streaming_settings(config)
        self.num_streams = int(settings["num_streams"])
        self.streams_owned = owned_streams(self.num_streams, process_index, process_count, global_batch)
        self.rows_per_stream = global_batch // self.num_streams
        self.sources = stream_sources(config, self.num_streams)
        self.names = tuple(s.name for s in self.sources)
        self.seed = int(seed)
        options = StreamOptions(**{f.name: int(settings[f.name]) for f in dataclasses.fields(StreamOptions)})
        self.store = ObjectStore(**{k: settings[k] for k in STORE_FIELDS})
        self.streams = [VirtualStream(s, self.sources, self.store, seed=self.seed, options=options)
                        for s in self.streams_owned]
        # Each stream's cumulative counts travel with its state, so that a process restored on
        # another layout counts on from what its streams had seen (not from zero).
        self.stream_counts = {s.index: SkipCounter(self.names, None) for s in self.streams}
        pp = host_spec(config.pp_train, config.get("device_normalize", False))
        self.processor = ProcessExample(pp, make_tokenizer(config.tokenizer, config.lowercase),
                                        config.max_len, tuple(config.label_keys))
        self.max_skip_fraction, self.min_seen = config.max_skip_fraction, config.min_seen
        self._stream_pool = concurrent.futures.ThreadPoolExecutor(len(self.streams), thread_name_prefix="stream")
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(max(config.num_threads, 1),
                                                                  thread_name_prefix="decode")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = list(self._stream_pool.map(self._take, self.streams))
        for stream, (_, counts) in zip(self.streams, parts):
            self.stream_counts[stream.index].add(counts.seen, counts.skipped)
        examples = [ex for good, _ in parts for ex in good]
        batch = stack_examples(examples)
        batch["_seen"] = sum(counts.seen for _, counts in parts)
        batch["_skipped"] = sum(counts.skipped for _, counts in parts)
        return batch

    def _process(self, stream: int, k: int, raw: dict, number: int) -> dict:
        rng = np.random.default_rng(derive_seed(self.seed, 13, stream, number))
        return self.processor.random_map({**raw, "_source": k}, rng)

    def _take(self, stream: VirtualStream):
        """`rows_per_stream` good examples of `stream`, and the counts of every record consumed."""
        counts = _Counts(np.zeros(len(self.names), np.int64), np.zeros((len(self.names), len(SKIP_REASONS)), np.int64))
        guard = SkipCounter(self.names, self.max_skip_fraction, self.min_seen)
        good = []
        while len(good) < self.rows_per_stream:
            futures = []
            for _ in range(self.rows_per_stream - len(good)):
                k, item, number = stream.next()
                counts.seen[k] += 1
                if isinstance(item, SkipRecord):
                    counts.skipped[k, REASON_INDEX[item.reason]] += 1
                else:
                    futures.append(self._decode_pool.submit(self._process, stream.index, k, item, number))
            for future in futures:
                out = future.result()
                if "_skip" in out:
                    counts.skipped[out["_source"], out["_skip"]] += 1
                else:
                    good.append(out)
            if counts.seen.sum() > 2 * self.rows_per_stream + self.min_seen:  # never search forever
                guard.seen, guard.skipped = counts.seen, counts.skipped
                guard.check()
        return good, counts

    def get_state(self) -> dict:
        return {"kind": "streaming", "num_streams": self.num_streams, "seed": self.seed,
                "sources": list(self.names),
                "streams": {str(s.index): {**s.get_state(), "counts": self.stream_counts[s.index].get_state()}
                            for s in self.streams}}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "streaming":
            raise ConfigError("this data state was saved by the random-access pipeline; a streaming config "
                              "cannot resume from it (start a new run, or resume with the saved config)")
        if state["num_streams"] != self.num_streams or list(state["sources"]) != list(self.names):
            raise ConfigError(
                f"the data state has num_streams={state['num_streams']} over sources {state['sources']}, this "
                f"config {self.num_streams} over {list(self.names)}; resume with the config the run was saved with")
        missing = [s.index for s in self.streams if str(s.index) not in state["streams"]]
        if missing:
            raise ConfigError(
                f"the data state holds streams {sorted(map(int, state['streams']))} but this process reads "
                f"{missing[:4]}...; save the state of every process (`global_state`) to resume on another layout")
        for stream in self.streams:
            saved = state["streams"][str(stream.index)]
            stream.set_state(saved)
            counts = self.stream_counts[stream.index] = SkipCounter(self.names, None)
            if "counts" in saved:  # absent in states saved before the counts moved here
                counts.set_state(saved["counts"])

    def owned_counts(self) -> dict:
        """The cumulative counts of this process's streams, as a `SkipCounter` state."""
        seen = sum(c.seen for c in self.stream_counts.values())
        skipped = sum(c.skipped for c in self.stream_counts.values())
        return {"seen": seen.tolist(), "skipped": skipped.tolist()}

    def read_stats(self) -> dict:
        """Requests, bytes and objects this process has read (what the disjoint-reads test counts)."""
        return self.store.stats()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def merge_states(states: list[dict]) -> dict:
    """One state holding every process's streams (the processes' iterator states, in any order).

    The per-process skip counts kept are the first one's (as a single-host checkpoint does); each
    stream's own counts are in its entry, and a process restored on another layout sums those of
    the streams it reads."""
    merged = dict(states[0])
    batches = dict(merged["grain"])
    batches["streams"] = {}
    for state in states:
        batches["streams"].update(state["grain"]["streams"])
    merged["grain"] = batches
    return merged


def gather_states(local_state: dict) -> dict:
    """`merge_states` over every jax process (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return local_state
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    states = [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths)]
    return merge_states(states)


def make_streaming_iterator(config, sharding, *, train: bool, per_process_batch: int, process_index: int,
                            process_count: int, seed: int | None, start_batch: int):
    """What `make_pipeline` returns for kind='stream' sources (its arguments, already checked)."""
    from big_contrast.data.config import check_data_config
    from big_contrast.data.pipeline import DataIterator

    if not train:
        raise NotImplementedError(
            "evaluation reads random-access sources (it needs one exact pass, padded); evaluate on a "
            "kind='array_record' / 'manifest' / 'tfds' source, or convert the shards with `big-contrast data convert`")
    if start_batch:
        raise ConfigError(
            f"a streaming pipeline cannot start at batch {start_batch} without its saved state (skipping ahead "
            "would read every earlier shard); restore the checkpoint's data state with set_state, on any "
            "process count that divides data.streaming.num_streams")
    check_data_config(config)

    class StreamingDataIterator(DataIterator):
        """`DataIterator` whose state restores on another process count; its skip counts (per
        process) then restart from the saved counts of the streams this process now reads."""

        def get_state(self) -> dict:
            return {**super().get_state(), "process_count": process_count}

        def set_state(self, state: dict) -> None:
            self._iterator.set_state(state["grain"])
            self._emitted = state["emitted"]
            if state.get("process_count") == process_count:
                self.skips.set_state(state["skips"])
            else:
                self.skips.set_state(self._dataset.owned_counts())

        def global_state(self, local_state: dict) -> dict:
            return gather_states(local_state)

        def read_stats(self) -> dict:
            return self._dataset.read_stats()

    seed = config.seed if seed is None else seed
    batches = StreamingBatches(config, global_batch=per_process_batch * process_count,
                               process_index=process_index, process_count=process_count, seed=seed)
    counter = SkipCounter(batches.names, config.max_skip_fraction, config.min_seen)
    return StreamingDataIterator(batches, batches.names, counter, sharding, process_count, per_process_batch,
                                 eval_num_batches=None)
