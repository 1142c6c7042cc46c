"""Batching that counts skipped records: an `IterDataset` stage after the map stage.

Consumes processed examples and skip markers (see `preprocess.py`) and emits per-process
batches of exactly `batch_size` good examples, plus two count arrays covering every record
consumed for that batch:

    '_seen':    int64 [num_sources]                  records read, per source
    '_skipped': int64 [num_sources, len(SKIP_REASONS)]  records skipped, per source and reason

Because it sits before `mp_prefetch`, it runs inside each worker process and its counts
travel with the batch through grain's inter-process queues (and, in workers, the batch is
stacked straight into shared memory). Its checkpoint state is its parent's state: a batch is
only emitted complete, so the parent's position is exactly "after the last record of the last
batch". At the end of a finite pass (evaluation), skipped records after the last good one
belong to no batch and are not counted.

Guard against an endless search: a source whose every record is bad would never produce a
batch whose counts could be checked. So once one batch has consumed more than
`2 * batch_size + min_seen` records (more than half of them skipped), the skip threshold is
checked on this batch's counts and `TooManySkippedError` names the source and the reason.
"""

from __future__ import annotations

import grain
import numpy as np

from big_contrast.data.errors import SkipCounter
from big_contrast.errors import ConfigError


def _shared_memory_array(shape, dtype):
    """grain's own Batch stacks into this in worker processes, so the batch reaches the main
    process without another copy. It is private to grain: if it moves, stack into plain numpy
    (grain then copies the batch to shared memory itself)."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return None
    return SharedMemoryArray(shape, dtype=dtype)


def stack_examples(examples: list[dict], shared_memory: bool = False) -> dict:
    batch = {}
    for key in examples[0]:
        if key.startswith("_"):
            continue
        values = [ex[key] for ex in examples]
        try:
            first = np.asarray(values[0])
            out = (_shared_memory_array((len(values), *first.shape), first.dtype)
                   if shared_memory and first.dtype.kind not in "OUS" else None)
            batch[key] = np.stack(values, out=out)
        except ValueError:
            shapes = sorted({np.shape(ex[key]) for ex in examples})
            raise ConfigError(
                f"examples of one batch have different {key!r} shapes {shapes}; the image pp "
                "must end with a fixed size (e.g. random_resized_crop(224) or central_crop(224))"
            ) from None
    return batch


class SkipCountingBatchIterDataset(grain.IterDataset):
    """Batches good examples, counting skip markers per source and reason."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, source_names: tuple[str, ...],
                 drop_remainder: bool, max_skip_fraction: float | None, min_seen: int):
        super().__init__(parent)
        if batch_size <= 0:
            raise ConfigError(f"per-process batch size must be positive, got {batch_size}")
        self.batch_size, self.source_names = batch_size, tuple(source_names)
        self.drop_remainder = drop_remainder
        self.max_skip_fraction, self.min_seen = max_skip_fraction, min_seen
        self.shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by grain's `mp_prefetch`: stack batches straight into shared memory."""
        self.shared_memory = True

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipCountingBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipCountingBatchIterDataset(batch_size={self.batch_size})"


class _SkipCountingBatchIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, spec: SkipCountingBatchIterDataset):
        super().__init__(parent)
        self._spec = spec

    def __next__(self) -> dict:
        spec = self._spec
        guard = SkipCounter(spec.source_names, spec.max_skip_fraction, spec.min_seen)
        examples = []
        while len(examples) < spec.batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                if examples and not spec.drop_remainder:
                    break
                raise
            guard.seen[example["_source"]] += 1
            if "_skip" in example:
                guard.skipped[example["_source"], example["_skip"]] += 1
                if guard.seen.sum() > 2 * spec.batch_size + spec.min_seen:
                    guard.check()
                continue
            examples.append(example)
        batch = stack_examples(examples, spec.shared_memory)
        batch["_seen"], batch["_skipped"] = guard.seen, guard.skipped
        return batch

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SkipCountingBatchIterator(batch_size={self._spec.batch_size})"

