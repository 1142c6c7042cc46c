"""A frozen teacher of another workdir in the train step (`config.teacher = dict(workdir=...)`):
loaded sharded from its checkpoint, an argument of the step (never updated, no gradient), the
same loss and gradients as the teacher's embeddings computed outside the step, gradient caching
equal to one pass, the teacher's own pixel convention and size, the config's one-sentence checks,
and a training run that records the teacher and resumes with it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast import losses, sharding
from big_contrast import teacher as frozen
from big_contrast.checkpoint import Checkpointer
from big_contrast.data.device_ops import device_normalization
from big_contrast.errors import BigContrastError, ConfigError
from big_contrast.train import build, train, validate
from big_contrast.train import teacher as train_teacher
from big_contrast.train.loop import make_step_fn
from big_contrast.train.metrics import read_metrics
from big_contrast.train.step import LossSpec, loss_and_grads
from big_contrast.workdir import Workdir
from conftest import rel_err
from test_train import tiny_config

DISTILL = "sigmoid + 0.5 * distill"


def teacher_config(**overrides):
    """A teacher wider than the student (image width 48, embed 24 vs 64 / 64 of the demo)."""
    config = tiny_config(total_steps=1, checkpoint_every=100, **overrides)
    config.model.image.update(width=48, mlp_dim=96, num_heads=2)
    config.model.embed_dim = 24
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A workdir as `big-contrast train` leaves it (config.json + a checkpoint of step 1), written
    without training: the teacher's values need not be trained to test how they are used."""
    workdir = Workdir(tmp_path_factory.mktemp("teacher"))
    config = teacher_config()
    run = build(config, mesh=sharding.make_mesh((("data", 8), ("fsdp", 1), ("tensor", 1))))
    ckpt = Checkpointer(workdir.checkpoints, async_save=False)
    try:
        ckpt.save(1, dataclasses.replace(run.state, step=run.state.step + 1), {"step": 1}, wait=True)
    finally:
        ckpt.close()
    workdir.write_config(config)
    return workdir.path


def student(teacher_dir, objective=DISTILL, **teacher):
    return tiny_config(loss_objective=objective, teacher=dict(workdir=str(teacher_dir), **teacher))


def saved_teacher_params(teacher_dir):
    ckpt = Checkpointer(teacher_dir / "checkpoints", async_save=False)
    try:
        state, step = ckpt.restore_arrays()
    finally:
        ckpt.close()
    return state["params"], step


def test_the_teacher_loads_sharded_on_the_students_mesh_with_its_checkpoint_values(teacher_dir):
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    record = frozen.read_record(teacher_dir)
    teacher, params = frozen.load_teacher(record, mesh, towers=("image", "text"), student_pp=tiny_config().data.pp_train)
    saved, step = saved_teacher_params(teacher_dir)
    assert teacher.step == step == 1
    flat = lambda t: {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    got, want = flat(params), flat(saved)
    assert got.keys() == want.keys()
    for path, x in got.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]))
        assert x.sharding == flat(teacher.param_shardings)[path]
    # FSDP shards the teacher's matrices like the student's towers (logical-axis rules).
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(teacher.param_shardings))


def setup_step(teacher_dir, objective, mesh_shape=(4, 2, 1)):
    config = student(teacher_dir, objective)
    mesh = sharding.make_mesh(tuple(zip(("data", "fsdp", "tensor"), mesh_shape)))
    run = build(config, mesh=mesh)
    obj = losses.parse_objective(objective)
    teacher, t_params = train_teacher.load_for_run(config, mesh, obj)
    rng = np.random.default_rng(0)
    size = config.model.image.image_size
    batch = dict(image=rng.uniform(-1, 1, size=(32, size, size, 3)).astype(np.float32),
                 text=rng.integers(2, 100, size=(32, config.model.text.max_len)).astype(np.int32))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    return config, run, teacher, t_params, batch, mesh, obj


def test_the_frozen_teacher_gives_the_loss_and_gradients_of_its_embeddings_computed_outside(teacher_dir):
    config, run, teacher, t_params, batch, mesh, obj = setup_step(teacher_dir, "softmax + 0.5 * distill + 0.5 * cwcl(tower=text)")
    axis = sharding.batch_axes(mesh)
    spec = LossSpec("softmax", objective=obj)

    def in_step(params, t_params, microbatches):
        return loss_and_grads(run.graphdef, params, run.rest, batch, loss=spec, mesh=mesh, axis=axis,
                              microbatches=microbatches, frozen_teacher=train_teacher.Bound(teacher, t_params))

    def outside(params, t_params):  # the teacher's model run by hand, its outputs as constants
        model = nnx.merge(teacher.graphdef, t_params, teacher.rest)
        t_emb = {"image": model.embed_images(batch["image"]), "text": model.embed_texts(batch["text"])}
        t_emb, t_scale = jax.lax.stop_gradient((t_emb, model.scale()))

        def loss(p):
            m = nnx.merge(run.graphdef, p, run.rest)
            return losses.combined_loss(obj, m.embed_images(batch["image"]), m.embed_texts(batch["text"]), m.scale(),
                                        m.bias[...] if m.bias is not None else 0.0, teacher=t_emb,
                                        teacher_scale=t_scale, mesh=mesh, axis=axis, impl="dense")
        return jax.value_and_grad(loss)(params)

    params = run.state.params
    value_1, aux, grads_1 = jax.jit(in_step, static_argnums=2)(params, t_params, 1)
    value_k, _, grads_k = jax.jit(in_step, static_argnums=2)(params, t_params, 2)
    value_ref, grads_ref = jax.jit(outside)(params, t_params)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    assert float(aux["terms"]["loss/distill"]) > 1e-4  # another model: a real KL
    assert rel_err(value_1, value_ref) <= 1e-5 and rel_err(flat(grads_1), flat(grads_ref)) <= 1e-4
    assert rel_err(value_k, value_1) <= 1e-5 and rel_err(flat(grads_k), flat(grads_1)) <= 1e-4  # GradCache
    # No gradient reaches the teacher: the loss is constant in its parameters.
    d_teacher = jax.jit(jax.grad(lambda t: in_step(params, t, 2)[0]))(t_params)
    assert np.max(np.abs(flat(d_teacher))) == 0.0


def test_the_step_takes_the_teacher_as_an_argument_and_never_changes_it(teacher_dir):
    config, run, teacher, t_params, batch, mesh, obj = setup_step(teacher_dir, DISTILL)
    run.teacher = (teacher, t_params)
    step_fn = make_step_fn(run, sharding.batch_sharding(mesh))
    lowered = step_fn.lower(run.state, batch)
    n_teacher = len(jax.tree.leaves(t_params))
    n_args = len(jax.tree.leaves(run.state)) + len(jax.tree.leaves(batch)) + n_teacher
    assert len(jax.tree.leaves(lowered.args_info)) == n_args  # the teacher: parameters of the program, not constants
    before = jax.tree.map(np.asarray, t_params)
    compiled = lowered.compile()
    state = run.state
    for _ in range(2):
        state, metrics = compiled(state, batch)
    assert float(metrics["loss/distill"]) > 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t_params), before)
    # Perturbing the teacher changes the step through the distill term only.
    shifted = jax.tree.map(lambda x: x + 0.3, t_params)
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=run.state_shardings)  # the step donates it
    _, m_same = train_teacher.BoundStep(step_fn.jitted, t_params)(copy(state), batch)
    _, m_moved = train_teacher.BoundStep(step_fn.jitted, shifted)(copy(state), batch)
    assert float(m_moved["loss/sigmoid"]) == pytest.approx(float(m_same["loss/sigmoid"]), rel=1e-6)
    assert float(m_moved["loss/distill"]) != pytest.approx(float(m_same["loss/distill"]), rel=1e-3)


def test_the_teacher_sees_the_students_pixels_in_its_own_convention_and_size():
    student_pp = "decode|resize(16)|value_range(-1, 1)"
    teacher_pp = "decode|resize(8)|normalize(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))"
    model = {"image": {"image_size": 8}, "text": {"max_len": 8}}
    record = frozen.TeacherRecord("w", model, teacher_pp, "demo", True, 8)
    mapping = frozen.input_map(record, student_pp)
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
    x_student = device_normalization(student_pp)(pixels)
    want = jax.image.resize(device_normalization(teacher_pp)(pixels), (2, 8, 8, 3), "bilinear", antialias=True)
    np.testing.assert_allclose(mapping(x_student), want, rtol=1e-5, atol=1e-5)
    same = frozen.input_map(dataclasses.replace(record, pp=student_pp, model={"image": {"image_size": 16}}), student_pp)
    np.testing.assert_array_equal(same(x_student), x_student)  # same convention and size: untouched


@pytest.mark.parametrize("teacher, words", [
    (dict(step=1), "needs workdir"),
    (dict(workdir="/nonexistent/teacher"), "does not exist"),
    (dict(workdir="{empty}"), "holds no checkpoint"),
    (dict(workdir="{teacher}", colour=1), "unknown key"),
    (dict(workdir="{teacher}", step=-2), "non-negative"),
])
def test_a_bad_frozen_teacher_is_one_sentence(teacher_dir, tmp_path, teacher, words):
    teacher = {k: v.format(teacher=teacher_dir, empty=tmp_path) if isinstance(v, str) else v
               for k, v in teacher.items()}
    with pytest.raises(BigContrastError, match=words):
        validate(tiny_config(loss_objective=DISTILL, teacher=teacher), 8)


def test_a_teacher_that_cannot_read_the_students_tokens_is_one_sentence(teacher_dir):
    config = student(teacher_dir)
    config.data.tokenizer = "bytes"
    with pytest.raises(ConfigError, match="cannot read the student's tokens"):
        validate(config, 8)
    config.loss_objective = "sigmoid + 0.5 * cwcl(tower=image)"  # the image tower alone: fine
    validate(config, 8)


def test_a_teacher_ema_that_the_run_lacks_is_one_sentence(teacher_dir):
    mesh = sharding.make_mesh((("data", 8), ("fsdp", 1), ("tensor", 1)))
    with pytest.raises(ConfigError, match="holds no EMA"):
        train_teacher.load_for_run(student(teacher_dir, ema=True), mesh, losses.parse_objective(DISTILL))


def test_a_momentum_teacher_of_frozen_towers_is_one_sentence():
    config = tiny_config(loss_objective="sigmoid + 0.5 * cwcl(tower=image)", teacher="ema", ema=dict(decay=0.9))
    config.model.lock_image = True
    with pytest.raises(ConfigError, match="its EMA is the tower itself"):
        validate(config, 8)
    config.model.lock_image = False
    validate(config, 8)


@pytest.mark.slow
def test_training_with_a_frozen_teacher_records_it_and_resumes_exactly(teacher_dir, tmp_path):
    config = student(teacher_dir)
    config.update(total_steps=4, checkpoint_every=2)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False, stop_after_steps=2)
    train(config, tmp_path / "b", progress=False)
    rows = {d: [r for r in read_metrics(tmp_path / d) if "loss" in r] for d in "ab"}
    assert [r["step"] for r in rows["a"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows["b"]][-2:], [r["loss"] for r in rows["a"]][-2:], rtol=1e-5)
    assert all(r["loss/distill"] > 0 for r in rows["a"])
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["teacher"]
    assert recorded == dict(workdir=str(teacher_dir.resolve()), step=1, ema=False)
    # The teacher is not in the student's checkpoints.
    ckpt = Checkpointer(tmp_path / "a" / "checkpoints", async_save=False)
    state, _ = ckpt.restore_arrays()
    ckpt.close()
    assert set(state) == {"step", "params", "opt_state"}


# ----------------------------------------------------------------------------- precomputed columns


@pytest.fixture(scope="module")
def teacher_shards(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("with_teacher")
    from big_contrast.data.teacher_columns import write_teacher_columns

    summary = write_teacher_columns(dict(kind="demo", split="train", size=40, image_size=32), teacher_dir, str(out),
                                    batch_size=16, examples_per_shard=25)
    return out, summary


def test_teacher_columns_hold_the_teachers_embeddings_of_each_record(teacher_dir, teacher_shards):
    from big_contrast.data.image_ops import parse_image_pp
    from big_contrast.data.sources import open_source
    from big_contrast.data.tokenizer import encode_fixed, make_tokenizer

    out, summary = teacher_shards
    assert summary["records"] == 40 and summary["skipped"] == 0 and len(summary["shards"]) == 2
    assert summary["dim"] == 24 and summary["step"] == 1
    written = open_source("w", dict(kind="array_record", path=str(out)))
    original = open_source("o", dict(kind="demo", split="train", size=40, image_size=32))
    record = frozen.read_record(teacher_dir)
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])
    teacher, params = frozen.load_teacher(record, mesh, towers=("image", "text"), student_pp=record.pp)
    for i in (0, 17, 39):
        got, raw = written[i], original[i]
        assert got["image"] == raw["image"] and got["captions"] == raw["captions"]
        assert got["label/shape"] == raw["label/shape"]  # the other fields kept
        image = parse_image_pp(record.pp)(raw["image"], None)[None]
        text = encode_fixed(make_tokenizer(record.tokenizer, record.lowercase), raw["captions"][0], record.max_len)[None]
        want, _ = frozen.embed(teacher, params, image, text)
        np.testing.assert_allclose(got["teacher_image"], np.asarray(want["image"][0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["teacher_text"], np.asarray(want["text"][0]), rtol=1e-5, atol=1e-6)


def test_the_pipeline_carries_the_teacher_columns_into_the_batch(teacher_shards):
    from big_contrast.data import make_pipeline

    out, _ = teacher_shards
    config = tiny_config().data
    config.sources = {"teacher": dict(kind="array_record", path=str(out))}
    config.vector_keys = ("teacher_image", "teacher_text")
    config.batch_size, config.min_seen = 8, 1
    with make_pipeline(config, None, train=True, global_batch_size=8) as batches:
        batch = next(batches)
    assert batch["teacher_image"].shape == (8, 24) and batch["teacher_image"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch["teacher_text"], axis=1), 1.0, rtol=1e-5)


def test_teacher_columns_go_to_a_bucket_and_read_back_from_it(teacher_dir, teacher_shards, gcs_emulator):
    from big_contrast.data.sources import open_source
    from big_contrast.data.teacher_columns import write_teacher_columns

    out = f"{gcs_emulator}/with_teacher"
    summary = write_teacher_columns(dict(kind="demo", split="train", size=40, image_size=32), teacher_dir, out,
                                    batch_size=16, examples_per_shard=25)
    assert summary["records"] == 40 and [s.rsplit("/", 1)[0] for s in summary["shards"]] == [out, out]
    local, _ = teacher_shards
    from_bucket = open_source("b", dict(kind="array_record", path=out))
    from_disk = open_source("l", dict(kind="array_record", path=str(local)))
    assert len(from_bucket) == 40
    for i in (0, 39):
        np.testing.assert_array_equal(from_bucket[i]["teacher_text"], from_disk[i]["teacher_text"])
    with pytest.raises(ConfigError, match="new folder"):  # a second write into the same folder
        write_teacher_columns(dict(kind="demo", split="train", size=4, image_size=32), teacher_dir, out)


def test_teacher_data_without_the_columns_is_one_sentence():
    with pytest.raises(ConfigError, match="vector_keys"):
        validate(tiny_config(loss_objective=DISTILL, teacher="data"), 8)


@pytest.mark.slow
def test_training_from_teacher_columns_on_the_demo_data(teacher_shards, tmp_path):
    out, _ = teacher_shards
    config = tiny_config(loss_objective=DISTILL, teacher="data", total_steps=2)
    config.data.sources = {"teacher": dict(kind="array_record", path=str(out))}
    config.data.vector_keys = ("teacher_image", "teacher_text")
    config.data.min_seen = 1
    train(config, tmp_path, progress=False)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/distill"] > 0 for r in rows)


def test_plan_counts_the_frozen_teachers_parameters_and_forward_activations(teacher_dir):
    from big_contrast import models
    from big_contrast.train.plan import format_plan, plan

    config = student(teacher_dir)
    config.mesh, config.microbatch_size = (("data", 2), ("fsdp", 4), ("tensor", 1)), 2
    p = plan(config, device_memory_bytes=2**30, num_devices=8)
    alone = plan(tiny_config(), device_memory_bytes=2**30, num_devices=8)
    teacher_params = models.num_params(models.abstract_model(teacher_config().model))
    assert p["teacher_params"] == teacher_params != p["params"]["total"]
    assert 0 < p["teacher_param_bytes"] < 4 * teacher_params  # sharded over fsdp like the student's towers
    assert p["teacher_activation_bytes"] > 0
    assert "frozen teacher" in format_plan(p) and "frozen teacher" not in format_plan(alone)


# Compiles many train steps (about 1-3 min on a cold cache): run by `make test-slow`, keeping `make test` short.
pytestmark = pytest.mark.slow
