"""Checkpoints with orbax: async, atomic, keep the last K, restore onto any mesh, and say
what is wrong when a checkpoint cannot be read or written.

A checkpoint at step N holds, as one orbax `Composite`:

* `state`: the train state pytree (step, parameters, optimizer state) - `StandardSave`;
* `meta`: JSON with the data iterator state, the PRNG seed and run information.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed at any moment (kill -9 included) leaves the previous checkpoints intact and
`latest_step()` only ever sees complete ones. Restoring takes an abstract train state whose
leaves carry the target shardings, so a checkpoint written on one mesh restores onto another.

What atomic commits cannot protect is what happens to the files later (a truncated copy, a
disk error, an edited metadata file). `restore_newest` then skips the damaged step with a
warning and restores the newest readable one; a damaged step is never deleted (orbax's
preservation policy keeps it out of garbage collection) and later saves leave it alone.
A stored state whose structure or shapes differ from the wanted one is not damage but a
changed config: that is a `ConfigMismatch` naming the first differing array. A failed write
(full disk, permissions, a quota) is a `CheckpointSaveFailed` naming the directory, raised
by the save that failed or, for an async save, by the next save or `close()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from big_contrast import paths
from big_contrast.errors import CheckpointSaveFailed, ConfigMismatch, DamagedCheckpoint, MissingFileError, short_reason
from big_contrast.logs import orbax_records_held_on_failure, silence_closed_event_loop
from big_contrast.sharding import path_str
from big_contrast.workdir import check_checkpoint_location


@dataclasses.dataclass
class _KeepSteps:
    """An orbax preservation policy: keeps the steps in `steps` (a set that grows as damaged
    checkpoints are found), whatever the other policies decide."""

    steps: set

    def should_preserve(self, checkpoints, *, context):
        del context
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for the train state + JSON metadata."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        # A local folder is made absolute (orbax wants that); a gs:// / s3:// URL stays the URL
        # every process passes, so all hosts of a run write one checkpoint through orbax.
        check_checkpoint_location(directory)
        self.directory = paths.parse(directory)
        if not paths.is_remote(directory):
            self.directory = self.directory.absolute()
        self.damaged: set[int] = set()  # steps found unreadable: kept, never overwritten
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), _KeepSteps(self.damaged)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # step of an async save not yet known to be written

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_good_step(self) -> int | None:
        good = [s for s in self.all_steps() if s not in self.damaged and s != self._pending]
        return max(good, default=None)

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; `wait` blocks until written.

        Returns False, saving nothing, when `step` is a damaged checkpoint kept for inspection.
        Raises `CheckpointSaveFailed` for this save or for an earlier async one that failed.
        """
        if step in self.damaged:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._finish_pending()  # orbax's save would raise the previous save's error itself
        try:
            self._pending = step
            self._manager.save(step, args=args, force=True)
        except Exception as error:  # noqa: BLE001 - any write error, re-raised as one sentence
            raise self._save_failed(step, error) from error
        if wait:
            self._finish_pending()
        return True

    def _finish_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - the async save's write error
            raise self._save_failed(self._pending, error) from error
        finally:
            self._pending = None

    def _save_failed(self, step, error) -> CheckpointSaveFailed:
        silence_closed_event_loop()  # the failed save's other writes report at garbage collection
        self._pending = None
        previous = self.latest_good_step()
        kept = (f"the checkpoint of step {previous} is intact" if previous is not None
                else "no earlier checkpoint exists")
        return CheckpointSaveFailed(
            f"Saving the checkpoint of step {step} in {self.directory} failed ({short_reason(error)}); "
            f"{kept}. Free disk space or fix the directory's permissions or quota, then resume.")

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) of checkpoint `step` (default: the latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the wanted shardings.
        Raises `ConfigMismatch` when the stored arrays differ from it, `DamagedCheckpoint` when
        the step cannot be read.
        """
        step = self._existing_step(step)
        with orbax_records_held_on_failure():  # a damaged step: our one sentence, not orbax's logs
            self.check_structure(abstract_state, step)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as error:  # noqa: BLE001 - whatever the files' damage, one sentence
                raise self._damaged(step, error) from error
            if not isinstance(restored["meta"], dict):
                raise self._damaged(step, ValueError("its metadata is not a JSON object"))
        return restored["state"], restored["meta"], step

    def restore_newest(self, abstract_state: Any, *, accept: Callable[[dict, int], Any] | None = None,
                       warn: Callable[[str], None] = print) -> tuple[Any, dict, int, Any] | None:
        """(state, meta, step, accepted) of the newest checkpoint that restores, or None when
        there is none. A step that cannot be restored, or whose `meta` makes `accept(meta,
        step)` raise `DamagedCheckpoint` (e.g. a data iterator state that does not parse), is
        reported through `warn`, marked damaged (kept, never overwritten) and skipped.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                # A function of the step gives each step its own target (shapes that change
                # between training stages, `train/staged.py`).
                target = abstract_state(step) if callable(abstract_state) else abstract_state
                state, meta, _ = self.restore(target, step)
                return state, meta, step, accept(meta, step) if accept else None
            except DamagedCheckpoint as error:
                self.damaged.add(step)
                older = [s for s in steps if s < step]
                then = f"trying step {older[0]}" if older else "no older checkpoint is left"
                warn(f"Warning: {error} Left in place for inspection; {then}.")
        if steps:
            raise DamagedCheckpoint(
                steps[0], f"No checkpoint in {self.directory} can be restored (steps {sorted(steps)}, see the "
                "warnings above); restore a copy of the directory, or start again in a new --workdir.")
        return None

    def check_structure(self, abstract_state: Any, step: int) -> None:
        """Raises `ConfigMismatch` naming the first array whose path or shape differs between
        checkpoint `step` and `abstract_state` (before any array is read)."""
        silence_closed_event_loop()  # a failed read leaves callbacks into a closed event loop
        try:
            stored = self._manager.item_metadata(step)["state"]
            stored = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
        except Exception as error:  # noqa: BLE001 - unreadable tree metadata is damage
            raise self._damaged(step, error) from error
        wanted = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        if stored == wanted:
            return
        missing = [p for p in wanted if p not in stored]
        extra = [p for p in stored if p not in wanted]
        changed = [p for p in wanted if p in stored and stored[p] != wanted[p]]
        _check_ema_present(missing, extra, step, self.directory)
        if changed:
            what = f"{changed[0]} has shape {stored[changed[0]]} there and {wanted[changed[0]]} in this config"
        elif missing:
            what = f"this config has {missing[0]}, which the checkpoint does not"
        else:
            what = f"the checkpoint has {extra[0]}, which this config does not"
        raise ConfigMismatch(
            f"The checkpoint of step {step} in {self.directory} was written with another model or optimizer "
            f"config: {what}. Use the config it was trained with, or a new --workdir.")

    def _existing_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingFileError(f"No checkpoint in {self.directory}; train first or pass another --workdir.")
        if step not in self.all_steps():
            raise MissingFileError(
                f"No checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}.")
        return step

    def _damaged(self, step: int, error: BaseException) -> DamagedCheckpoint:
        return DamagedCheckpoint(
            step, f"The checkpoint of step {step} in {self.directory} cannot be restored: {short_reason(_root_cause(error))}.")

    def restore_arrays(self, step: int | None = None) -> tuple[Any, int]:
        """(state, step) as host arrays in the saved structure, without an abstract target: for
        reading parts of a checkpoint (a tower's weights) whatever model or mesh wrote it."""
        step = self._existing_step(step)
        silence_closed_event_loop()
        try:
            # Single-device targets from the saved metadata: any topology (a pod's checkpoint on
            # a laptop) restores, which orbax refuses without a target.
            target = _one_device_target(self.directory / str(step) / "state")
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as error:  # noqa: BLE001 - whatever the files' damage, one sentence
            raise self._damaged(step, error) from error
        return restored["state"], step

    def close(self) -> None:
        """Waits for a pending async save (raising `CheckpointSaveFailed` if it failed), then
        closes the manager's threads whatever happened."""
        try:
            self._finish_pending()
        finally:
            self._manager.close()


def _check_ema_present(missing, extra, step, directory) -> None:
    """A config that turns `config.ema` on (or off) over a run whose checkpoints lack (or hold) the
    EMA of the parameters: one sentence saying so, rather than the first differing array."""
    ema_only = lambda paths: bool(paths) and all(p.split("/")[0] == "ema" for p in paths)  # noqa: E731
    if ema_only(missing) and not extra:
        raise ConfigMismatch(
            f"config.ema is on but the checkpoint of step {step} in {directory} holds no EMA of the parameters "
            "(it was written with config.ema off): resume with config.ema=None, or start a new --workdir.")
    if ema_only(extra) and not missing:
        raise ConfigMismatch(
            f"The checkpoint of step {step} in {directory} holds an EMA of the parameters but config.ema is off: "
            "resume with the config.ema it was trained with, or start a new --workdir.")


def _root_cause(error: BaseException) -> BaseException:
    """The innermost explicit cause: orbax wraps tensorstore's specific message ("Requested
    byte range ... is not valid for value of size 100") in a generic one with the JSON spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _one_device_target(state_dir) -> Any:
    metadata = ocp.StandardCheckpointHandler().metadata(state_dir)  # the checkpointer's warns (teacher.py)
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct` leaves for `tree`, with `shardings` (a matching pytree) or their own."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
