"""The overlapped training loop vs the loop it replaced, input pipeline taken out.

    python experiments/loop_overlap/run.py                  # the table in README.md
    python experiments/loop_overlap/run.py --steps 200 --repeats 2

The demo config (SigLIP loss, ring engine, 8 simulated CPU devices, batch 128, `log_every=50`)
trains from the same initial state in one process, alternating the two loops `--repeats` times:

* **before**: the loop as it was before issue 14 part C: `next(data)` on the loop's thread,
  the step, then `float(loss)` after every step (the NaN check), so the host waits for each step
  before it builds the next batch and dispatches the next step;
* **overlapped**: the trainer's own loop (`train.loop._loop`): batches from the prefetching
  thread, the loss read one step behind, the host waiting only at the log steps.

With `--data memory` (the default) both read the same in-memory batches (uint8 images and
tokens made by the demo pipeline beforehand, copied to the devices on every `next`, as the real
pipeline's last stage does), so the comparison is the loop, not the decoding; `--data pipeline`
feeds both from the demo's grain pipeline instead (decoding and augmentation in this process).
Figure: steps/s over each 50-step log window after the first (which holds the compile), median
over windows and repeats. Writes results_<data>.json and results_<data>.md next to this file.
"""

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "configs"))

import demo  # noqa: E402

from big_contrast import sharding  # noqa: E402
from big_contrast.checkpoint import Checkpointer  # noqa: E402
from big_contrast.data import make_pipeline  # noqa: E402
from big_contrast.train import loop as train_loop  # noqa: E402
from big_contrast.train.metrics import MetricWriter, read_metrics  # noqa: E402
from big_contrast.train.prefetch import Prefetcher  # noqa: E402
from big_contrast.workdir import Workdir  # noqa: E402

HERE = pathlib.Path(__file__).parent
WINDOW = 50


class InMemoryData:
    """The pipeline's interface over batches made beforehand: `next` only copies host arrays to
    the devices (`make_array_from_process_local_data`, the real pipeline's last stage)."""

    def __init__(self, host_batches, batch_sharding):
        self._batches, self._sharding, self._made = host_batches, batch_sharding, 0

    def __next__(self):
        local = self._batches[self._made % len(self._batches)]
        self._made += 1
        spec = self._sharding.spec[0]
        return {k: jax.make_array_from_process_local_data(
            jax.sharding.NamedSharding(self._sharding.mesh, jax.sharding.PartitionSpec(spec, *[None] * (v.ndim - 1))),
            v) for k, v in local.items()}

    def get_state(self):
        return {"made": self._made}

    def skip_counts(self):
        return {}

    def close(self):
        pass


def host_batches(config, count):
    with make_pipeline(config.data, None, train=True, global_batch_size=config.batch_size) as data:
        return [{k: v for k, v in next(data).items() if k in train_loop.BATCH_FIELDS} for _ in range(count)]


def loop_before(run, state, data, step_fn, steps):
    """The pre-overlap loop's step path: batch, step, read the loss; a window time every 50 steps."""
    compiled, windows, start = None, [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(data)
        if compiled is None:
            compiled = train_loop._compile(step_fn, state, batch)
        state, metrics = compiled(state, batch)
        float(metrics["loss"])  # the per-step NaN check
        if step % WINDOW == 0:
            {k: float(np.asarray(v)) for k, v in metrics.items()}  # the log line
            windows.append(WINDOW / (time.perf_counter() - start))
            start = time.perf_counter()
    return windows


def loop_overlapped(run, state, data, step_fn, steps):
    """The trainer's loop; its logged step_time_s per 50-step window gives the figure."""
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Workdir(workdir)
        ckpt = Checkpointer(workdir.checkpoints, async_save=False)
        writer = MetricWriter(workdir, total_steps=steps, progress=False)
        batches = Prefetcher(data, fields=train_loop.BATCH_FIELDS)
        try:
            train_loop._loop(run, state, batches, ckpt, writer, [], step_fn, None, workdir)
        finally:
            train_loop._close_in_order(ckpt, batches, writer)
        return [1.0 / row["step_time_s"] for row in read_metrics(workdir) if "step_time_s" in row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=("memory", "pipeline"), default="memory")
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args()

    config = demo.get_config("sigmoid,noeval")
    config.total_steps, config.log_every, config.checkpoint_every = args.steps, WINDOW, 10 * args.steps
    run = train_loop.build(config)
    batch_sharding = sharding.batch_sharding(run.mesh)
    batches = host_batches(config, 8)
    loops = {"before": (loop_before, train_loop.make_step_fn(run, batch_sharding)),
             "overlapped": (loop_overlapped, train_loop.make_step_fn(run, batch_sharding))}
    rates = {name: [] for name in loops}
    for repeat in range(args.repeats):
        for name, (loop, step_fn) in loops.items():
            state = jax.tree.map(jnp.copy, run.state)
            if args.data == "memory":
                data = InMemoryData(batches, batch_sharding)
            else:
                data = make_pipeline(config.data, batch_sharding, train=True, global_batch_size=config.batch_size)
            windows = loop(run, state, data, step_fn, args.steps)
            data.close()
            rates[name] += windows[1:]  # the first window holds the compile
            print(json.dumps({"loop": name, "repeat": repeat, "steps_per_s": [round(w, 2) for w in windows]}),
                  flush=True)
    result = {name: statistics.median(r) for name, r in rates.items()}
    result["ratio"] = result["overlapped"] / result["before"]
    result.update(data=args.data, steps=args.steps, repeats=args.repeats, windows=rates, batch=config.batch_size,
                  devices=jax.device_count(), load_average=os.getloadavg())
    (args.out / f"results_{args.data}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = [f"| loop (--data {args.data}) | steps/s (median of 50-step windows) |", "|---|---:|",
             f"| before (sync every step, batch built on the loop's thread) | {result['before']:.2f} |",
             f"| overlapped (prefetch thread, loss read one step behind) | {result['overlapped']:.2f} |",
             f"| ratio | {result['ratio']:.3f}x |"]
    (args.out / f"results_{args.data}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
