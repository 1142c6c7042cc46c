"""Skip accounting for bad records: reasons, the exception that marks one, and the counter.

A bad record (an image that does not decode, a file a manifest names but that is missing,
an empty or non-text caption, a truncated tar member) is never fatal on its own: the
preprocessing stage raises `SkipRecord(reason)`, the batcher turns it into a count, and the
counts travel with every per-process batch as two small int arrays (`seen` per source and
`skipped` per source x reason). Putting them in the batch is what makes them survive grain's
worker processes, which share no memory with the trainer.

`SkipCounter` (main process) sums those arrays, exposes them as a flat dict for the training
metrics, and raises `TooManySkippedError` once a source's skipped fraction passes the
configured threshold -- the error names the source and its most frequent reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from big_contrast.errors import BigContrastError, ConfigError, MissingFileError

# The fixed vocabulary of skip reasons; the order is the column order of the `skipped` array.
SKIP_REASONS = (
    "undecodable_image",  # PIL cannot identify or fully decode the bytes
    "missing_image",  # a manifest names a file that does not exist, or a record has no image
    "empty_caption",  # no caption, or only whitespace
    "non_text_caption",  # a caption that is not a string / not valid UTF-8
    "truncated_tar_member",  # a tar shard that ends inside a member
    # Streaming (data/streaming): appended, so the columns above keep their index.
    "corrupt_shard",  # a tar header fails its checksum: the rest of that shard counts as one
    "missing_shard",  # the object is gone (deleted mid-run): its unread rest counts as one
    "unreadable_shard",  # the store kept failing / timing out after every retry: one per shard
    "malformed_box",  # a region box outside [0, 1], inverted (min > max), not 4 numbers, or without a phrase
)
REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


class SkipRecord(Exception):
    """Raised while reading or preprocessing one record that must be skipped and counted."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASON_INDEX:
            raise ValueError(f"unknown skip reason {reason!r}; known reasons: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class MissingDataError(MissingFileError, ValueError):
    """A dataset is not where its config says (a TFDS dataset not prepared, a folder or file
    that does not exist); the message says how to prepare it. Benchmark runs report it for
    that dataset and go on with the others. (A `ValueError` too, so that callers that catch
    bad-config errors catch it.)"""


class TooManySkippedError(BigContrastError, RuntimeError):
    """A source's skipped fraction passed `data.max_skip_fraction`."""


class SkipCounter:
    """Accumulates per-source `seen` / `skipped` counts and enforces the skip threshold.

    Args:
      source_names: one name per source, in the order of the batch's `seen` rows.
      max_skip_fraction: a source whose skipped / seen passes this fraction raises
        `TooManySkippedError`; `None` or 1.0 disables the check.
      min_seen: the check starts once a source has this many records seen, so that a single
        bad record among the first few does not stop a run.
    """

    def __init__(self, source_names: Sequence[str], max_skip_fraction: float | None = 0.1,
                 min_seen: int = 1000):
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ConfigError(
                f"max_skip_fraction={max_skip_fraction} must lie in [0, 1] (or be None to disable)")
        self.source_names = tuple(source_names)
        self.max_skip_fraction = max_skip_fraction
        self.min_seen = min_seen
        self.seen = np.zeros(len(self.source_names), np.int64)
        self.skipped = np.zeros((len(self.source_names), len(SKIP_REASONS)), np.int64)

    def add(self, seen: np.ndarray, skipped: np.ndarray) -> None:
        """Adds one batch's counts and raises if a source is now over the threshold."""
        self.seen += np.asarray(seen, np.int64)
        self.skipped += np.asarray(skipped, np.int64)
        self.check()

    def check(self) -> None:
        if self.max_skip_fraction is None:
            return
        for k, name in enumerate(self.source_names):
            n_seen, n_skipped = int(self.seen[k]), int(self.skipped[k].sum())
            if n_seen < max(self.min_seen, 1) or n_skipped <= self.max_skip_fraction * n_seen:
                continue
            top = int(np.argmax(self.skipped[k]))
            by_reason = ", ".join(f"{r}={int(c)}" for r, c in zip(SKIP_REASONS, self.skipped[k]) if c)
            raise TooManySkippedError(
                f"data source {name!r} skipped {n_skipped} of {n_seen} records "
                f"({n_skipped / n_seen:.1%}), above data.max_skip_fraction={self.max_skip_fraction}; "
                f"most frequent reason: {SKIP_REASONS[top]!r} ({by_reason}). Fix the data (e.g. "
                "`big-contrast data convert` reports bad records) or raise data.max_skip_fraction.")

    def counts(self) -> dict[str, int]:
        """Flat metrics: `skipped/<source>/<reason>`, `skipped/<reason>` totals, `seen/<source>`."""
        out = {}
        for k, name in enumerate(self.source_names):
            out[f"seen/{name}"] = int(self.seen[k])
            for r, reason in enumerate(SKIP_REASONS):
                out[f"skipped/{name}/{reason}"] = int(self.skipped[k, r])
        for r, reason in enumerate(SKIP_REASONS):
            out[f"skipped/{reason}"] = int(self.skipped[:, r].sum())
        return out

    def get_state(self) -> dict:
        return {"seen": self.seen.tolist(), "skipped": self.skipped.tolist()}

    def set_state(self, state: dict) -> None:
        seen, skipped = np.asarray(state["seen"], np.int64), np.asarray(state["skipped"], np.int64)
        if skipped.ndim == 2 and skipped.shape[1] < len(SKIP_REASONS):  # saved before reasons were added
            skipped = np.pad(skipped, ((0, 0), (0, len(SKIP_REASONS) - skipped.shape[1])))
        if seen.shape != self.seen.shape or skipped.shape != self.skipped.shape:
            raise ConfigError(
                f"skip-count state for {seen.shape[0]} sources cannot be restored into a pipeline "
                f"with {len(self.source_names)} sources {self.source_names}")
        self.seen, self.skipped = seen, skipped
