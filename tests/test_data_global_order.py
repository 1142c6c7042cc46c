"""Training batches do not depend on the number of processes: the rows of every process,
stacked, are the one-process batch; `start_batch` continues the same order."""

import numpy as np

from big_contrast.data import default_data_config, make_pipeline


def batches(config, n, **kw):
    with make_pipeline(config, None, train=True, global_batch_size=16, **kw) as it:
        return [next(it) for _ in range(n)]


def small_config():
    config = default_data_config()
    config.sources.demo.size = 200
    return config


def test_two_processes_split_exactly_the_one_process_batches():
    config = small_config()
    single = batches(config, 3, process_index=0, process_count=1)
    halves = [batches(config, 3, process_index=p, process_count=2) for p in range(2)]
    for step in range(3):
        for field in ("image", "text"):
            stacked = np.concatenate([halves[0][step][field], halves[1][step][field]])
            np.testing.assert_array_equal(stacked, single[step][field])
    assert not np.array_equal(single[0]["text"], single[1]["text"])  # batches differ step to step


def test_start_batch_continues_the_same_order():
    config = small_config()
    straight = batches(config, 4, process_index=1, process_count=2)
    resumed = batches(config, 2, process_index=1, process_count=2, start_batch=2)
    for a, b in zip(straight[2:], resumed):
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_array_equal(a["image"], b["image"])
