"""Input-pipeline throughput: images per second per CPU core at 224 px from JPEG bytes.

    .venv/bin/python experiments/data_throughput/run.py            # ~3 minutes on 2 cores
    .venv/bin/python experiments/data_throughput/run.py --quick    # smoke run, ~30 s

What is measured (the training pipeline of `big_contrast.data`, nothing mocked):
  * JPEG records in an ArrayRecord file, as `big-contrast data convert` writes them, with
    photo-like synthetic content (multi-scale noise + grain, quality 95) at two source sizes:
    256 x 256 (img2dataset's default output) and 512 x 384 (DataComp-like, longer side 512);
  * per image: decode -> random_resized_crop(224) -> flip_lr -> value_range(-1, 1), one of
    several captions sampled and tokenized by a sentencepiece model (max_len 64); with
    `data.device_normalize` the pipeline stops before value_range and yields uint8 images
    (the trainer applies value_range on the device);
  * stage costs on one thread, then the full grain pipeline (`make_pipeline`) on one core
    (num_workers=0, num_threads=1) and on all cores (num_workers=2), numpy batches of 64.
The load average of the (shared) machine is recorded next to every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from big_contrast.data import default_data_config, make_pipeline  # noqa: E402
from big_contrast.data.image_ops import parse_image_pp  # noqa: E402
from big_contrast.data.records import encode_record  # noqa: E402
from big_contrast.data.tokenizer import SentencePieceTokenizer, encode_fixed, train_sentencepiece  # noqa: E402

WORDS = ("a photo of the dog cat man woman street city beach sunset red blue green old new small "
         "large wooden table chair car bike mountain river tree house with on in at near under over "
         "two three people playing running standing sitting white black bright dark view close").split()
SOURCE_SIZES = {"256x256": (256, 256), "512x384": (512, 384)}
PP_FLOAT = "decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)"
PP_UINT8 = "decode|random_resized_crop(224)|flip_lr"
PP_FAST = "decode(fast=True)|random_resized_crop(224)|flip_lr|value_range(-1, 1)"


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Multi-scale noise plus sensor grain: JPEG sizes close to real photos (tens of kB)."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 120.0), (12, 50.0), (48, 25.0)):
        grid = rng.uniform(-1, 1, size=(cells, max(1, cells * width // height), 3))
        layer = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC)
        image += (np.asarray(layer, np.float32) / 127.5 - 1) * amplitude
    image += 128 + rng.normal(0, 6, size=image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def captions_for(rng):
    return [" ".join(rng.choice(WORDS, size=rng.integers(6, 16))) for _ in range(3)]


def write_dataset(folder: str, size: tuple[int, int], distinct: int, records: int,
                  seed: int = 0) -> tuple[str, float]:
    """`records` records cycling over `distinct` JPEGs, each with its own captions.

    Thousands of records, not a few hundred: grain's index_shuffle costs about 60 ms / n per
    element for a source of n records (0.5 ms at n = 128, 15 us at n = 4096), which would
    otherwise dominate the measurement.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(seed)
    images = [photo_like(rng, *size) for _ in range(distinct)]
    path = os.path.join(folder, f"bench-{size[0]}x{size[1]}.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(records):
        writer.write(encode_record(images[i % distinct], captions_for(rng), key=str(i)))
    writer.close()
    return path, sum(map(len, images)) / distinct / 1024


def _pass_ms(fn, items, seed) -> float:
    """CPU milliseconds per item for one pass over `items` on this thread."""
    start = time.process_time()
    for i, item in enumerate(items):
        fn(item, np.random.default_rng(seed + i))
    return (time.process_time() - start) / len(items) * 1e3


def stage_costs(images: list[bytes], tokenizer, repeats: int) -> dict:
    """CPU ms per image of each cumulative stage: passes interleaved across stages (so load
    from other users spreads evenly over them) and the best of `repeats` kept (CPU time and
    best-of-N: on a shared machine, other work only ever adds time)."""
    caption = " ".join(WORDS[:12])
    image_stages = {
        "decode (full image)": "decode",
        "+ random_resized_crop(224)": "decode|random_resized_crop(224)",
        "+ flip_lr": PP_UINT8,
        "+ value_range(-1, 1) (float32 out)": PP_FLOAT,
        "same with decode(fast=True)": PP_FAST,
    }
    stages = {name: (lambda b, r, pp=parse_image_pp(spec): pp(b, r), images)
              for name, spec in image_stages.items()}
    stages["tokenize (sentencepiece, max_len 64)"] = (
        lambda c, r: encode_fixed(tokenizer, c, 64), [caption] * len(images))
    best = {name: float("inf") for name in stages}
    for r in range(repeats):
        for name, (fn, items) in stages.items():
            best[name] = min(best[name], _pass_ms(fn, items, r * len(items)))
    return best


def _children_cpu_seconds() -> float:
    """CPU time (user + sys) of this process's live child processes (grain workers), from /proc."""
    total, me, tick = 0.0, os.getpid(), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[1] is the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _cpu_seconds() -> float:
    return time.process_time() + _children_cpu_seconds()


def pipeline_rate(path: str, tokenizer_path: str, pp: str, workers: int, threads: int,
                  seconds: float, device_normalize: bool = False, batch: int = 64,
                  window: int = 4) -> dict:
    """Images/s on the wall clock, and images per CPU-second of all pipeline processes over
    windows of `window` batches: median and best window (a busy shared machine disturbs CPU
    time much less than the wall clock, and the best window least)."""
    config = default_data_config()
    config.sources = {"bench": {"kind": "array_record", "path": path}}
    config.batch_size, config.max_len = batch, 64
    config.tokenizer, config.pp_train = tokenizer_path, pp
    config.num_workers, config.num_threads = workers, threads
    config.device_normalize = device_normalize  # uint8 images: value_range left to the device
    with make_pipeline(config) as iterator:
        for _ in range(3 if workers == 0 else 3 * workers):  # warm-up (worker start-up)
            next(iterator)
        load_before = os.getloadavg()[0]
        start, per_cpu_s, images = time.perf_counter(), [], 0
        while time.perf_counter() - start < seconds:
            cpu_start = _cpu_seconds()
            for _ in range(window):
                images += len(next(iterator)["text"])
            per_cpu_s.append(window * batch / (_cpu_seconds() - cpu_start))
        wall = time.perf_counter() - start
        return {"images_per_s": images / wall, "images_per_cpu_s": float(np.median(per_cpu_s)),
                "images_per_cpu_s_best": max(per_cpu_s), "load": (load_before, os.getloadavg()[0])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs per source size")
    parser.add_argument("--records", type=int, default=4096, help="records per source size")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per pipeline run")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.records, args.seconds = 64, 1024, 3.0
    cores = os.cpu_count()
    results = {"cores": cores, "sources": {}}
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(1)
        tokenizer_model = train_sentencepiece(
            [c for _ in range(2000) for c in captions_for(rng)], vocab_size=1000)
        tokenizer_path = os.path.join(folder, "bench.model")
        with open(tokenizer_path, "wb") as f:
            f.write(tokenizer_model)
        tokenizer = SentencePieceTokenizer(tokenizer_model)
        for name, size in SOURCE_SIZES.items():
            path, kb = write_dataset(folder, size, args.images, args.records)
            from big_contrast.data.array_record import ArrayRecordSource

            source = ArrayRecordSource(path)
            images = [source[i]["image"] for i in range(min(64, len(source)))]
            entry = {"jpeg_kb": kb, "stages_ms": stage_costs(images, tokenizer, 2 if args.quick else 12)}
            runs = {}
            for label, pp, workers, threads, cores_used, uint8 in (
                    ("1 core, in-process (num_workers=0, num_threads=1)", PP_FLOAT, 0, 1, 1, False),
                    ("1 core, uint8 out (device_normalize)", PP_FLOAT, 0, 1, 1, True),
                    ("1 core, decode(fast=True)", PP_FAST, 0, 1, 1, False),
                    (f"{cores} cores, in-process threads (num_threads={cores})", PP_FLOAT, 0, cores, cores, False),
                    (f"{cores} cores, num_workers={cores}", PP_FLOAT, cores, 1, cores, False),
                    (f"{cores} cores, num_workers={cores}, uint8 out", PP_FLOAT, cores, 1, cores, True)):
                run = pipeline_rate(path, tokenizer_path, pp, workers, threads, args.seconds, uint8)
                run["per_core"] = run["images_per_s"] / cores_used
                runs[label] = run
                print(f"{name:8s} {label:55s} {run['images_per_s']:7.0f} img/s "
                      f"{run['per_core']:6.0f} /core (wall) {run['images_per_cpu_s']:6.0f} /CPU-s "
                      f"(best {run['images_per_cpu_s_best']:.0f})  "
                      f"load {run['load'][0]:.1f}->{run['load'][1]:.1f}", flush=True)
            entry["pipeline"] = runs
            results["sources"][name] = entry
            os.remove(path)
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_tables(results):
    print("\n| source JPEG | stage (one thread, cumulative) | CPU ms / image | images / CPU-s |")
    print("|---|---|---:|---:|")
    for name, entry in results["sources"].items():
        for stage, ms in entry["stages_ms"].items():
            print(f"| {name} ({entry['jpeg_kb']:.0f} kB) | {stage} | {ms:.2f} | {1e3 / ms:.0f} |")
    print("\n| source JPEG | pipeline run | images / s | images / s / core (wall) "
          "| images / CPU-second, median (best) | load avg |")
    print("|---|---|---:|---:|---:|---:|")
    for name, entry in results["sources"].items():
        for label, run in entry["pipeline"].items():
            print(f"| {name} | {label} | {run['images_per_s']:.0f} | {run['per_core']:.0f} | "
                  f"{run['images_per_cpu_s']:.0f} ({run['images_per_cpu_s_best']:.0f}) | "
                  f"{run['load'][0]:.1f} |")


if __name__ == "__main__":
    main()
