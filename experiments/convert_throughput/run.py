"""Records/s of `data convert` (serial vs Beam DirectRunner) and ArrayRecord read throughput
from a GCS emulator vs local disk; prints the README's table and a 400M-pair estimate.

    PYTHONPATH=. python experiments/convert_throughput/run.py [--shards 16 --per-shard 2000]

Inputs are webdataset tar shards of 256x256 JPEGs (random-noise images, quality 90, ~40 KB:
closer to web-photo sizes than flat colours) with a .txt caption. The conversion does what
the real one does per sample: tar parsing, a PIL header check, caption checks, record encoding
and an ArrayRecord write. Read throughput streams the converted shards' bytes through the path
layer (gcsfs for gs://), the way a reader over the path layer or a per-host cache would fetch them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from big_contrast import paths  # noqa: E402
from big_contrast.data.commands import convert  # noqa: E402


def make_shards(folder: str, shards: int, per_shard: int, size: int = 256) -> list[str]:
    rng = np.random.default_rng(0)
    files = []
    for s in range(shards):
        path = os.path.join(folder, f"shard-{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                pixels = rng.integers(0, 256, (size // 8, size // 8, 3), np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"a photo number {s}-{i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}/{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files.append(path)
    return files


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_all(urls: list[str]) -> int:
    total = 0
    for url in urls:
        with paths.parse(url).open("rb") as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=2000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="convert-throughput-")
    try:
        os.makedirs(os.path.join(work, "in"))
        inputs = make_shards(os.path.join(work, "in"), args.shards, args.per_shard)
        n = args.shards * args.per_shard
        mb = sum(os.path.getsize(p) for p in inputs) / 2**20
        print(f"{args.shards} tar shards x {args.per_shard} samples = {n} records, {mb:.0f} MiB, "
              f"{os.cpu_count()} cores")
        rows = []
        t = timed(lambda: convert(inputs, os.path.join(work, "serial"), examples_per_shard=args.per_shard,
                                  progress=False))
        rows.append(("serial (in-process)", t, 0.0, n / t))
        os.makedirs(os.path.join(work, "tiny"))
        tiny = [shutil.copy(inputs[0], os.path.join(work, "tiny", "one.tar"))]
        for workers in (1, 2):
            # Fixed cost of a DirectRunner job (worker start-up, pipeline set-up): one shard.
            startup = timed(lambda: convert(tiny, os.path.join(work, f"tiny{workers}"), runner="DirectRunner",
                                            workers=workers))
            startup -= args.per_shard / rows[0][3]  # less the one shard's own work
            out = os.path.join(work, f"beam{workers}")
            t = timed(lambda: convert(inputs, out, runner="DirectRunner", workers=workers))
            rows.append((f"Beam DirectRunner, {workers} worker process(es)", t, startup, n / max(t - startup, 1e-9)))
        print("\n| conversion | wall s | of which job start-up s | records/s after start-up |\n|---|---:|---:|---:|")
        for name, t, startup, rate in rows:
            print(f"| {name} | {t:.1f} | {startup:.1f} | {rate:.0f} |")

        from cloud_fixtures import gcs_emulator_process

        local = sorted(paths.glob(os.path.join(work, "serial", "*.array_record")))
        with gcs_emulator_process("bench") as host:
            os.environ["STORAGE_EMULATOR_HOST"] = host
            paths.configure_emulator()
            remote = []
            for p in local:
                remote.append(f"gs://bench/ar/{os.path.basename(p)}")
                paths.write_bytes(remote[-1], open(p, "rb").read())
            read_all(local)  # warm the page cache: the local figure is the best case
            reads = []
            for name, urls in (("local disk (page cache)", local), ("GCS emulator on loopback", remote)):
                start = time.perf_counter()
                size = read_all(urls)
                t = time.perf_counter() - start
                reads.append((name, size / 2**20 / t, n / t))
        print("\n| read of the converted shards | MiB/s | records/s |\n|---|---:|---:|")
        for name, mbs, rate in reads:
            print(f"| {name} | {mbs:.0f} | {rate:.0f} |")

        per_worker = rows[1][3]
        print("\n400M pairs at the 1-worker Beam rate after start-up "
              f"({per_worker:.0f} records/s per worker process, linear scaling assumed):")
        for workers in (1, 16, 128):
            hours = 400e6 / (per_worker * workers) / 3600
            print(f"  {workers:>3} workers: {hours:8.1f} h")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
