"""Training from shards where they live (a bucket or a disk), read once, in order, never copied.

The random-access pipeline (`data/pipeline.py`) shuffles exactly over the whole dataset, which
needs every record addressable on every host: local ArrayRecord files, or a copy of the
bucket's shards on each host's disk. For data larger than a disk this package streams
webdataset tar shards instead (img2dataset's output, or `data convert --format tar`):

  reader.py    one object as parallel range requests: bounded read-ahead, retries, timeouts
  tar.py       tar framing with the byte span of every sample (what makes resume exact)
  stream.py    a virtual stream: shard order per epoch, interleaving, mixture, shuffle buffer
  pipeline.py  streams -> per-process batches, host-count independent; state; skip counts
  write.py     convert_to_tar_shards: manifests / tars -> streamable shards (local or a bucket)

Select it with `kind='stream'` sources and tune it in `config.data.streaming`.
"""

from big_contrast.data.streaming.pipeline import (STREAM_KIND, STREAMING_DEFAULTS, is_streaming,
                                                  make_streaming_iterator, merge_states)

__all__ = ["STREAM_KIND", "STREAMING_DEFAULTS", "is_streaming", "make_streaming_iterator", "merge_states"]
