"""The grain input pipeline: sources -> shuffled, preprocessed, batched, global `jax.Array`s.

    it = make_pipeline(config.data, sharding)      # sharding: NamedSharding | Mesh | None
    batch = next(it)    # {'image': [B, H, W, 3] float32, 'text': [B, L] int32, <label_keys>}
                        # (images uint8 with data.device_normalize: see device_ops.py;
                        # a pp ending in naflex(...): 'patches', 'patch_mask', 'spatial_shapes')
    it.skip_counts()    # {'skipped/<source>/<reason>': n, 'skipped/<reason>': n, 'seen/<source>': n}
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly
    it.close()

The grain graph, per process:

    for each source k:  MapDataset.source(TaggedSource(source_k))
                          [process_index::process_count]       # disjoint examples per process
                          .shuffle(seed_k).repeat()            # train only; reshuffled each epoch
                                                               # (whole groups with group_size > 1)
    MapDataset.mix(sources, weights)                           # when there are several
      .random_map(ProcessExample)                              # decode, image ops, caption, tokens
      .to_iter_dataset(ReadOptions(num_threads, prefetch))     # threaded reading + mapping
      -> SkipCountingBatchIterDataset(B / process_count)       # batches + skip counts
      -> .mp_prefetch(num_workers)                             # worker processes (if > 0);
                                                               # batches stacked into shared memory

Each process reads a strided share of every source; process index and count come from jax
(grain's `ShardByJaxProcess`) and can be overridden without a sharding, so tests simulate
hosts. The map and batch stages run inside the worker processes, which (like the main process
when num_workers=0) keep freed memory in the allocator (`data.keep_freed_memory`, `memory.py`). The main process then strips the skip counts
into a `SkipCounter` (checked against `max_skip_fraction`) and assembles each field into one
global array with `jax.make_array_from_process_local_data`, sharded over the batch axes of
`sharding`; with `sharding=None` batches stay numpy (evaluation, tests).

Evaluation (`train=False`): `pp_eval`, no shuffle, one pass; every process yields the same
number of batches, each padded to the per-process batch with a boolean `'mask'` field
(False for padding), so multi-host evaluation stays in step. With `data.max_captions = K`
every caption of an image is kept (`'texts'` [B, K, L] + `'caption_mask'` [B, K]), the
retrieval protocol; a labelled source without captions gives batches without text.
"""

from __future__ import annotations

import functools
import math
import sys

import grain
import numpy as np

from big_contrast.data.batching import SkipCountingBatchIterDataset
from big_contrast.data.config import check_data_config
from big_contrast.data.device_ops import host_spec
from big_contrast.data.errors import SkipCounter
from big_contrast.data.memory import keep_freed_memory, worker_init
from big_contrast.data.multicrop import training_multicrop
from big_contrast.data.preprocess import ProcessExample
from big_contrast.data.sources import TaggedSource, open_source
from big_contrast.data.tokenizer import make_tokenizer
from big_contrast.errors import ConfigError

def derive_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for one random stage, derived from the pipeline seed."""
    return int(np.random.SeedSequence([int(seed), *path]).generate_state(1)[0])


def _data_section(config):
    if "sources" not in config and "data" in config:
        return config.data
    return config


def _source_datasets(config, *, train: bool, process_index: int, process_count: int, seed: int):
    """One `MapDataset` per source. Training: the whole source, shuffled and endless, the same
    on every process (`ProcessRowsOfGlobalBatches` then picks this process's rows). Evaluation:
    this process's disjoint share of one pass. Returns `(datasets, weights, largest
    per-process share of one pass)`."""
    datasets, weights, largest_share = [], [], 0
    for k, name in enumerate(config.sources.keys()):
        source = open_source(name, config.sources[name])
        if len(source) < process_count:
            raise ConfigError(
                f"data source {name!r} has {len(source)} records, fewer than the {process_count} "
                "processes that each need a disjoint share")
        largest_share = max(largest_share, math.ceil(len(source) / process_count))
        ds = grain.MapDataset.source(TaggedSource(source, k))
        group_size = config.sources[name].get("group_size", 1)
        if train and group_size > 1:
            if len(source) % group_size:  # said, not silently dropped
                print(f"Warning: data source {name!r} has {len(source)} records, not a multiple of "
                      f"group_size={group_size}; its last {len(source) % group_size} are never read.",
                      file=sys.stderr, flush=True)
            ds = GroupShuffle(ds, group_size, seed=derive_seed(seed, 1, k))
        elif train:
            ds = ds.shuffle(seed=derive_seed(seed, 1, k)).repeat()
        else:
            ds = ds[process_index::process_count]
        datasets.append(ds)
        weights.append(float(config.sources[name].get("weight", 1.0)))
    return datasets, weights, largest_share


class GroupShuffle(grain.MapDataset):
    """An endless shuffle of whole groups: records g*G ... g*G + G - 1 stay consecutive (so in
    one batch, unless the group straddles two), the groups' order reshuffled each epoch.

    Records past the last whole group are never read (the pipeline warns; `DemoSource` refuses
    such a size)."""

    def __init__(self, parent, group_size: int, *, seed: int):
        super().__init__(parent)
        if len(parent) < group_size:
            raise ConfigError(f"group_size={group_size} is larger than the source's {len(parent)} records")
        self._group_size = group_size
        self._groups = grain.MapDataset.range(len(parent) // group_size).shuffle(seed=seed).repeat()

    def __len__(self) -> int:
        return len(self._groups)  # endless, like repeat()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group, member = divmod(index, self._group_size)
        return self._parent[self._groups[group] * self._group_size + member]

    def __str__(self) -> str:
        return f"GroupShuffle(group_size={self._group_size})"


class ProcessRowsOfGlobalBatches(grain.MapDataset):
    """This process's rows of every global batch of a global, endless example order.

    Element i is global element (i // b) * B + p * b + i % b (b = B / process_count rows per
    process, p = process index), so the global batch of step t is examples t*B ... (t+1)*B - 1
    of the same order whatever the number of processes: a run on 2 hosts trains on exactly
    the batches of a run on 1 (on clean data; a skipped record shifts its own process's rows).
    """

    def __init__(self, parent, *, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._rows = global_batch // process_count
        self._global_batch, self._offset = global_batch, process_index * self._rows
        self._length = len(parent) // process_count

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        step, row = divmod(index, self._rows)
        return step * self._global_batch + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def __str__(self) -> str:
        return f"ProcessRowsOfGlobalBatches(rows {self._offset}:{self._offset + self._rows} of {self._global_batch})"


def build_dataset(config, *, train: bool, per_process_batch: int, process_index: int,
                  process_count: int, seed: int | None = None, start_batch: int = 0):
    """The grain `IterDataset` of per-process batches (with `_seen` / `_skipped` counts).

    Returns `(dataset, source_names, largest_share)`, the last being the number of records in
    the largest per-process share of one pass (for evaluation padding).
    """
    check_data_config(config)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    seed = config.seed if seed is None else seed
    names = tuple(config.sources.keys())
    if not train and len(names) > 1:
        raise ConfigError(f"evaluation reads one source; config has {len(names)}: {names}")
    pp = host_spec(config.pp_train if train else config.pp_eval, config.get("device_normalize", False))
    tokenizer = make_tokenizer(config.tokenizer, config.lowercase)
    decoder_targets = location_targets(config, tokenizer, train)  # LocCa's decoder targets, or None
    processor = ProcessExample(pp, tokenizer,
                               config.max_len, tuple(config.label_keys),
                               max_captions=None if train else config.get("max_captions"),
                               captions_optional=not train, decoder_targets=decoder_targets,
                               multicrop=training_multicrop(config) if train else None,  # SILC's local crops
                               vector_keys=tuple(config.get("vector_keys", ())))  # issue 23: teacher columns
    datasets, weights, largest_share = _source_datasets(
        config, train=train, process_index=process_index, process_count=process_count, seed=seed)
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = ds.random_map(processor, seed=derive_seed(seed, 2))  # augmentation keyed by global index
    if train:
        ds = ProcessRowsOfGlobalBatches(ds, global_batch=per_process_batch * process_count,
                                        process_index=process_index, process_count=process_count)
        if start_batch:  # resuming without an iterator state (e.g. on another number of hosts)
            ds = ds[start_batch * per_process_batch:]
    read_options = grain.ReadOptions(num_threads=config.num_threads,
                                     prefetch_buffer_size=config.prefetch_buffer_size)
    iter_ds = SkipCountingBatchIterDataset(
        ds.to_iter_dataset(read_options), per_process_batch, names, drop_remainder=False,
        max_skip_fraction=config.max_skip_fraction, min_seen=config.min_seen)
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker start-up reads absl flags
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers),
            worker_init_fn=functools.partial(worker_init, tune_allocator=config.keep_freed_memory))
    elif config.keep_freed_memory:  # decoding happens in this process
        keep_freed_memory()
    return iter_ds, names, largest_share


def location_targets(config, tokenizer, train: bool):
    """`config.decoder_targets` (LocCa, `location_targets.py`) built for this pipeline, or None;
    boxes are fractions of the whole image, so the pp must not crop or flip."""
    from big_contrast.data.location_targets import check_pp_keeps_boxes, targets_from_config

    targets = targets_from_config(config.get("decoder_targets"), tokenizer, config.max_len)
    if targets is not None:
        check_pp_keeps_boxes(config.pp_train if train else config.pp_eval)
    return targets


class DataIterator:
    """Iterator of (global) batches with skip accounting and checkpointable state."""

    def __init__(self, dataset, source_names, counter: SkipCounter, sharding, process_count: int,
                 per_process_batch: int, eval_num_batches: int | None):
        self._dataset, self.source_names, self.skips = dataset, source_names, counter
        self._sharding, self._process_count = sharding, process_count
        self.per_process_batch = per_process_batch
        self._eval_num_batches = eval_num_batches  # None when training (endless)
        self._iterator = iter(dataset)
        self._emitted = 0
        self._template = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._eval_num_batches is not None and self._emitted >= self._eval_num_batches:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self._eval_num_batches is None:
                raise
            batch = self._padding_batch()
        else:
            self.skips.add(batch.pop("_seen"), batch.pop("_skipped"))
            if self._eval_num_batches is not None:
                batch = self._pad(batch)
        self._emitted += 1
        return self._to_global(batch)

    def _pad(self, batch: dict) -> dict:
        b = len(next(iter(batch.values())))  # 'image', or NaFlex's 'patches' (issue 22)
        padded = {k: np.concatenate([v, np.zeros((self.per_process_batch - b, *v.shape[1:]), v.dtype)])
                  for k, v in batch.items()}
        padded["mask"] = np.arange(self.per_process_batch) < b
        self._template = padded
        return padded

    def _padding_batch(self) -> dict:
        if self._template is None:
            raise ConfigError("this process's share of the evaluation data produced no example "
                             "(every record was skipped), so no padding batch can be shaped")
        return {k: np.zeros_like(v) for k, v in self._template.items()}

    def _to_global(self, batch: dict) -> dict:
        if self._sharding is None:
            return batch
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        batch_spec = self._sharding.spec[0] if len(self._sharding.spec) else None
        out = {}
        for key, local in batch.items():
            field = NamedSharding(self._sharding.mesh,
                                  PartitionSpec(batch_spec, *[None] * (local.ndim - 1)))
            global_shape = (local.shape[0] * self._process_count, *local.shape[1:])
            out[key] = jax.make_array_from_process_local_data(field, local, global_shape)
        return out

    def skip_counts(self) -> dict[str, int]:
        """Cumulative counts on this process (see `SkipCounter.counts`), for the metrics."""
        return self.skips.counts()

    def get_state(self) -> dict:
        """JSON-serialisable state; `set_state` on a fresh iterator of the same config resumes
        with exactly the batches this one would produce next."""
        return {"grain": self._iterator.get_state(), "skips": self.skips.get_state(),
                "emitted": self._emitted}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self.skips.set_state(state["skips"])
        self._emitted = state["emitted"]

    def close(self) -> None:
        """Stops worker processes (call it, or use `with`, when num_workers > 0)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_sharding(sharding, global_batch: int, process_count: int):
    """Batch must divide over the batch shards; each process must own B / process_count rows."""
    mesh, spec = sharding.mesh, sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    num_shards = math.prod(mesh.shape[a] for a in axes)
    if global_batch % num_shards:
        raise ConfigError(
            f"global batch size {global_batch} does not divide over the {num_shards} batch shards "
            f"of mesh axes {axes}; use a multiple of {num_shards}")
    rows = {(idx[0].start, idx[0].stop)
            for idx in sharding.addressable_devices_indices_map((global_batch,)).values()}
    local_rows = sum((stop or global_batch) - (start or 0) for start, stop in rows)
    if local_rows * process_count != global_batch:
        raise NotImplementedError(
            f"this process addresses {local_rows} of {global_batch} batch rows, not 1/{process_count}; "
            "meshes where several processes share batch rows are not supported by the data pipeline")


def make_pipeline(config, sharding=None, *, train: bool = True, global_batch_size: int | None = None,
                  seed: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, start_batch: int = 0) -> DataIterator:
    """Builds the input pipeline described by `config.data` (see `config.py`).

    Args:
      config: the data section (a full config with a `data` field is accepted too).
      sharding: a `NamedSharding` whose spec's first entry shards the batch dimension, a `Mesh`
        (sharded over its 'data' / 'fsdp' axes), or None for numpy batches.
      train: training (shuffled, endless, `pp_train`) or evaluation (one pass, `pp_eval`,
        padded batches with a 'mask').
      global_batch_size: overrides `config.batch_size`.
      seed: overrides `config.seed`.
      process_index / process_count: default to jax's; override only without a sharding
        (to simulate hosts in tests).
      start_batch: training only: begin at global batch `start_batch` of the example order.
        Resuming with `set_state` is exact; this is for restoring where no state of this
        layout exists (a checkpoint written by another number of processes).
    """
    config = _data_section(config)
    global_batch = global_batch_size or config.batch_size
    if sharding is not None:
        import jax

        if isinstance(sharding, jax.sharding.Mesh):
            from big_contrast.sharding import batch_sharding

            sharding = batch_sharding(sharding)
        real = (jax.process_index(), jax.process_count())
        if (process_index, process_count) not in ((None, None), real):
            raise ValueError(
                f"process_index/process_count={process_index}/{process_count} differ from jax's "
                f"{real}; overriding them is only possible without a sharding (numpy batches)")
        process_index, process_count = real
        _check_sharding(sharding, global_batch, process_count)
    elif process_index is None or process_count is None:
        from grain.sharding import ShardByJaxProcess

        shard = ShardByJaxProcess()
        process_index, process_count = shard.shard_index, shard.shard_count
    if global_batch % process_count:
        raise ConfigError(
            f"global batch size {global_batch} does not divide over {process_count} processes")
    per_process_batch = global_batch // process_count
    from big_contrast.data.streaming import is_streaming, make_streaming_iterator

    if is_streaming(config) and config.get("decoder_targets") is not None:  # LocCa
        raise ConfigError("config.data.decoder_targets (LocCa's box targets) is not supported with kind='stream' "
                          "sources yet; convert the data with `big-contrast data convert` or unset it.")
    if is_streaming(config):  # kind='stream' sources: tar shards read in order (data/streaming/)
        return make_streaming_iterator(config, sharding, train=train, per_process_batch=per_process_batch,
                                       process_index=process_index, process_count=process_count, seed=seed,
                                       start_batch=start_batch)
    dataset, names, largest_share = build_dataset(
        config, train=train, per_process_batch=per_process_batch, process_index=process_index,
        process_count=process_count, seed=seed, start_batch=start_batch)
    counter = SkipCounter(names, config.max_skip_fraction, config.min_seen)
    eval_num_batches = None if train else math.ceil(largest_share / per_process_batch)
    return DataIterator(dataset, names, counter, sharding, process_count, per_process_batch,
                        eval_num_batches)
