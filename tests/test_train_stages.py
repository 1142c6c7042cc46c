"""Training stages (train/stages.py): validation sentences, stage lookup, per-stage configs,
and the learning rate over the run or restarted per stage against a hand-written formula."""
import math

import numpy as np
import pytest

from big_contrast.train import default_config, stages

SHARDS = 8
PP_16 = "decode|resize(16)|value_range(-1, 1)"


def base_config(**fields):
    config = default_config()
    config.model.image.update(variant="mu/8", image_size=32)
    config.model.text.update(variant="mu", max_len=16)
    config.data.max_len = 16
    config.batch_size = 64
    config.total_steps = 100
    config.optimizer.update(lr=0.5, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    for key, value in fields.items():
        config[key] = value
    return config


def clipa_like(**last):
    """Low resolution, short text, bigger batch for 60 steps; then the base settings."""
    return (dict(until_step=60, image_size=16, max_len=8, batch_size=128, microbatch_size=4,
                 patch_dropout=0.5, pp_train=PP_16), dict(until_step=100, **last))


def test_a_config_without_stages_is_one_stage_of_itself():
    config = base_config()
    (only,) = stages.resolve_stages(config, SHARDS)
    assert (only.start_step, only.until_step, only.image_size, only.max_len) == (0, 100, (32, 32), 16)
    assert (only.batch_size, only.microbatch_size, only.patch_dropout) == (64, None, 0.0)
    assert only.pp_train == config.data.pp_train


def test_stage_at_names_the_stage_that_runs_the_next_step():
    resolved = stages.resolve_stages(base_config(stages=clipa_like()), SHARDS)
    assert [stages.stage_at(resolved, s).index for s in (0, 1, 59, 60, 61, 99, 100)] == [0, 0, 0, 1, 1, 1, 1]
    assert stages.boundaries(resolved) == (60,)
    # A checkpoint at the boundary holds the first stage's shapes; resuming runs the second.
    assert [stages.stage_that_saved(resolved, s).index for s in (0, 1, 60, 61, 100)] == [0, 0, 0, 1, 1]
    assert [s.num_steps for s in resolved] == [60, 40]


def test_each_stage_overrides_only_what_it_sets():
    config = base_config(stages=clipa_like())
    low, full = stages.resolve_stages(config, SHARDS)
    assert (low.image_size, low.max_len, low.batch_size, low.microbatch_size, low.patch_dropout) == \
        ((16, 16), 8, 128, 4, 0.5)
    assert (full.image_size, full.max_len, full.batch_size, full.microbatch_size, full.patch_dropout) == \
        ((32, 32), 16, 64, None, 0.0)
    low_config = stages.stage_config(config, low)
    assert low_config.model.image.image_size == 16 and low_config.model.image.patch_dropout == 0.5
    assert (low_config.data.max_len, low_config.batch_size, low_config.data.batch_size) == (8, 128, 128)
    assert low_config.microbatch_size == 4 and low_config.data.pp_train == PP_16
    assert config.model.image.image_size == 32 and config.batch_size == 64  # the base is untouched
    assert stages.stage_config(config, full).data.pp_train == config.data.pp_train
    (wide,) = stages.resolve_stages(base_config(stages=(dict(until_step=100, image_size=(16, 24),
                                                             pp_train=PP_16),)), SHARDS)
    assert stages.stage_config(config, wide).model.image.image_size == (16, 24)


@pytest.mark.parametrize("given,sentence", [
    ((dict(until_step=60), dict(until_step=60)),
     r"config.stages\[1\].until_step=60 must be an int above the previous stage's 60"),
    ((dict(until_step=60), dict(until_step=90)),
     r"config.stages\[1\].until_step=90 is the last stage's end and must equal config.total_steps=100"),
    ((dict(until_step=100), dict(until_step=120)),
     r"config.stages\[0\].until_step=100 is not below config.total_steps=100"),
    ((dict(until_step=0),), r"config.stages\[0\].until_step=0 must be an int above"),
    ((dict(image_size=16),), r"config.stages\[0\] has no until_step"),
    ((dict(until_step=100, image_sz=16),), r"config.stages\[0\] has unknown key 'image_sz'"),
    (("100",), r"config.stages\[0\]='100' must be a dict"),
    ((dict(until_step=100, batch_size=60),),
     r"config.stages\[0\].batch_size=60 does not divide over the 8 data-parallel devices"),
    ((dict(until_step=100, microbatch_size=3),),
     r"config.stages\[0\].microbatch_size=3 does not divide the per-device batch 8"),
    ((dict(until_step=100, image_size=20, pp_train=PP_16),),
     r"config.stages\[0\].image_size=20 is not a positive multiple of the patch size 8"),
    ((dict(until_step=100, image_size=(16, 24)),),
     r"config.stages\[0\] trains at image_size=\(16, 24\) but the base config at \(32, 32\); give the "
     r"stage its pp_train, e.g. 'decode\|resize\(16, 24\)\|value_range\(-1, 1\)'\."),
    ((dict(until_step=100, max_len=32),),
     r"config.stages\[0\].max_len=32 must be an int in \[2, config.model.text.max_len=16\]"),
    ((dict(until_step=100, patch_dropout=1.0),), r"config.stages\[0\].patch_dropout=1.0 must be in \[0, 1\)"),
])
def test_a_wrong_stage_fails_in_one_sentence_naming_the_key(given, sentence):
    with pytest.raises(ValueError, match=sentence):
        stages.resolve_stages(base_config(stages=given), SHARDS)


def test_an_unknown_lr_option_and_a_warmup_longer_than_a_stage_are_refused():
    with pytest.raises(ValueError, match="config.stage_lr_schedule='restart' is unknown"):
        stages.resolve_stages(base_config(stage_lr_schedule="restart"), SHARDS)
    config = base_config(stages=(dict(until_step=95), dict(until_step=100)), stage_lr_schedule="per_stage")
    with pytest.raises(ValueError, match=r"warmup_steps=10 is not shorter than stage 1 \(5 steps\)"):
        stages.resolve_stages(config, SHARDS)


def reference_lr(step, length, lr=0.5, warmup=10, alpha=0.1):
    """Linear warm-up from 0, then cosine from lr to alpha * lr over the rest of `length`."""
    if step < warmup:
        return lr * step / warmup
    t = min(step - warmup, length - warmup) / (length - warmup)
    return lr * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)))


def test_the_lr_runs_over_the_whole_run_across_boundaries():
    config = base_config(stages=clipa_like())
    schedule = stages.learning_rate_schedule(config, stages.resolve_stages(config, SHARDS))
    got = [float(schedule(s)) for s in range(101)]
    np.testing.assert_allclose(got, [reference_lr(s, 100) for s in range(101)], rtol=1e-5, atol=1e-7)


def test_the_lr_restarts_per_stage_when_asked():
    config = base_config(stages=clipa_like(), stage_lr_schedule="per_stage")
    schedule = stages.learning_rate_schedule(config, stages.resolve_stages(config, SHARDS))
    want = [reference_lr(s, 60) if s < 60 else reference_lr(s - 60, 40) for s in range(101)]
    np.testing.assert_allclose([float(schedule(s)) for s in range(101)], want, rtol=1e-5, atol=1e-7)
    assert float(schedule(60)) == 0.0 and float(schedule(59)) > 0.04  # warm-up again at the boundary


def test_stages_survive_the_config_copy_a_run_makes():
    config = base_config(stages=({"until_step": 40, "max_len": 4}, {"until_step": 100}))
    low, _ = stages.resolve_stages(config.copy_and_resolve_references(), SHARDS)
    assert (low.until_step, low.max_len) == (40, 4)
