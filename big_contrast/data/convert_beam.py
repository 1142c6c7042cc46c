"""`data convert` as an Apache Beam pipeline: the same records as the serial converter, in parallel.

    summary = convert_with_beam(["gs://b/shards/{00000..09999}.tar" expanded], "gs://b/arrayrecord",
                                runner="DataflowRunner", pipeline_args=["--project=P", ...])

The work is cut into *units* before the pipeline starts: one per tar shard (a tar is a stream and
cannot be split) and one per `examples_per_shard` rows of a manifest. Unit `i` of `N` becomes
exactly the output shard `<prefix>-<i:05d>-of-<N:05d>.array_record`, written to a temporary name
and published whole (a rename locally, a single upload to a bucket), then its per-input skip
counts to `_convert_state/<shard>.json`. A shard with its state file is finished: a re-run of the
same command (after a crash, a pre-emption or a failed Dataflow job) converts only the others.

Records are the serial converter's, in the same order once the shards are read in name order
(unit order is input order, and records keep their order inside a unit); only where shards
begin differs (per tar shard here, every `examples_per_shard` records there). Training's
shuffle is a permutation of global record indices over the sorted shard list, so it does not
depend on the boundaries. Skip counts go through Beam metrics (namespace `big_contrast.convert`,
one counter per reason, visible in the runner's UI while the job runs); the summary is built from
the state files, which also cover shards finished by an earlier run, and is checked against
the metrics of this run.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence

from big_contrast import paths
from big_contrast.data.convert import SUMMARY_FILE, ConvertSummary, _manifest_records, expand_inputs
from big_contrast.data.errors import SKIP_REASONS, SkipRecord
from big_contrast.data.manifest import MANIFEST_EXTENSIONS, ManifestSource
from big_contrast.data.records import encode_record
from big_contrast.data.tarshards import iter_tar_samples
from big_contrast.errors import ConfigError

METRICS_NAMESPACE = "big_contrast.convert"
STATE_DIR = "_convert_state"
PLAN_FILE = "plan.json"
RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner",
           "PrismRunner")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One output shard's worth of input: a whole tar shard, or rows `start:stop` of a manifest."""

    index: int
    path: str
    start: int = 0
    stop: int | None = None


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    image_key: str = "filepath"
    caption_key: str = "title"
    json_caption_key: str = "caption"


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def plan_units(files: Sequence[str], examples_per_shard: int, options: RecordOptions) -> list[Unit]:
    """Input files -> units in input order (manifests are read once here to count their rows)."""
    units = []
    for path in files:
        if not is_manifest(path):
            units.append(Unit(len(units), path))
            continue
        rows = len(ManifestSource(path, image_key=options.image_key, caption_key=options.caption_key))
        for start in range(0, rows, examples_per_shard):
            units.append(Unit(len(units), path, start, min(start + examples_per_shard, rows)))
    return units


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def unit_records(unit: Unit, options: RecordOptions, manifest: ManifestSource | None = None
                 ) -> Iterator[dict | SkipRecord]:
    if is_manifest(unit.path):
        return _manifest_records(unit.path, options.image_key, options.caption_key, unit.start,
                                 unit.stop, source=manifest)
    return iter_tar_samples(unit.path, options.json_caption_key)


def convert_unit(unit: Unit, output_dir: str, prefix: str, count: int, options: RecordOptions,
                 manifest: ManifestSource | None = None, on_skip=None) -> dict:
    """Writes unit's shard and its state file; returns the state (written + skips by reason)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = shard_name(prefix, unit.index, count)
    final = paths.join(output_dir, name)
    remote = paths.is_remote(output_dir)
    # ArrayRecord writes local files only: a bucket's shard is written to local disk, then uploaded.
    local = (os.path.join(tempfile.mkdtemp(prefix="convert-"), name) if remote
             else os.fspath(final) + ".tmp")
    skipped, written = collections.Counter(), 0
    writer = ArrayRecordWriter(local, "group_size:1")  # group_size 1: fast random access
    try:
        for item in unit_records(unit, options, manifest):
            if isinstance(item, SkipRecord):
                skipped[item.reason] += 1
                if on_skip is not None:
                    on_skip(item.reason)
            else:
                writer.write(encode_record(item["image"], item["captions"], key=item.get("key")))
                written += 1
    finally:
        writer.close()
    _publish(local, final, remote)
    state = {"shard": name, "input": unit.path, "start": unit.start, "stop": unit.stop,
             "written": written, "skipped": dict(skipped), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    paths.write_bytes(paths.join(output_dir, STATE_DIR, name + ".json"), json.dumps(state).encode())
    return state


def _publish(local: str, final, remote: bool) -> None:
    if not remote:
        os.replace(local, final)
        return
    try:
        with open(local, "rb") as src, final.open("wb") as dst:  # one object, visible when closed
            shutil.copyfileobj(src, dst, 16 << 20)
    finally:
        shutil.rmtree(os.path.dirname(local), ignore_errors=True)


def _make_dofn():
    import apache_beam as beam

    class ConvertUnitFn(beam.DoFn):
        """Runs `convert_unit` on each unit; counts records through Beam metrics."""

        def __init__(self, output_dir, prefix, count, options):
            self.output_dir, self.prefix, self.count, self.options = output_dir, prefix, count, options

        def setup(self):
            self._manifests = {}
            self._written = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "written")
            self._skipped = {r: beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"skipped/{r}")
                             for r in SKIP_REASONS}

        def process(self, unit):
            manifest = None
            if is_manifest(unit.path):  # parsed once per worker, not once per unit
                if unit.path not in self._manifests:
                    self._manifests[unit.path] = ManifestSource(
                        unit.path, image_key=self.options.image_key, caption_key=self.options.caption_key)
                manifest = self._manifests[unit.path]
            state = convert_unit(unit, self.output_dir, self.prefix, self.count, self.options,
                                 manifest, on_skip=lambda reason: self._skipped[reason].inc())
            self._written.inc(state["written"])
            yield state

    return ConvertUnitFn


def pipeline_options(runner: str, pipeline_args: Sequence[str] = (), workers: int | None = None):
    """Beam options: `runner` plus the user's own (`--project=...`, `--num_workers=...`, ...).

    On the DirectRunner the default is one worker process per core (`--direct_num_workers`,
    `--direct_running_mode=multi_processing`), which is what makes it parallel on one machine.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    if runner not in RUNNERS:
        raise ConfigError(f"unknown Beam runner {runner!r}; use one of {', '.join(RUNNERS)} "
                         "(or runner='serial' for the in-process converter)")
    args = list(pipeline_args)
    if runner == "DirectRunner":
        given = " ".join(args)
        if "--direct_num_workers" not in given:
            args.append(f"--direct_num_workers={workers or os.cpu_count() or 1}")
        if "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_processing")
    return PipelineOptions(args, runner=runner)


def _read_json(path) -> dict | None:
    target = paths.parse(path)
    return json.loads(target.read_text()) if target.exists() else None


def _prepare_output(output_dir: str, plan: dict, overwrite: bool) -> dict[str, dict]:
    """Creates / checks `output_dir`; returns the states of shards finished by an earlier run."""
    root = paths.parse(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    state_dir = root / STATE_DIR
    previous = _read_json(state_dir / PLAN_FILE)
    existing = [p for p in root.glob("*.array_record*")]
    if overwrite:
        for p in existing:
            p.unlink()
        if state_dir.exists():
            state_dir.rmtree()
        previous, existing = None, []
    if previous is not None and previous != plan:
        raise ConfigError(f"output_dir {output_dir!r} holds a conversion of other inputs or settings; "
                         "choose an empty folder or pass overwrite=True (--overwrite)")
    if previous is None and existing:
        raise ConfigError(f"output_dir {output_dir!r} already holds {len(existing)} ArrayRecord "
                         "file(s); choose an empty folder or pass overwrite=True")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / PLAN_FILE).write_text(json.dumps(plan))
    done = {}
    shard_names = {os.path.basename(os.fspath(p)) for p in existing}
    for state_file in state_dir.glob("*.array_record.json"):
        state = json.loads(state_file.read_text())
        if state["shard"] in shard_names:
            done[state["shard"]] = state
    return done


def summarize(states: Sequence[dict], output_dir: str) -> ConvertSummary:
    """The serial converter's summary from the per-shard states (in unit order)."""
    summary = ConvertSummary()
    for state in states:
        summary.written += state["written"]
        summary.skipped.update(state["skipped"])
        per_input = summary.skipped_by_input.setdefault(state["input"], {})
        for reason, n in state["skipped"].items():
            per_input[reason] = per_input.get(reason, 0) + n
        summary.shards.append(os.fspath(paths.join(output_dir, state["shard"])))
    return summary


def _metric_totals(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    totals = {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def check_locations(inputs: str | Sequence[str], output_dir: str) -> None:
    """Fails in seconds, in one sentence (`paths.StorageError`), on an unusable bucket or URL."""
    patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    for pattern in {os.fspath(p) for p in patterns}:
        paths.validate(pattern)
        if paths.is_remote(pattern):  # the bucket (or the folder of a glob) must be readable
            paths.check_readable(paths.glob_root(pattern))
    paths.check_writable(output_dir)


def convert_with_beam(inputs: str | Sequence[str], output_dir: str, *, runner: str = "DirectRunner",
                      pipeline_args: Sequence[str] = (), workers: int | None = None,
                      examples_per_shard: int = 10_000, prefix: str = "data",
                      image_key: str = "filepath", caption_key: str = "title",
                      json_caption_key: str = "caption", overwrite: bool = False) -> ConvertSummary:
    """Converts tar shards and/or manifests to ArrayRecord shards on a Beam runner.

    Arguments as `convert_to_array_record`, plus `runner` / `pipeline_args` (Beam's own
    options, e.g. `['--project=P', '--region=R', '--temp_location=gs://b/tmp']`) and `workers`
    (DirectRunner processes; default: one per core). A re-run converts only unfinished shards.
    """
    try:
        import apache_beam as beam
    except ImportError:
        raise ImportError("the Beam converter needs apache-beam (`pip install -e .` installs it); "
                          "or pass runner='serial' (--runner serial)") from None

    if examples_per_shard <= 0:
        raise ConfigError(f"examples_per_shard={examples_per_shard} must be positive")
    options = RecordOptions(image_key, caption_key, json_caption_key)
    beam_options = pipeline_options(runner, pipeline_args, workers)
    check_locations(inputs, output_dir)
    files = expand_inputs(inputs)
    units = plan_units(files, examples_per_shard, options)
    plan = {"inputs": files, "units": len(units), "prefix": prefix, "examples_per_shard": examples_per_shard,
            **dataclasses.asdict(options)}
    done = _prepare_output(output_dir, plan, overwrite)
    todo = [u for u in units if shard_name(prefix, u.index, len(units)) not in done]
    metrics = {}
    if todo:
        # The DirectRunner relays every worker's start-up warnings; they are not the user's concern.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
        pipeline = beam.Pipeline(options=beam_options)
        _ = (pipeline | "units" >> beam.Create(todo) | "spread" >> beam.Reshuffle()
             | "convert" >> beam.ParDo(_make_dofn()(output_dir, prefix, len(units), options)))
        result = pipeline.run()
        result.wait_until_finish()
        metrics = _metric_totals(result)
    states = [_read_json(paths.join(output_dir, STATE_DIR, shard_name(prefix, u.index, len(units)) + ".json"))
              for u in units]
    missing = [shard_name(prefix, u.index, len(units)) for u, s in zip(units, states) if s is None]
    if missing:
        raise RuntimeError(f"the pipeline finished without writing {len(missing)} shard(s) "
                           f"(first: {missing[0]}); run the same command again to convert them")
    summary = summarize(states, output_dir)
    record = {**summary.to_json(), "runner": runner, "resumed_shards": len(done),
              "beam_metrics": metrics,
              "beam_metrics_match": _metrics_match(metrics, [s for s in states if s["shard"] not in done])}
    paths.parse(output_dir).joinpath(SUMMARY_FILE).write_text(json.dumps(record, indent=2))
    return summary


def _metrics_match(metrics: dict, states_this_run: Sequence[dict]) -> bool:
    """Whether Beam's counts of this run equal the state files it wrote (they count the same
    events; a retried bundle can make runners without committed metrics count twice)."""
    expected = collections.Counter({"written": sum(s["written"] for s in states_this_run)})
    for state in states_this_run:
        expected.update({f"skipped/{r}": n for r, n in state["skipped"].items()})
    return +expected == +collections.Counter(metrics)
