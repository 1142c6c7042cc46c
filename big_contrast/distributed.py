"""One process per host on JAX's multi-controller runtime (`jax.distributed`).

* explicit: `--coordinator ADDR:PORT --num_processes N --process_id I` (any cluster, or
  several processes on one machine for testing);
* detected: on Cloud TPU pod slices and under SLURM (more than one task) JAX finds the
  coordinator itself, so `big-contrast train` needs no flags there;
* nothing on a single host.

On CPU the cross-process collectives go through gloo. A process that cannot reach the
coordinator fails after `timeout_s` with a sentence instead of hanging.

`set_xla_flag_defaults()` (the CLI calls it first) adds XLA flags the trainer relies on to
`XLA_FLAGS` before jax starts its backends: on GPU the latency-hiding scheduler, which lets
the ring's transfers and the gradient reduction overlap compute. A flag the user already
set in `XLA_FLAGS` wins (e.g. `--xla_gpu_enable_latency_hiding_scheduler=false`).
"""

from __future__ import annotations

import os
import socket
import time

import jax

from big_contrast.errors import ConfigError


XLA_FLAG_DEFAULTS = {"xla_gpu_enable_latency_hiding_scheduler": "true"}


def set_xla_flag_defaults(environ=os.environ) -> str:
    """Adds each of `XLA_FLAG_DEFAULTS` that `XLA_FLAGS` does not set yet; returns the flags.

    Call before jax initialises its backends (the first computation or device query). Nothing
    changes when `JAX_PLATFORMS` names no GPU platform (e.g. the CPU tests, whose compilation
    cache keys include XLA_FLAGS).
    """
    flags = environ.get("XLA_FLAGS", "")
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return flags
    for name, value in XLA_FLAG_DEFAULTS.items():
        if f"--{name}=" not in flags and f"--{name} " not in f"{flags} ":
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return flags


def cluster_detected() -> bool:
    """True where `jax.distributed.initialize()` can find the cluster on its own."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_workers


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 120) -> bool:
    """Starts the distributed runtime when asked for or detected; returns whether it did."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ConfigError("Multi-host needs all of --coordinator ADDR:PORT, --num_processes N and --process_id I "
                         f"(got coordinator={coordinator}, num_processes={num_processes}, process_id={process_id}).")
    if coordinator is None and not cluster_detected():
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None and process_id != 0:
        # JAX's client aborts the whole process (no Python exception) when it gives up, so
        # check the coordinator is reachable first and fail with a sentence if it is not.
        _wait_for_coordinator(coordinator, process_id, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - re-raised with what to check
        where = coordinator or "the detected cluster's coordinator"
        raise RuntimeError(
            f"Process {process_id} could not join the distributed run through {where} within {timeout_s} s "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check that process 0 "
            "is running, that the address and port are reachable from this host, and that every process got "
            "the same --num_processes."
        ) from error
    return True


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator={address!r} must be HOST:PORT, e.g. 10.0.0.2:1234.")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Process {process_id} could not join the distributed run: nothing answered at the "
                    f"coordinator {address} for {timeout_s:g} s ({error}). Start process 0 first (it hosts the "
                    "coordinator), check the address and port are reachable from this host, or raise "
                    "--distributed_timeout."
                ) from None
            time.sleep(0.5)
