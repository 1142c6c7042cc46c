"""Sharded, padded embedding and the evaluators end to end, on the 8 simulated devices.

The toy towers are linear maps; references embed the whole unpadded set in one unsharded call.
"""
import json
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_contrast import evaluate
from big_contrast.evaluate import Encoders, embed_dataset, recall_at_k
from big_contrast.evaluate.diagnostics import embedding_diagnostics
from conftest import unit

VOCAB, LENGTH, DIM = 32, 6, 8
_rng = np.random.default_rng(1234)
W_IMG = _rng.normal(size=(2 * 2 * 3, DIM)).astype(np.float32)
W_TXT = _rng.normal(size=(VOCAB, DIM)).astype(np.float32)


@jax.jit
def embed_images(images):
    return images.reshape(images.shape[0], -1) @ W_IMG


@jax.jit
def embed_texts(tokens):
    return jnp.einsum("blv,vd->bd", jax.nn.one_hot(tokens, VOCAB), W_TXT)


def tokenize(texts):
    tokens = np.zeros((len(texts), LENGTH), np.int32)
    for row, text in enumerate(texts):
        ids = [1 + zlib.crc32(word.encode()) % (VOCAB - 1) for word in text.split()][:LENGTH]
        tokens[row, :len(ids)] = ids
    return tokens


MESHES = {
    "no_mesh": lambda: (None, "data"),
    "auto_2d": lambda: (jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model")), "data"),
    "explicit": lambda: (jax.make_mesh((4, 2), ("data", "fsdp")), ("data", "fsdp")),
}

N, BATCH = 37, 16  # 37 examples do not fill 3 batches of 16
CLASSES = ["cat", "dog", "tabby cat", "golden retriever", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


def eval_set(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=N)
    captions = np.array([[f"{CLASSES[l]} number {i} {j}" for j in range(3)] for i, l in enumerate(labels)])
    return {
        "image": rng.normal(size=(N, 2, 2, 3)).astype(np.float32),
        "label": labels.astype(np.int32),
        "texts": tokenize(captions.reshape(-1)).reshape(N, 3, LENGTH),
        "caption_mask": np.concatenate([np.ones((N, 1), bool), rng.random((N, 2)) < 0.6], axis=1),
    }


def reference_metrics(data):
    """The three evaluators' numbers from one unpadded, unsharded embedding of everything."""
    prompt_tokens = tokenize([t.replace("{}", c) for c in CLASSES for t in TEMPLATES])
    ztxt_prompts = unit(np.asarray(embed_texts(prompt_tokens)).reshape(len(CLASSES), len(TEMPLATES), DIM))
    classifier = unit(ztxt_prompts.mean(axis=1))
    zimg = unit(embed_images(data["image"]))
    logits = zimg @ classifier.T
    position = np.argmax(np.argsort(-logits, axis=1, kind="stable") == data["label"][:, None], axis=1)
    ztxt_all = unit(np.asarray(embed_texts(data["texts"].reshape(-1, LENGTH))).reshape(N, 3, DIM))
    mask = data["caption_mask"]
    ztxt, img_of_txt = ztxt_all[mask], np.broadcast_to(np.arange(N)[:, None], (N, 3))[mask]
    return {
        "zs/top1": np.mean(position < 1), "zs/top5": np.mean(position < 5),
        **{f"ret/{k}": v for k, v in recall_at_k(zimg, ztxt, img_of_txt, (1, 5)).items()},
        **{f"diag/{k}": v for k, v in embedding_diagnostics(zimg, ztxt, img_of_txt, scale=10.0, bias=-5.0).items()},
    }


def evals_config():
    evals = ml_collections.ConfigDict()
    evals.zs = dict(type="zero_shot", class_names=CLASSES, templates=TEMPLATES, batch_size=BATCH, text_batch_size=8)
    evals.ret = dict(type="retrieval", caption_mask_field="caption_mask", ks=(1, 5), batch_size=BATCH, chunk=8,
                     every_steps=100)
    evals.diag = dict(type="diagnostics", caption_mask_field="caption_mask", batch_size=BATCH, chunk=8)
    return evals


@pytest.mark.parametrize("mesh_kind", list(MESHES))
def test_padded_sharded_evaluation_matches_unpadded_reference(mesh_kind):
    mesh, batch_axes = MESHES[mesh_kind]()
    data = eval_set(seed=list(MESHES).index(mesh_kind))
    encoders = Encoders(embed_images, embed_texts, tokenize, mesh=mesh, batch_axes=batch_axes, scale=10.0, bias=-5.0)
    results = {}
    for evaluator in evaluate.build_evaluators(evals_config()).values():
        results.update(evaluator.run(data, encoders))
    assert results == pytest.approx(reference_metrics(data), abs=2e-5)


def test_embed_dataset_keeps_every_example_once():
    mesh = jax.make_mesh((8,), ("data",))
    data = {"image": np.arange(N * 12, dtype=np.float32).reshape(N, 2, 2, 3), "id": np.arange(N) * 10}
    out = embed_dataset(data, {"zimg": ("image", embed_images)}, batch_size=BATCH, keep=["id"], mesh=mesh)
    np.testing.assert_array_equal(out["id"], np.arange(N) * 10)
    np.testing.assert_allclose(out["zimg"], np.asarray(embed_images(data["image"])), rtol=1e-5)
    # The same set as a random-access source of records (tfds.data_source / grain MapDataset style).
    records = Records([{"image": data["image"][i], "id": data["id"][i]} for i in range(N)])
    out = embed_dataset(evaluate.batches_from_source(records, BATCH, mesh=mesh), {"zimg": ("image", embed_images)},
                        batch_size=BATCH, keep=["id"], mesh=mesh)
    np.testing.assert_array_equal(out["id"], np.arange(N) * 10)
    np.testing.assert_allclose(out["zimg"], np.asarray(embed_images(data["image"])), rtol=1e-5)


class Records:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_iterable_batches_raw_strings_and_image_ids():
    """A pairs file: one caption per row, rows sharing an image id, uneven process-local batches."""
    rng = np.random.default_rng(77)
    image_of_row = rng.permutation(np.repeat(np.arange(9), 3))[:25]  # 9 images, up to 3 rows each
    images = rng.normal(size=(9, 2, 2, 3)).astype(np.float32)
    captions = np.array([f"image {i} caption {r}" for r, i in enumerate(image_of_row)], dtype=object)
    rows = {"image": images[image_of_row], "texts": captions, "image_id": 100 + image_of_row}
    batches = [{k: v[s:s + size] for k, v in rows.items()} for s, size in ((0, 16), (16, 3), (19, 6))]
    evaluator = evaluate.build_evaluator("pairs", dict(type="retrieval", image_id_field="image_id", batch_size=16))
    got = evaluator.run(batches, Encoders(embed_images, embed_texts, tokenize, mesh=jax.make_mesh((8,), ("data",))))
    present = np.unique(image_of_row)  # images are ordered by id
    zimg = unit(embed_images(images[present]))
    ztxt = unit(embed_texts(tokenize(list(captions))))
    expected = recall_at_k(zimg, ztxt, np.searchsorted(present, image_of_row))
    assert got == pytest.approx({f"pairs/{k}": v for k, v in expected.items()}, abs=1e-12)


def test_missing_field_is_reported():
    data = eval_set(seed=3)
    encoders = Encoders(embed_images, embed_texts, tokenize)
    zero_shot = evaluate.build_evaluator("zs", dict(type="zero_shot", class_names=CLASSES, templates="photo",
                                                    label_field="fine_label", batch_size=BATCH))
    with pytest.raises(ValueError, match="no field 'fine_label'.*'caption_mask', 'image', 'label', 'texts'"):
        zero_shot.run(data, encoders)
    retrieval = evaluate.build_evaluator("ret", dict(type="retrieval", text_field="captions", batch_size=BATCH))
    with pytest.raises(ValueError, match="evaluator 'ret' .*no field 'captions'"):
        retrieval.run([{k: v[:10] for k, v in data.items()}], encoders)


def test_bad_batches_and_configs():
    mesh = jax.make_mesh((8,), ("data",))
    images = np.zeros((20, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match="does not divide over the 8 devices"):
        embed_dataset({"image": images}, {"z": ("image", embed_images)}, batch_size=12, mesh=mesh)
    with pytest.raises(ValueError, match="batch has 20 rows but the local batch size is 16"):
        embed_dataset([{"image": images}], {"z": ("image", embed_images)}, batch_size=16, mesh=mesh)
    with pytest.raises(ValueError, match="the data is empty"):
        embed_dataset([], {"z": ("image", embed_images)}, batch_size=16, mesh=mesh)
    with pytest.raises(ValueError, match="unknown config keys \\['label_feild'\\]"):
        evaluate.build_evaluator("zs", dict(type="zero_shot", label_feild="label"))
    with pytest.raises(ValueError, match="set type to one of"):
        evaluate.build_evaluator("zs", dict(type="zeroshot"))
    with pytest.raises(ValueError, match="raw strings but no tokenize"):
        evaluate.build_evaluator("ret", dict(type="retrieval", batch_size=8)).run(
            {"image": images[:3], "texts": np.array(["a", "b", "c"])}, Encoders(embed_images, embed_texts))


def test_schedule_table_and_json(tmp_path):
    evaluators = evaluate.build_evaluators(evals_config())
    assert evaluators["ret"].should_run(200) and not evaluators["ret"].should_run(150)
    assert not evaluators["zs"].should_run(100)  # every_steps=0: only when called explicitly
    results = {"zs/top1": 0.5, "zs/top5": 0.875, "ret/i2t_recall@1": 0.25}
    table = evaluate.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["eval", "metric", "value"]
    assert [line.split() for line in lines[2:]] == [
        ["ret", "i2t_recall@1", "0.2500"], ["zs", "top1", "0.5000"], ["zs", "top5", "0.8750"]]
    path = tmp_path / "out" / "eval.json"
    evaluate.write_json(results, path, step=1000)
    assert json.loads(path.read_text()) == {"step": 1000, "results": results}


MULTIPROCESS_WORKER = r'''
import os, sys
import jax
import numpy as np
process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from big_contrast.evaluate import batches_from_source, embed_dataset

w = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
embed = jax.jit(lambda x: x @ w)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows = np.random.default_rng(6).normal(size=(37, 3)).astype(np.float32)
# The whole set as columns: each process feeds its rows of every global batch of 16.
columns = embed_dataset({"x": rows, "id": np.arange(37)}, {"z": ("x", embed)}, batch_size=16, keep=["id"], mesh=mesh)
# Uneven process-local streams: process 0 has 21 rows in 3 batches, process 1 has 16 rows in 2.
mine = np.arange(21) if process_id == 0 else np.arange(21, 37)
sizes = (8, 8, 5) if process_id == 0 else (8, 8)
starts = np.cumsum((0,) + sizes[:-1])
stream = [{"x": rows[mine[s:s + n]], "id": mine[s:s + n]} for s, n in zip(starts, sizes)]
streamed = embed_dataset(stream, {"z": ("x", embed)}, batch_size=16, keep=["id"], mesh=mesh)
# A record source smaller than one process's share of a batch: process 1 feeds only padding.
class Records:
    def __len__(self):
        return 5
    def __getitem__(self, i):
        return {"x": rows[i], "id": np.int32(i)}
small = embed_dataset(batches_from_source(Records(), 16, mesh=mesh), {"z": ("x", embed)}, batch_size=16,
                      keep=["id"], mesh=mesh)
np.savez(os.path.join(out_dir, f"process{process_id}.npz"), columns_z=columns["z"], columns_id=columns["id"],
         stream_z=streamed["z"], stream_id=streamed["id"], small_z=small["z"], small_id=small["id"])
jax.distributed.shutdown()
'''


def test_two_processes_feed_their_rows_once(tmp_path):
    """Two processes x 4 CPU devices (gloo): every example embedded once, results on both processes."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(MULTIPROCESS_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.getcwd()}
    workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [w.communicate(timeout=120)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)[-3000:]

    w = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    rows = np.random.default_rng(6).normal(size=(37, 3)).astype(np.float32)
    reference = rows @ w
    for i in range(2):
        out = np.load(tmp_path / f"process{i}.npz")
        np.testing.assert_array_equal(out["columns_id"], np.arange(37))  # dataset order, no repeats
        np.testing.assert_allclose(out["columns_z"], reference, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.sort(out["stream_id"]), np.arange(37))  # each row exactly once
        np.testing.assert_allclose(out["stream_z"], reference[out["stream_id"]], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["small_id"], np.arange(5))
        np.testing.assert_allclose(out["small_z"], reference[:5], rtol=1e-5, atol=1e-6)
