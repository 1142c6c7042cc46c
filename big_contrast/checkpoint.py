"""Checkpoints with orbax: async, atomic, keep the last K, restore onto any mesh.

A checkpoint at step N holds, as one orbax `Composite`:

* `state`: the train state pytree (step, parameters, optimizer state) - `StandardSave`;
* `meta`: JSON with the data iterator state, the PRNG seed and run information.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed at any moment (kill -9 included) leaves the previous checkpoints intact and
`latest_step()` only ever sees complete ones. Restoring takes an abstract train state whose
leaves carry the target shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for the train state + JSON metadata."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
        """Starts an (async) save of `state` and `meta` at `step`; `wait` blocks until written."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) of checkpoint `step` (default: the latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the wanted shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}; train first or pass another --workdir.")
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}."
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"], step

    def restore_arrays(self, step: int | None = None) -> tuple[Any, int]:
        """(state, step) as host arrays in the saved structure, without an abstract target: for
        reading parts of a checkpoint (a tower's weights) whatever model or mesh wrote it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        # Single-device targets from the saved metadata: any topology (a pod's checkpoint on a
        # laptop) restores, which orbax refuses without a target.
        target = _one_device_target(self.directory / str(step) / "state")
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"], step

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _one_device_target(state_dir) -> Any:
    metadata = ocp.StandardCheckpointer().metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct` leaves for `tree`, with `shardings` (a matching pytree) or their own."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
