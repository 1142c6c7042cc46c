"""The loop's throughput window: examples/s, step time and MFU from a fake clock."""

import pytest

from big_contrast.train import metrics


def test_throughput_reports_the_window_since_the_last_report(monkeypatch):
    clock = iter([10.0, 14.0, 14.0, 15.0, 15.0, 20.0, 21.0, 21.0])  # start, (report, restart) x 3
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    throughput = metrics.Throughput(batch_size=32, peak_flops_per_device=1e9)
    throughput.flops_per_step = 2e8
    for _ in range(4):
        throughput.step()
    first = throughput.report()  # 4 steps in 4 s
    assert first == pytest.approx({"examples_per_s": 32.0, "step_time_s": 1.0, "mfu": 0.2})
    throughput.step()
    second = throughput.report()  # 1 step in 1 s: the window restarted
    assert second == pytest.approx({"examples_per_s": 32.0, "step_time_s": 1.0, "mfu": 0.2})
    assert "mfu" not in metrics.Throughput(batch_size=32).report()  # no peak given: no MFU
