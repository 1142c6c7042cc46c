"""The checkpointer on a tiny pytree: damaged steps are kept and never written over, async
save errors surface at the next save, a changed structure is named before any read."""

import resource
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.checkpoint import Checkpointer, abstract_like
from big_contrast.errors import CheckpointSaveFailed, ConfigMismatch, DamagedCheckpoint


def tree(value, n=8):
    return {"w": jnp.full((n, 16), float(value)), "b": jnp.zeros((16,))}


def meta(step):
    return {"step": step}


def truncate(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_step_is_skipped_kept_through_garbage_collection_and_never_written_over(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step in (1, 2):
        ckpt.save(step, tree(step), meta(step))
    ckpt.close()
    truncate(tmp_path / "2")
    warnings = []
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    state, restored_meta, step, _ = ckpt.restore_newest(abstract_like(tree(0)), warn=warnings.append)
    assert step == 1 and restored_meta == meta(1) and float(state["w"][0, 0]) == 1.0
    assert len(warnings) == 1 and "step 2" in warnings[0] and "trying step 1" in warnings[0]
    assert ckpt.save(2, tree(20), meta(2)) is False  # kept for inspection, not overwritten
    for step in (3, 4, 5):
        assert ckpt.save(step, tree(step), meta(step))
    assert ckpt.all_steps() == [2, 4, 5]  # keep=2 collected 1 and 3, never the damaged 2
    ckpt.close()


def test_a_changed_shape_is_a_config_mismatch_not_damage(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, tree(1), meta(1))
    with pytest.raises(ConfigMismatch, match=r"w has shape \(8, 16\) there and \(4, 16\) in this config"):
        ckpt.restore_newest(abstract_like(tree(0, n=4)))
    assert ckpt.damaged == set()
    ckpt.close()


def test_an_async_save_error_surfaces_at_the_next_save_and_the_previous_step_stays(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5, async_save=True)
    ckpt.save(1, tree(1), meta(1), wait=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as the CLI does
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # a quota the array data exceeds
    try:
        big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 1024)), jnp.float32), "b": jnp.zeros((16,))}
        ckpt.save(2, big, meta(2))  # async: returns before the write fails
        with pytest.raises(CheckpointSaveFailed) as error:
            ckpt.save(3, big, meta(3))
        message = str(error.value)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert f"Saving the checkpoint of step 2 in {tmp_path}" in message and "step 1 is intact" in message
    ckpt.close()
    ckpt = Checkpointer(tmp_path, async_save=False)
    state, _, step = ckpt.restore(abstract_like(tree(0)))
    assert step == 1 and np.all(np.asarray(state["w"]) == 1.0)
    ckpt.close()


def test_a_step_that_does_not_exist_is_a_file_not_found_sentence(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, tree(1), meta(1))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 .* available steps: \[1\]"):
        ckpt.restore(abstract_like(tree(0)), 7)
    truncate(tmp_path / "1")
    with pytest.raises(DamagedCheckpoint, match=r"No checkpoint in .* can be restored \(steps \[1\]"):
        ckpt.restore_newest(abstract_like(tree(0)), warn=lambda text: None)
    ckpt.close()
