"""The streaming pipeline (data/streaming/): tar framing, exact resume on any process count,
disjoint per-process reads, mixtures, a bucket larger than the disk budget, and bad input
(corrupt / truncated shards, missing captions, deleted objects, 5xx and slow responses)."""

import io
import json
import os
import tarfile
import time
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_contrast import paths
from big_contrast.data.config import default_data_config
from big_contrast.data.errors import TooManySkippedError
from big_contrast.data.pipeline import make_pipeline
from big_contrast.data.streaming import merge_states
from big_contrast.data.streaming.tar import iter_samples, sample_from_bytes
from big_contrast.data.tarshards import iter_tar_samples
from big_contrast.errors import ConfigError
from fault_proxy import FaultProxy


def _jpeg(rng, size=16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def tar_shard(shard: int, per_shard: int, *, no_caption=(), long_names=False, seed=0,
              tar_format=tarfile.PAX_FORMAT) -> bytes:
    """One img2dataset-style shard: NNNN.jpg + NNNN.txt + NNNN.json per sample."""
    rng = np.random.default_rng([seed, shard])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}" + ("_" + "x" * 120 + "é" if long_names else "")
            members = [("jpg", _jpeg(rng)), ("json", json.dumps({"key": key}).encode())]
            if i not in no_caption:
                members.insert(1, ("txt", f"a photo from shard {shard} number {i}".encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_shards(root: str, n_shards: int, per_shard: int, **kwargs) -> list[str]:
    urls = []
    for s in range(n_shards):
        url = f"{root}/{s:05d}.tar"
        paths.write_bytes(url, tar_shard(s, per_shard, seed=zlib.crc32(root.encode()), **kwargs))
        urls.append(url)
    return urls


def stream_config(sources: dict, *, batch=16, streams=4, buffer=8, interleave=2, **streaming):
    config = default_data_config()
    config.sources = ml_collections.ConfigDict({k: {"kind": "stream", **v} for k, v in sources.items()})
    config.batch_size, config.pp_train = batch, "decode|resize(16)|value_range(-1, 1)"
    config.tokenizer, config.max_len = "bytes", 40  # distinct captions give distinct tokens
    config.streaming.num_streams, config.streaming.shuffle_buffer = streams, buffer
    config.streaming.interleave = interleave
    for key, value in streaming.items():
        config.streaming[key] = value
    return config


def batches(config, n, *, process_index=0, process_count=1, state=None):
    """n per-process batches (numpy) and the iterator, after `set_state(state)` if given."""
    it = make_pipeline(config, process_index=process_index, process_count=process_count)
    if state is not None:
        it.set_state(json.loads(json.dumps(state)))  # through JSON, as a checkpoint stores it
    out = [next(it) for _ in range(n)]
    return out, it


def global_batches(config, n, process_count, state):
    """The global batches of `process_count` simulated processes, rows concatenated in order."""
    per_process = [batches(config, n, process_index=p, process_count=process_count, state=state)
                   for p in range(process_count)]
    for _, it in per_process:
        it.close()
    return [{key: np.concatenate([b[t][key] for b, _ in per_process]) for key in ("image", "text")}
            for t in range(n)]


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_framing_matches_tarfile_and_every_span_reparses_alone(tar_format):
    # long, non-ASCII names: pax 'x' headers, or GNU 'L' long-name members
    data = tar_shard(3, 5, long_names=True, tar_format=tar_format)
    ours = list(iter_samples(io.BytesIO(data)))
    path = "/dev/shm" if os.path.isdir("/dev/shm") else None
    reference = [r for r in iter_tar_samples_from(data, path)]
    assert [s.key for s in ours] == [r["key"] for r in reference]
    for sample in ours:
        again = sample_from_bytes(data[sample.start:sample.end], sample.start)
        assert again.key == sample.key and again.files == sample.files


def iter_tar_samples_from(data, folder):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".tar", dir=folder) as f:
        f.write(data)
        f.flush()
        yield from iter_tar_samples(f.name)


def test_resume_is_exact_and_restores_on_another_process_count(tmp_path):
    web = write_shards(str(tmp_path / "web"), 8, 12)
    curated = write_shards(str(tmp_path / "cur"), 4, 10)
    config = stream_config({"web": {"path": str(tmp_path / "web"), "weight": 3.0},
                            "curated": {"path": curated, "weight": 1.0}})
    assert len(web) == 8
    uninterrupted, it = batches(config, 14)  # past one epoch of both sources
    it.close()
    first, it = batches(config, 6)
    saved = it.get_state()
    it.close()
    assert_same(first, uninterrupted[:6])
    resumed, it = batches(config, 8, state=saved)
    it.close()
    assert_same(resumed, uninterrupted[6:])
    assert_same(global_batches(config, 8, 2, saved), uninterrupted[6:])  # 1 process -> 2
    assert_same(global_batches(config, 8, 4, saved), uninterrupted[6:])  # 1 process -> 4
    # Saved by 2 processes (each its own streams, merged as the checkpoint does) -> 1 process.
    halves = [batches(config, 6, process_index=p, process_count=2) for p in range(2)]
    merged = merge_states([it.get_state() for _, it in halves])
    for _, it in halves:
        it.close()
    again, it = batches(config, 8, state=merged)
    it.close()
    assert_same(again, uninterrupted[6:])


def test_layouts_that_cannot_be_host_independent_are_refused_with_a_sentence(tmp_path):
    write_shards(str(tmp_path), 4, 4)
    config = stream_config({"web": {"path": str(tmp_path)}}, streams=4, batch=24)
    with pytest.raises(ConfigError, match="num_streams=4 does not divide over 3 processes"):
        make_pipeline(config, process_index=0, process_count=3)
    config.batch_size = 18
    with pytest.raises(ConfigError, match="not a multiple of data.streaming.num_streams=4"):
        make_pipeline(config, process_index=0, process_count=1)
    config.batch_size, config.streaming.num_streams = 16, 8
    with pytest.raises(ConfigError, match="4 shards, fewer than data.streaming.num_streams=8"):
        make_pipeline(config, process_index=0, process_count=1)
    mixed = stream_config({"web": {"path": str(tmp_path)}})
    mixed.sources["demo"] = {"kind": "demo", "size": 100}
    with pytest.raises(ConfigError, match="mixes kind='stream'"):
        make_pipeline(mixed, process_index=0, process_count=1)


def test_skip_counts_carry_over_to_another_process_count(tmp_path):
    """Each stream's counts travel with its state: restored on 1 -> 2 processes and 2 -> 1, the
    processes' counts add up to those of the uninterrupted run, not restart at zero."""
    write_shards(str(tmp_path), 8, 12, no_caption=(2, 7))
    config = stream_config({"web": {"path": str(tmp_path)}})

    def counts(iterators):
        totals = {}
        for it in iterators:
            for key, value in it.skip_counts().items():
                totals[key] = totals.get(key, 0) + value
            it.close()
        return totals

    _, it = batches(config, 9)
    want = counts([it])
    assert want["seen/web"] >= 9 * 16 and want["skipped/web/empty_caption"] >= 2
    _, it = batches(config, 4)
    saved = it.get_state()
    it.close()
    assert counts([batches(config, 5, process_index=p, process_count=2, state=saved)[1] for p in range(2)]) == want
    halves = [batches(config, 4, process_index=p, process_count=2) for p in range(2)]
    merged = merge_states([it.get_state() for _, it in halves])
    for _, it in halves:
        it.close()
    assert counts([batches(config, 5, state=merged)[1]]) == want


def test_a_mixture_draws_sources_by_weight(tmp_path):
    write_shards(str(tmp_path / "a"), 4, 30)
    write_shards(str(tmp_path / "b"), 4, 30)
    config = stream_config({"a": {"path": str(tmp_path / "a"), "weight": 3.0},
                            "b": {"path": str(tmp_path / "b"), "weight": 1.0}}, batch=32)
    _, it = batches(config, 10)
    counts = it.skip_counts()
    it.close()
    share = counts["seen/a"] / (counts["seen/a"] + counts["seen/b"])
    assert counts["seen/a"] + counts["seen/b"] == 320
    assert 0.68 < share < 0.82, share  # 0.75 +- 3 standard deviations of 320 draws


def test_bad_shards_and_samples_are_counted_and_the_run_goes_on(tmp_path):
    root = str(tmp_path)
    write_shards(root, 8, 10, no_caption=(2, 5))
    with open(f"{root}/00001.tar", "r+b") as f:  # a corrupt header in the middle of shard 1
        f.seek(512 * 12)
        f.write(b"\xff" * 200)
    with open(f"{root}/00002.tar", "r+b") as f:  # shard 2 cut inside a member
        f.truncate(4000)
    config = stream_config({"web": {"path": root}}, batch=8, streams=2)
    _, it = batches(config, 12)  # more than one epoch: every shard is reached
    counts = it.skip_counts()
    it.close()
    assert counts["skipped/web/empty_caption"] >= 2 * 6  # two per intact shard
    assert counts["skipped/web/corrupt_shard"] >= 1
    assert counts["skipped/web/truncated_tar_member"] >= 1
    assert counts["seen/web"] == 96 + sum(v for k, v in counts.items() if k.startswith("skipped/web/"))


def test_max_skip_fraction_still_stops_a_run_whose_data_is_broken(tmp_path):
    write_shards(str(tmp_path), 4, 10, no_caption=range(1, 10))
    config = stream_config({"web": {"path": str(tmp_path)}}, batch=8)
    config.min_seen, config.max_skip_fraction = 20, 0.5
    with pytest.raises(TooManySkippedError, match="'web' skipped .*empty_caption"):
        batches(config, 20)


def _disk_usage(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_a_bucket_larger_than_the_disk_budget_streams_and_each_process_reads_its_own_shards(
        gcs_emulator, tmp_path, monkeypatch):
    # The per-host disk budget: every folder a reader could write to, capped at 32 KiB (the
    # dataset is ~8x larger); the pipeline must not copy anything there.
    budget = 32 << 10
    scratch = tmp_path / "host-disk"
    scratch.mkdir()
    for name in ("TMPDIR", "BIG_CONTRAST_CACHE", "HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(scratch))
    shards = write_shards(f"{gcs_emulator}/web", 8, 8)
    total = sum(paths.parse(s).stat().length for s in shards)
    assert total > 6 * budget  # ~240 KiB
    # chunk 8 KiB, read ahead 1: one epoch of 8 shards x 8 records = 64 records, 2 batches of 32
    config = stream_config({"web": {"path": f"{gcs_emulator}/web"}}, batch=32, streams=4, buffer=0,
                           chunk_bytes=8 << 10, read_ahead=1)
    reads = []
    for p in range(2):
        _, it = batches(config, 2, process_index=p, process_count=2)
        reads.append(it.read_stats())
        it.close()
        assert _disk_usage(scratch) <= budget
    mine = [set(r["objects"]) for r in reads]
    assert not mine[0] & mine[1]  # no process reads another's shards
    assert mine[0] | mine[1] == set(shards)  # together: the dataset
    assert sum(r["bytes"] for r in reads) <= total  # once, not copied nor read twice
    assert _disk_usage(scratch) == 0


@pytest.fixture
def proxied_bucket(gcs_emulator, gcs_server, monkeypatch):
    """(bucket URL, proxy): every gs:// request of the pipeline goes through the fault proxy."""
    shards = write_shards(f"{gcs_emulator}/web", 8, 4)
    with FaultProxy(upstream=gcs_server) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
        paths.configure_emulator()  # new endpoint: drops the clients bound to the emulator
        yield gcs_emulator, shards, proxy
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    paths.configure_emulator()


def test_transient_5xx_and_slow_responses_are_retried_and_change_nothing(proxied_bucket):
    bucket, shards, proxy = proxied_bucket
    config = stream_config({"web": {"path": f"{bucket}/web"}}, batch=8, streams=4, buffer=4,
                           chunk_bytes=4 << 10, timeout_s=1.0, retries=3, backoff_s=0.05)
    clean, it = batches(config, 4)
    it.close()
    proxy.fail("web/00001.tar", times=1, status=503)
    proxy.delay("web/00002.tar", times=1, seconds=3.0)  # longer than timeout_s: asked again
    start = time.monotonic()
    faulty, it = batches(config, 4)
    counts = it.skip_counts()
    it.close()
    assert proxy.injected["web/00001.tar"] == 1 and proxy.injected["web/00002.tar"] == 1
    assert time.monotonic() - start < 20
    assert_same(faulty, clean)
    assert sum(v for k, v in counts.items() if k.startswith("skipped/web/")) == 0


def test_a_shard_that_keeps_failing_or_disappears_is_skipped_and_counted(proxied_bucket):
    bucket, shards, proxy = proxied_bucket
    config = stream_config({"web": {"path": f"{bucket}/web"}}, batch=8, streams=2, buffer=0, interleave=1,
                           chunk_bytes=2 << 10, read_ahead=1, timeout_s=1.0, retries=1, backoff_s=0.05)
    proxy.fail("web/00003.tar", times=40, status=503)  # more than every retry of every layer
    _, it = batches(config, 1)
    open_shards = [shard for stream in it.get_state()["grain"]["streams"].values()
                   for shard, _ in stream["sources"][0]["open"]]
    victim = shards[next(i for i in open_shards if i != 3)]
    paths.parse(victim).unlink()  # deleted while stream 0 is reading it
    start = time.monotonic()
    for _ in range(6):  # more than one epoch of 32 records: every shard is reached
        next(it)
    counts = it.skip_counts()
    it.close()
    assert time.monotonic() - start < 40
    assert counts["skipped/web/missing_shard"] >= 1
    assert counts["skipped/web/unreadable_shard"] >= 1


def test_converted_tar_shards_stream_with_the_bad_records_counted_once(tmp_path):
    from big_contrast.data.streaming.write import convert_to_tar_shards

    inputs = write_shards(str(tmp_path / "raw"), 2, 10, no_caption=(3,))
    summary = convert_to_tar_shards(inputs, str(tmp_path / "out"), examples_per_shard=6)
    assert summary.written == 18 and summary.skipped["empty_caption"] == 2
    assert [os.path.basename(s) for s in summary.shards] == [f"data-0000{i}-of-00003.tar" for i in range(3)]
    config = stream_config({"web": {"path": str(tmp_path / "out")}}, batch=6, streams=3, buffer=0)
    out, it = batches(config, 3)  # one epoch (no buffer to blur its end): each record once
    counts = it.skip_counts()
    it.close()
    assert counts["seen/web"] == 18 and counts["skipped/empty_caption"] == 0
    assert len({row.tobytes() for batch in out for row in batch["text"]}) == 18


def test_the_training_loop_checkpoints_the_stream_state_and_reports_its_skip_counts(tmp_path):
    """One short run through the loop, stopped after 3 steps: the checkpoint's data state
    resumes a fresh pipeline at batch 4 exactly, and metrics.jsonl carries the stream source's
    counts. (The loop's own resume is this state through `set_state`, as for grain.)"""
    from big_contrast.train import train
    from big_contrast.train.metrics import read_metrics
    from test_train import tiny_config

    write_shards(str(tmp_path / "web"), 8, 12, no_caption=(4,))
    config = tiny_config(total_steps=6, checkpoint_every=100)
    config.data.sources = ml_collections.ConfigDict({"web": {"kind": "stream", "path": str(tmp_path / "web")}})
    config.data.streaming.num_streams, config.data.streaming.shuffle_buffer = 4, 8
    train(config, tmp_path / "run", progress=False, stop_after_steps=3)
    saved = json.loads((tmp_path / "run/checkpoints/3/meta/metadata").read_text())["data"]  # orbax JsonSave
    uninterrupted, it = batches(config.data, 4)
    it.close()
    resumed, it = batches(config.data, 1, state=saved)
    it.close()
    assert_same(resumed, uninterrupted[3:])
    rows = [r for r in read_metrics(tmp_path / "run") if "seen/web" in r]
    assert rows and rows[-1]["seen/web"] >= 3 * 32 and rows[-1]["skipped/web/empty_caption"] >= 1


_GATHER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from big_contrast.data.streaming.pipeline import gather_states
p = jax.process_index()
local = {"grain": {"kind": "streaming", "streams": {str(2 * p + i): {"at": [p] * (3 + 40 * p)} for i in range(2)}},
         "skips": {"p": p}, "emitted": 5}
print("STATE" + json.dumps(gather_states(local)), flush=True)
jax.distributed.shutdown()
"""


def test_global_state_gathers_every_process_streams_over_jax_distributed(tmp_path):
    import subprocess
    import sys

    from cloud_fixtures import free_port

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER, f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    states = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:]
        states.append(json.loads(next(line for line in out.splitlines() if line.startswith("STATE"))[5:]))
    assert states[0] == states[1]  # every process holds the whole state
    assert sorted(states[0]["grain"]["streams"], key=int) == ["0", "1", "2", "3"]
    assert states[0]["grain"]["streams"]["3"] == {"at": [1] * 43}


def test_shards_stream_from_s3_too(s3_emulator):
    write_shards(f"{s3_emulator}/web", 4, 6)
    config = stream_config({"web": {"path": f"{s3_emulator}/web/*.tar"}}, batch=8, streams=4, buffer=0)
    out, it = batches(config, 3)  # one epoch: 24 records
    counts = it.skip_counts()
    it.close()
    assert counts["seen/web"] == 24 and len({row.tobytes() for b in out for row in b["text"]}) == 24


def test_a_stream_whose_shards_are_all_gone_stops_with_a_sentence_instead_of_spinning(tmp_path):
    shards = write_shards(str(tmp_path), 4, 4)
    config = stream_config({"web": {"path": str(tmp_path)}}, batch=8, streams=4)
    it = make_pipeline(config, process_index=0, process_count=1)
    for shard in shards:
        os.remove(shard)
    with pytest.raises(ConfigError, match=r"stream \d gave a usable record in epoch 0 .*missing_shard.*cannot fill"):
        next(it)
    it.close()


def test_skip_counts_saved_before_the_streaming_reasons_existed_still_restore():
    from big_contrast.data.errors import SKIP_REASONS, SkipCounter

    counter = SkipCounter(["a"])
    counter.set_state({"seen": [10], "skipped": [[1, 0, 2, 0, 3]]})  # 5 reasons, as saved before
    assert counter.skipped.shape == (1, len(SKIP_REASONS)) and counter.counts()["skipped/a/truncated_tar_member"] == 3
