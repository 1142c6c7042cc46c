"""EMA of the parameters in the train state: updated by the step, checkpointed, exact on resume;
a config that turns EMA on over a run whose checkpoints have none fails with one sentence."""

import jax
import numpy as np
import pytest

from big_contrast.checkpoint import Checkpointer
from big_contrast.errors import ConfigError, ConfigMismatch
from big_contrast.train import train, validate
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import CHECKPOINTS

from test_train import tiny_config  # noqa: E402  (tests/ is on sys.path)

EMA = dict(decay=0.5, start_step=2, every=2)


def saved_state(workdir):
    ckpt = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    try:
        return ckpt.restore_arrays()
    finally:
        ckpt.close()


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema_straight")
    train(tiny_config(total_steps=6, checkpoint_every=100, ema=EMA), workdir, progress=False)
    return workdir


def test_the_ema_is_checkpointed_and_differs_from_the_parameters(straight):
    (state, step) = saved_state(straight)
    assert step == 6 and "ema" in state
    leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
    assert jax.tree.structure(state["ema"]) == jax.tree.structure(state["params"])
    differ = [not np.allclose(e, p) for e, p in zip(leaves(state["ema"]), leaves(state["params"]))]
    assert any(differ)  # decay 0.5 over 6 steps: the average lags the parameters


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path, straight):
    config = tiny_config(total_steps=6, checkpoint_every=100, ema=EMA)
    train(config, tmp_path, progress=False, stop_after_steps=3)  # stopped between two EMA updates
    train(config, tmp_path, progress=False)
    assert sorted(losses(tmp_path)) == list(range(1, 7))  # resumed, not restarted
    for step, value in losses(straight).items():
        np.testing.assert_allclose(losses(tmp_path)[step], value, rtol=1e-5, err_msg=str(step))
    (a, _), (b, _) = saved_state(straight), saved_state(tmp_path)
    for x, y in zip(jax.tree.leaves(a["ema"]), jax.tree.leaves(b["ema"])):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def test_turning_ema_on_over_a_checkpoint_without_one_is_one_sentence(tmp_path):
    train(tiny_config(total_steps=4, checkpoint_every=100), tmp_path, progress=False, stop_after_steps=2)
    with pytest.raises(ConfigMismatch, match="config.ema is on but the checkpoint of step 2"):
        train(tiny_config(total_steps=4, checkpoint_every=100, ema=EMA), tmp_path, progress=False)
    train(tiny_config(total_steps=4, checkpoint_every=100), tmp_path, progress=False)  # EMA off: resumes


@pytest.mark.parametrize("ema, words", [(dict(decay=1.0), "decay"), (dict(every=0), "every"),
                                        (dict(decai=0.9), "unknown field")])
def test_a_bad_ema_config_is_one_sentence(ema, words):
    with pytest.raises(ConfigError, match=words):
        validate(tiny_config(ema=ema), 8)
