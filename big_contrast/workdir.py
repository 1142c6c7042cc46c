"""The workdir: one folder (local, `gs://` or `s3://`) that a run, an eval, an import and an export share.

    workdir = Workdir("gs://bucket/run")
    workdir.check_writable()            # once: the URL, orbax's schemes, the bucket, in seconds
    workdir.checkpoints                 # every file's place is named here, and only here
    with workdir.lock():                # a second `train` on a live run's workdir is refused
        ...

Layout (the names below are the only spelling of each in the package):

    W/checkpoints/STEP   orbax checkpoints (`checkpoint.py`)
    W/config.json        the resolved config the run trained with (the config record, below)
    W/metrics.jsonl      one JSON line per log / eval      W/tensorboard/  TensorBoard event files
    W/profile/           `config.profile_steps` traces      W/plot.png      loss / accuracy plot
    W/lock.json          the live run's lock (below)
    W/config.py, W/interop.json, W/tokenizer/   what `big-contrast import` writes (`interop/imported.py`)

**The config record.** A run writes its resolved config to `config.json` before its first
step, so a resume with a config that would change the train state's structure or shapes (a
model field, the optimizer's kind, parameter rules) fails before anything is restored or
written, naming the differing keys; safe differences (total_steps, evals, schedule, data) are
listed; and `big-contrast eval --workdir W` needs no `--config`. Values are compared as JSON;
the mesh is not structural, since a checkpoint restores onto any mesh.

**The lock.** `lock.json` holds the host, pid, a random token and a heartbeat timestamp that a
daemon thread of the running process rewrites every `HEARTBEAT_S` seconds (a thread, not the
training loop, so a 10-minute compile or eval does not look like a dead run). A lock is stale,
and is taken over, when

* it was written on this machine (same hostname and boot id) and its pid is no longer alive: a
  SIGKILLed run resumes at once, on local disk or on a bucket (a reused pid is caught by the
  heartbeat rule), or
* its heartbeat is older than `STALE_AFTER_S` (4 missed heartbeats), judged on the wall clocks of
  the two machines: NTP keeps them within a second, far below the two-minute margin. This is the
  only rule for a run on another machine, whose pid cannot be checked (a preempted VM's
  replacement waits at most two minutes).

A fresh lock is created atomically on local disk (`O_EXCL`). An object store has no such
primitive through epath, so on a bucket the lock is written, then read back: of two runs
started within the same second both may pass (a window the heartbeat narrows but cannot close),
which is the residual risk. The heartbeat notices a lock taken over by another run and warns.
Only process 0 of a multi-host run takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

import ml_collections
from etils import epath

from big_contrast import paths
from big_contrast.errors import BigContrastError, ConfigMismatch

CHECKPOINTS = "checkpoints"
CONFIG_RECORD = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
PLOT = "plot.png"
LOCK = "lock.json"
IMPORTED_CONFIG = "config.py"
INTEROP = "interop.json"
TOKENIZER = "tokenizer"

ORBAX_SCHEMES = (None, "gs")  # local folders and gs://; orbax 0.12.8 turns s3://b/x into ./s3:/b/x
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S
# Keys (and their sub-keys) whose change alters which arrays the train state holds or their shapes.
STRUCTURAL = ("model", "optimizer.name", "optimizer.momentum", "lr_mults", "freeze")
# Model keys whose change only reshapes the position tables, which every loader resamples
# (`train/resample.py`): a resume, an eval or an import at another resolution / text length.
RESAMPLED = ("model.image.image_size", "model.text.max_len")
_MISSING = "(absent)"


class WorkdirLocked(BigContrastError):
    """Another live run is training in this workdir."""


def check_checkpoint_location(directory) -> None:
    """Raises `paths.StorageError` (one sentence) for a URL orbax cannot write checkpoints to."""
    text = paths.validate(directory)
    kind = paths.scheme(text)
    if kind not in ORBAX_SCHEMES:
        raise paths.StorageError(
            f"checkpoints cannot be written to {text!r}: the pinned orbax-checkpoint handles local folders "
            f"and gs:// only (with {kind}:// it writes a local folder '{kind}:'); use a gs:// or local --workdir")


class Workdir:
    """A workdir's URL, layout, checks, config record and lock. Construct it once per command
    (`Workdir.of` passes one through) and hand it on: nothing below re-parses the URL."""

    def __init__(self, location):
        self.url = paths.validate(os.fspath(location))  # a malformed URL is refused, not made a folder
        self.path = paths.parse(self.url)
        self.remote = paths.is_remote(self.url)
        self._checked = set()

    @classmethod
    def of(cls, location) -> "Workdir":
        return location if isinstance(location, Workdir) else cls(location)

    def absolute(self) -> "Workdir":
        """The same workdir with a local path made absolute (a URL is absolute already)."""
        return self if self.remote else Workdir(os.path.abspath(self.url))

    def __fspath__(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Workdir({self.url!r})"

    # ------------------------------------------------------------------ layout
    def _at(self, name) -> epath.Path:
        return self.path / name

    checkpoints = property(lambda self: self._at(CHECKPOINTS))
    config_record = property(lambda self: self._at(CONFIG_RECORD))
    metrics = property(lambda self: self._at(METRICS))
    tensorboard = property(lambda self: self._at(TENSORBOARD))
    profile = property(lambda self: self._at(PROFILE))
    plot = property(lambda self: self._at(PLOT))
    lock_file = property(lambda self: self._at(LOCK))
    imported_config = property(lambda self: self._at(IMPORTED_CONFIG))
    interop = property(lambda self: self._at(INTEROP))
    tokenizer = property(lambda self: self._at(TOKENIZER))

    def has_checkpoints(self) -> bool:
        """Whether `checkpoints/` holds a step; creates nothing (an `eval` of an empty workdir
        must not leave an empty folder behind)."""
        return holds_checkpoints(self.checkpoints)

    # ------------------------------------------------------------------ checks (each done once)
    def check_writable(self) -> None:
        """Orbax can write checkpoints here and the folder / bucket takes a write: seconds and one
        sentence, before anything is compiled."""
        if "write" not in self._checked:
            check_checkpoint_location(self.url)
            paths.check_writable(self.url)
            self._checked.add("write")

    def check_readable(self) -> None:
        """The folder or bucket exists and answers (a typo or an unreachable bucket: one sentence)."""
        if "read" not in self._checked:
            paths.check_readable(self.url)
            self._checked.add("read")

    # ------------------------------------------------------------------ the config record
    def read_config(self) -> ml_collections.ConfigDict | None:
        """The config recorded here, or None when there is none."""
        source = self.config_record
        if not source.exists():
            return None
        try:
            return ml_collections.ConfigDict(json.loads(source.read_text()))
        except ValueError as error:
            raise ConfigMismatch(f"{source} does not parse as JSON ({error}); restore it or pass --config.") from None

    def write_config(self, config) -> None:
        """Writes `config` (resolved) to `config.json`."""
        target = self.config_record
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")

    def check_resumable(self, config) -> list[str]:
        """Raises `ConfigMismatch` when `config` differs from the recorded config in a structural
        key; returns the safe differences as 'key: old in the workdir, new now'."""
        recorded = self.read_config()
        if recorded is None:
            return []
        diffs = [d for d in differences(recorded, config) if not _default_of_a_later_key(*d)]
        structural = [_describe(*d) for d in diffs if is_structural(*d)]
        if structural:
            listed = "; ".join(structural[:3]) + ("; ..." if len(structural) > 3 else "")
            raise ConfigMismatch(
                f"This workdir was trained with another config ({listed}): its checkpoints cannot resume with "
                f"this one. Use a new --workdir, or the old values (recorded in {self.config_record}).")
        return [_describe(*d) for d in diffs]

    # ------------------------------------------------------------------ the lock
    def lock(self, *, enabled: bool = True) -> "RunLock":
        """The run lock (a context manager); `enabled=False` (processes other than 0) takes none."""
        return RunLock(self, enabled=enabled)


def holds_checkpoints(directory) -> bool:
    """Whether `directory` (an epath) holds a checkpoint step; creates nothing."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def differences(old, new) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs, in key order."""
    a, b = _flat(_as_json(old)), _flat(_as_json(new))
    pairs = ((k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys()))
    return [(key, x, y) for key, x, y in pairs if x != y]


def is_structural(key: str, old, new) -> bool:
    if key in RESAMPLED:
        return False
    if key == "optimizer.grad_clip_norm":  # clipping on/off adds or removes an optimizer state
        return bool(old) != bool(new)
    return any(key == s or key.startswith(s + ".") for s in STRUCTURAL)


def _default_of_a_later_key(key: str, old, new) -> bool:
    """Whether `key` is absent from the recorded config and set to its default now because the
    key was added after the run was recorded (it trained as if it held the default): no change."""
    if old != _MISSING:
        return False
    from big_contrast.data.streaming.pipeline import STREAMING_DEFAULTS  # data.streaming: issue 21

    added_later = _flat(json.loads(json.dumps({"data": {"streaming": STREAMING_DEFAULTS}})))
    return key in added_later and added_later[key] == new


def _describe(key, old, new) -> str:
    return f"{key}: {json.dumps(old)} in the workdir, {json.dumps(new)} now"


def _as_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(tree, prefix="") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


class RunLock:
    """`W/lock.json` while a run trains in W (see the module docstring for when a lock is stale)."""

    def __init__(self, workdir: Workdir, *, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self.lost = False  # another run took the lock over (it judged this one stale)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "machine": _machine_id(), "pid": os.getpid(), "token": self.token,
                "heartbeat": time.time()}

    def acquire(self) -> None:
        """Takes the lock, or raises `WorkdirLocked` naming the live run that holds it."""
        if not self.enabled:
            return
        target = self.workdir.lock_file
        held = read_lock(target)
        if held is not None and not is_stale(held):
            raise WorkdirLocked(_refusal(self.workdir, held))
        if not self._create(target, replace=held is not None):
            raise WorkdirLocked(_refusal(self.workdir, read_lock(target) or {}))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock-heartbeat")
        self._thread.start()

    def _create(self, target, *, replace: bool) -> bool:
        """Writes this run's record; False when another run wrote one first."""
        data = json.dumps(self._record()).encode()
        if self.workdir.remote or replace:
            _write(target, data)  # last writer wins: read back to see who did
        else:
            try:
                fd = os.open(os.fspath(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return (read_lock(target) or {}).get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = read_lock(self.workdir.lock_file)
                if held is not None and held.get("token") != self.token:
                    self.lost = True
                    print(f"Warning: {self.workdir.lock_file} now names another run ({_holder(held)}); "
                          "two runs may be writing this workdir.", file=sys.stderr, flush=True)
                    return
                _write(self.workdir.lock_file, json.dumps(self._record()).encode())
            except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried, never fatal
                print(f"Warning: could not refresh {self.workdir.lock_file} ({error}).", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this run's."""
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with contextlib.suppress(Exception):  # best effort: a lock left behind is stale soon
            if (read_lock(self.workdir.lock_file) or {}).get("token") == self.token:
                self.workdir.lock_file.unlink()

    close = release  # closed with the run's other resources


def _write(target, data: bytes) -> None:
    """Replaces the lock record whole: a reader never sees half of it (an object store's writes are
    whole already; a local file is written aside and renamed)."""
    if paths.is_remote(os.fspath(target)):
        paths.write_bytes(target, data)
        return
    partial = f"{os.fspath(target)}.{uuid.uuid4().hex}.tmp"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, os.fspath(target))


def read_lock(path) -> dict | None:
    """The lock record at `path`, None when absent; an unreadable record counts as stale ({})."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        held = json.loads(text)
        return held if isinstance(held, dict) else {}
    except ValueError:
        return {}  # a half-written lock of a killed run


def is_stale(held: dict, *, now: float | None = None) -> bool:
    """Whether the run named by a lock record is gone (see the module docstring)."""
    heartbeat = held.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
        return True
    if (time.time() if now is None else now) - heartbeat > STALE_AFTER_S:
        return True
    if held.get("host") == socket.gethostname() and held.get("machine") == _machine_id():
        return not _pid_alive(held.get("pid"))
    return False


def _machine_id() -> str:
    """This boot of this machine (Linux's boot id): two machines that share a hostname differ in it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder(held: dict) -> str:
    age = time.time() - held["heartbeat"] if isinstance(held.get("heartbeat"), (int, float)) else None
    seen = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return f"host {held.get('host', '?')}, pid {held.get('pid', '?')}{seen}"


def _refusal(workdir: Workdir, held: dict) -> str:
    return (f"{workdir} is in use by a live run ({_holder(held)}); wait for it to finish or stop it, or use "
            f"another --workdir (a lock whose run was killed is taken over once its pid is gone, or "
            f"{STALE_AFTER_S:.0f} s after its last heartbeat: delete {workdir.lock_file} only if that run is dead).")
