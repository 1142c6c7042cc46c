"""Embedding a whole evaluation set, sharded over the mesh, without dropping or repeating examples.

The data is a stream of process-local numpy batches (dicts of arrays). Every batch is padded to
the local batch size with a validity mask, turned into a global `jax.Array` sharded over the
mesh's batch axes, passed through the caller's (jitted) embedding functions, and gathered back to
the host; the mask then removes the padding. So a dataset of any size gives exactly one embedding
per example, on one process or many.

Row order of the result: for `batches_from_arrays` / `batches_from_source` it is the dataset
order. For a caller's iterable on several processes it is step-major, then the mesh's row
layout; every output and kept field goes through the same path, so rows stay aligned with each
other (embeddings, labels and ids of one example share a row).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from big_contrast.errors import ConfigError
from big_contrast.sharding import batch_sharding, num_batch_shards

Batch = Mapping[str, np.ndarray]
VALID = "_valid"  # name of the mask field added to padded batches


def local_rows(batch_size: int, mesh=None, batch_axes: str | Sequence[str] | None = None) -> np.ndarray:
    """Positions, within a global batch of `batch_size`, of the rows this process feeds.

    They follow `jax.make_array_from_process_local_data`: the process's addressable shards along
    dimension 0, sorted by their start. Without a mesh (single process) that is every row. When
    the batch axes do not split the processes (each holds every row), all of them must feed
    identical batches.
    """
    if mesh is None:
        if jax.process_count() > 1:
            raise ValueError("Embedding on several processes needs the mesh; pass mesh=... .")
        return np.arange(batch_size)
    sharding = batch_sharding(mesh, batch_axes)
    shards = num_batch_shards(mesh, batch_axes)
    if batch_size % shards:
        raise ConfigError(f"Eval batch size {batch_size} does not divide over the {shards} devices of the batch "
                         f"axes {sharding.spec[0]}; use a multiple of {shards}.")
    starts = sorted({idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((batch_size,)).values()})
    rows_per_shard = batch_size // shards
    return np.concatenate([np.arange(s, s + rows_per_shard) for s in starts])


def pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    """Pad every field to `size` rows with zeros and add the boolean mask VALID (False on padding)."""
    n = _num_rows(batch)
    if n > size:
        raise ConfigError(f"A batch has {n} rows but the local batch size is {size}; make the data yield "
                         f"batches of at most {size} rows per process.")
    def pad(value):
        value = np.asarray(value)
        return np.concatenate([value, np.zeros((size - n,) + value.shape[1:], value.dtype)])

    padded = {key: jax.tree.map(pad, value) for key, value in batch.items()}  # a field may be a tree
    padded[VALID] = np.arange(size) < n
    return padded


def _num_rows(batch: Batch) -> int:
    sizes = {key: _rows(value) for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Fields of a batch have different numbers of rows: {sizes}.")
    return next(iter(sizes.values()))


def _rows(value) -> int:
    """Rows of a field: an array, or a tree of them (NaFlex's `NaflexImages`)."""
    return len(jax.tree.leaves(value)[0])


def batches_from_arrays(arrays: Mapping[str, np.ndarray], batch_size: int, *, mesh=None,
                        batch_axes: str | Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Process-local batches of a dataset held as columns (every process holds all of it).

    Global batch g covers rows [g*batch_size, (g+1)*batch_size); this process gets its rows of
    it (see `local_rows`), fewer or none in the last batch. All processes yield the same number
    of batches, so the result of `embed_dataset` is in dataset order.
    """
    return batches_from_source(_ColumnSource(arrays), batch_size, mesh=mesh, batch_axes=batch_axes)


class _ColumnSource:
    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        _num_rows(self.arrays)

    def __len__(self):
        return _num_rows(self.arrays)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}


def batches_from_source(source, batch_size: int, *, mesh=None,
                        batch_axes: str | Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Process-local batches of a random-access source (`len(source)`, `source[i]` -> dict of arrays).

    Works with `tfds.data_source`, grain `MapDataset` of preprocessed examples, ArrayRecord
    sources; records are stacked field by field, so they must already have fixed shapes.
    """
    rows = local_rows(batch_size, mesh, batch_axes)
    n = len(source)
    for start in range(0, n, batch_size):
        indices = start + rows
        indices = indices[indices < n]
        if isinstance(source, _ColumnSource):
            yield source.take(indices)
        elif len(indices):
            records = [source[int(i)] for i in indices]
            yield {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
        else:
            # No rows for this process in the last global batch: a zero-row batch keeps it in step.
            yield {k: np.asarray(v)[None][:0] for k, v in source[0].items()}


def _as_global(value: np.ndarray, mesh, batch_axes):
    if mesh is None:
        return value
    sharding = batch_sharding(mesh, batch_axes)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), value)


def _to_host(value) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def _any_process_has_data(has_batch: bool) -> bool:
    if jax.process_count() == 1:
        return has_batch
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([has_batch], np.int32))
    return bool(np.asarray(flags).any())


def _check_fields(batch: Batch, fields: Iterable[str], context: str) -> None:
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ConfigError(f"{context}: the data has no field {missing[0]!r} (fields present: {sorted(batch)}); "
                         "name the right field in the evaluator config or add it in preprocessing.")


def embed_dataset(
    data: Mapping[str, np.ndarray] | Iterable[Batch],
    embed_fns: Mapping[str, tuple[str, Callable[[Any], Any]]],
    *,
    batch_size: int,
    keep: Sequence[str] = (),
    mesh=None,
    batch_axes: str | Sequence[str] | None = None,
    context: str = "eval data",
) -> dict[str, np.ndarray]:
    """Embed every example of `data` once.

    data: a dict of arrays (the whole set, see `batches_from_arrays`) or an iterable of
      process-local batches, each a dict of arrays with at most batch_size/processes rows. A
      batch that already has the local size and a boolean VALID field (the eval data
      pipeline's padded batches) is used as it is, not padded again.
    embed_fns: {output_name: (input_field, fn)}; fn maps the global batch of input_field
      ([B, ...], a jax.Array sharded over batch_axes when a mesh is given, numpy otherwise) to
      [B, ...] outputs, e.g. {'zimg': ('image', embed_images)}.
    batch_size: the global batch size B (a multiple of the number of batch-axis devices).
    keep: fields copied to the output unchanged (labels, ids); they must be numeric.
    Returns {output_name or kept field: np.ndarray [N, ...]} with the N valid rows only.
    """
    if isinstance(data, Mapping):
        data = batches_from_arrays(data, batch_size, mesh=mesh, batch_axes=batch_axes)
    size = len(local_rows(batch_size, mesh, batch_axes))
    fields = [field for field, _ in embed_fns.values()] + list(keep)
    outputs: dict[str, list[Any]] = {name: [] for name in list(embed_fns) + list(keep)}
    valid: list[Any] = []
    template = None  # a zero batch for a process whose data ran out before the others'
    iterator = iter(data)
    while True:
        batch = next(iterator, None)
        if not _any_process_has_data(batch is not None):
            break
        if batch is not None and len(batch):
            _check_fields(batch, fields, context)
            template = {f: jax.tree.map(lambda v: np.zeros_like(np.asarray(v)[:0]), batch[f]) for f in fields}
        elif template is None:
            raise ConfigError(f"{context}: this process (index {jax.process_index()}) got no examples at all "
                             "while others did; give every process at least one example.")
        if batch is not None and VALID in batch and len(batch[VALID]) == size:
            # Already padded to the local batch by the data pipeline, with its mask: pad once.
            padded = {**{f: batch[f] for f in fields}, VALID: np.asarray(batch[VALID], bool)}
        else:
            if batch is not None and VALID in batch:  # padded to another size: keep the valid rows only
                rows = np.asarray(batch[VALID], bool)
                batch = {f: jax.tree.map(lambda v: np.asarray(v)[rows], batch[f]) for f in fields}
            batch = template if batch is None or not len(batch) else {f: batch[f] for f in fields}
            padded = pad_batch(batch, size)
        # Outputs stay on the devices until the end, so the next batch is dispatched without waiting.
        valid.append(_as_global(padded[VALID], mesh, batch_axes))
        for name, (field, fn) in embed_fns.items():
            outputs[name].append(fn(_as_global(padded[field], mesh, batch_axes)))
        for field in keep:
            outputs[field].append(_as_global(padded[field], mesh, batch_axes))
    if template is None:
        raise ConfigError(f"{context}: the data is empty; an evaluation needs at least one example.")
    valid_rows = [_to_host(v) for v in valid]
    return {name: np.concatenate([_to_host(part)[rows] for part, rows in zip(parts, valid_rows)])
            for name, parts in outputs.items()}


def _is_text(value: np.ndarray) -> bool:
    return np.asarray(value).dtype.kind in "USO"


def tokenize_field(batch: Batch, field: str, tokenize, context: str) -> dict[str, np.ndarray]:
    """Replace a field of strings ([b] or [b, K], str or bytes) by int32 tokens ([b, L] or [b, K, L])."""
    texts = np.asarray(batch[field])
    if not _is_text(texts):
        return dict(batch)
    if tokenize is None:
        raise ConfigError(f"{context}: field {field!r} holds raw strings but no tokenize callable was given; "
                         "pass Encoders(tokenize=...) or tokenize in the data pipeline.")
    flat = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
    tokens = np.asarray(tokenize(flat), np.int32) if flat else np.zeros((0, 1), np.int32)
    return {**batch, field: tokens.reshape(texts.shape + tokens.shape[-1:])}


def _per_caption(embed_texts: Callable) -> Callable:
    """Lift embed_texts from [B, L] tokens to [B, K, L] (K captions per example)."""
    def embed(tokens):
        if tokens.ndim == 2:
            return embed_texts(tokens)
        b, k, length = tokens.shape
        return embed_texts(tokens.reshape(b * k, length)).reshape(b, k, -1)
    return embed


def embed_image_text_pairs(
    data, encoders, *, batch_size: int, image_field: str = "image", text_field: str = "texts",
    caption_mask_field: str | None = None, image_id_field: str | None = None, context: str = "eval data",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed an image-caption set: returns zimg [Ni, D], ztxt [Nt, D], img_of_txt [Nt].

    Each example has one image and one caption ([L] tokens or a string) or K captions ([K, L]
    tokens or K strings); caption_mask_field ([K] bool) marks which of the K are real. With
    image_id_field, examples that share an id are one image (one caption per row data sets such
    as a csv of pairs): images are then ordered by id. Embeddings are returned as given.
    """
    def prepared(batch):
        return tokenize_field(batch, text_field, encoders.tokenize, context) if text_field in batch else batch

    if isinstance(data, Mapping):
        data = prepared(data)
    else:
        data = (prepared(batch) for batch in data)
    keep = [f for f in (caption_mask_field, image_id_field) if f is not None]
    out = embed_dataset(
        data, {"zimg": (image_field, encoders.embed_images), "ztxt": (text_field, _per_caption(encoders.embed_texts))},
        batch_size=batch_size, keep=keep, mesh=encoders.mesh, batch_axes=encoders.batch_axes, context=context)
    zimg, ztxt = out["zimg"], out["ztxt"]
    if ztxt.ndim == 2:  # one caption per example
        ztxt = ztxt[:, None, :]
    n, k = ztxt.shape[:2]
    caption_mask = np.ones((n, k), bool)
    if caption_mask_field is not None:
        caption_mask = np.asarray(out[caption_mask_field]).astype(bool).reshape(n, k)
    img_of_row = np.arange(n)
    if image_id_field is not None:
        ids = np.asarray(out[image_id_field])
        _, first_row, img_of_row = np.unique(ids, return_index=True, return_inverse=True)
        zimg = zimg[first_row]
    img_of_txt = np.broadcast_to(img_of_row[:, None], (n, k))[caption_mask]
    return zimg, ztxt[caption_mask], img_of_txt


def embed_pairs_for(evaluator, data, encoders):
    """(zimg, ztxt, img_of_txt), L2-normalised, for an evaluator whose config names the image,
    text, caption-mask and image-id fields (retrieval and diagnostics share this)."""
    from big_contrast.evaluate.base import l2_normalize

    cfg = evaluator.config
    zimg, ztxt, img_of_txt = embed_image_text_pairs(
        data, encoders, batch_size=evaluator.batch_size, image_field=cfg["image_field"],
        text_field=cfg["text_field"], caption_mask_field=cfg["caption_mask_field"],
        image_id_field=cfg["image_id_field"], context=evaluator.context)
    return l2_normalize(zimg), l2_normalize(ztxt), img_of_txt
