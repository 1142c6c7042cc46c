"""The overlapped loop: NaN checks one step behind and before every save (and a real divergence),
prefetched batches with exact resume, a clean close of the prefetching thread, profiles."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.checkpoint import Checkpointer
from big_contrast.train import NonFiniteLoss, train, validate
from big_contrast.train import loop as train_loop
from big_contrast.train.metrics import read_metrics
from big_contrast.train.prefetch import Prefetcher
from big_contrast.train.step import TrainState
from big_contrast.workdir import CHECKPOINTS

from test_train import final_params, tiny_config  # noqa: E402  (tests/ is on sys.path)


def rows_by_step(workdir):
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run, traced over steps 2..3."""
    workdir = tmp_path_factory.mktemp("straight")
    train(tiny_config(total_steps=6, checkpoint_every=100, profile_steps=(2, 3)), workdir, progress=False)
    return workdir


def test_profile_steps_write_a_trace_into_the_workdir(straight):
    traces = list((straight / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)


def test_resume_with_prefetched_batches_sees_the_batches_of_an_uninterrupted_run(tmp_path, straight):
    """Stopped after 2 steps with 3 batches prefetched ahead: the checkpoint holds the data state
    after batch 2, so the resumed steps 3..6 have the uninterrupted run's losses."""
    config = tiny_config(total_steps=6, checkpoint_every=100, prefetch_batches=3)
    train(config, tmp_path, progress=False, stop_after_steps=2)
    assert Checkpointer(tmp_path / CHECKPOINTS, async_save=False).all_steps() == [2]
    train(config, tmp_path, progress=False)
    # Resumed at step 2, not restarted: each step is logged once (a restart from step 0 would
    # log steps 1 and 2 again, with the same losses, since the run is deterministic).
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 7))
    expected, resumed = rows_by_step(straight), rows_by_step(tmp_path)
    for step in range(3, 7):
        np.testing.assert_allclose(resumed[step]["loss"], expected[step]["loss"], rtol=1e-5, err_msg=str(step))
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())  # joined on both exits


def poisoning_step(monkeypatch, after_step):
    """The loop's train step with NaN parameters written by step `after_step`'s update: that
    step's loss is finite, the state after it is not, the next step's loss is NaN."""
    real = train_loop.train_step

    def step(state, batch, **kwargs):
        new, metrics = real(state, batch, **kwargs)
        poison = new.step == after_step
        params = jax.tree.map(lambda p: jnp.where(poison, jnp.nan, p), new.params)
        return TrainState(new.step, params, new.opt_state), metrics

    monkeypatch.setattr(train_loop, "train_step", step)


def test_a_nan_loss_between_logs_stops_the_run_naming_its_step(tmp_path, monkeypatch):
    """Loss NaN at step 5 with logs every 10 steps: the check one step behind names step 5; the
    last checkpoint is step 3 (step 4's state is bad but was never due to be saved)."""
    poisoning_step(monkeypatch, after_step=4)
    with pytest.raises(NonFiniteLoss, match=r"The loss is nan at step 5; .*\(step 3\)"):
        train(tiny_config(total_steps=8, log_every=10, checkpoint_every=3), tmp_path, progress=False)
    assert Checkpointer(tmp_path / CHECKPOINTS, async_save=False).all_steps() == [3]
    assert not rows_by_step(tmp_path)  # nothing logged: the first log was due at step 8


def test_a_non_finite_state_with_a_finite_loss_is_never_checkpointed(tmp_path, monkeypatch):
    """Step 4's loss is finite but its update is NaN: the check before saving step 4 stops the
    run naming step 4, and step 2 stays the last checkpoint."""
    poisoning_step(monkeypatch, after_step=4)
    with pytest.raises(NonFiniteLoss, match=r"after step 4 hold NaN or Inf.*\(step 2\)"):
        train(tiny_config(total_steps=8, log_every=10, checkpoint_every=2), tmp_path, progress=False)
    assert Checkpointer(tmp_path / CHECKPOINTS, async_save=False).all_steps() == [2]
    _, params = final_params(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(total_steps=50, checkpoint_every=1)
    config.optimizer.update(lr=1e12, warmup_steps=0, grad_clip_norm=0.0, schedule="constant")
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+)") as error:
        train(config, tmp_path, progress=False)
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    ckpt = Checkpointer(tmp_path / CHECKPOINTS, async_save=False)
    assert ckpt.latest_step() == bad_step - 1
    _, params = final_params(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_loss_dtype_reaches_the_loss_engine_and_is_checked():
    assert train_loop.loss_spec(tiny_config()).dtype is None
    assert train_loop.loss_spec(tiny_config(loss_dtype="bfloat16")).dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"config.loss_dtype='fp8' is unknown"):
        validate(tiny_config(loss_dtype="fp8"), num_batch_shards=8)
    with pytest.raises(ValueError, match=r"config.profile_steps=\(3, 1\) must be \(N, M\)"):
        validate(tiny_config(profile_steps=(3, 1)), num_batch_shards=8)


class CountingData:
    """A data iterator stand-in: batch i is {'x': i}; its state is the number of batches made."""

    def __init__(self, fail_at=None):
        self.made, self.fail_at, self.closed = 0, fail_at, False

    def __next__(self):
        if self.made == self.fail_at:
            raise ValueError("source 'demo': too many skipped examples")
        self.made += 1
        return {"x": self.made - 1, "label": 0}

    def get_state(self):
        return {"made": self.made}

    def skip_counts(self):
        return {"seen/demo": self.made}

    def close(self):
        self.closed = True


def test_each_prefetched_batch_carries_the_data_state_after_it():
    data = CountingData()
    with Prefetcher(data, depth=3, fields=("x",)) as batches:
        got = [next(batches) for _ in range(4)]
    assert [b.arrays for b in got] == [{"x": i} for i in range(4)]
    assert [b.data_state["made"] for b in got] == [1, 2, 3, 4]
    assert data.made > 4  # the thread ran ahead of the consumer


def test_an_error_in_the_prefetching_thread_is_raised_by_next_and_close_joins_it():
    data = CountingData(fail_at=2)
    batches = Prefetcher(data, depth=2)
    assert [next(batches).arrays["x"] for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="too many skipped"):
        next(batches)
    batches.close()
    assert data.closed and not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_close_stops_a_thread_blocked_on_a_full_queue():
    data = CountingData()
    batches = Prefetcher(data, depth=1)
    next(batches)
    batches.close()
    assert data.closed and not any(t.name == "batch-prefetch" for t in threading.enumerate())
