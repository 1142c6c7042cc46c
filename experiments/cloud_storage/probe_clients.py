"""Which storage clients work against a local GCS emulator (gcp-storage-emulator on loopback).

    python experiments/cloud_storage/probe_clients.py

Starts the emulator, sets STORAGE_EMULATOR_HOST, then tries, each with its wall time:
epath/gcsfs write+read+glob, orbax CheckpointManager save+restore (tensorstore), tensorboardX
SummaryWriter on a gs:// logdir, and tensorboardX through a local folder + upload.
"""
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.cloud_fixtures import gcs_emulator_process  # noqa: E402


def attempt(name, fn):
    start = time.perf_counter()
    try:
        detail = fn()
        print(f"OK    {name:<34} {time.perf_counter() - start:6.2f} s  {detail or ''}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"FAIL  {name:<34} {time.perf_counter() - start:6.2f} s  {type(e).__name__}: {str(e)[:300]}", flush=True)
        if os.environ.get("PROBE_DEBUG"):
            traceback.print_exc()


def main():
    # Keep every credential probe on loopback: no metadata-server lookups off this machine.
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        os.environ.setdefault(name, "127.0.0.1:9")
    os.environ.setdefault("NO_GCE_CHECK", "true")
    with gcs_emulator_process("probe-bucket") as host:
        os.environ["STORAGE_EMULATOR_HOST"] = host
        from big_contrast import paths

        paths.configure_emulator()
        print("TENSORSTORE_GCS_HTTP_URL =", os.environ.get("TENSORSTORE_GCS_HTTP_URL"))

        def epath_rw():
            paths.write_bytes("gs://probe-bucket/a/x.bin", b"hello" * 1000)
            data = paths.read_bytes("gs://probe-bucket/a/x.bin")
            assert data == b"hello" * 1000
            with paths.parse("gs://probe-bucket/a/log.txt").open("w") as f:
                f.write("line\n")
            return f"glob={paths.glob('gs://probe-bucket/a/*')}"

        def orbax_roundtrip():
            import jax.numpy as jnp
            import numpy as np
            import orbax.checkpoint as ocp

            tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3)}
            options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=True)
            mgr = ocp.CheckpointManager("gs://probe-bucket/run/checkpoints", options=options)
            args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"k": 1}))
            mgr.save(3, args=args)
            mgr.wait_until_finished()
            mgr.close()
            mgr = ocp.CheckpointManager("gs://probe-bucket/run/checkpoints", options=options)
            step = mgr.latest_step()
            restored = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()))
            np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
            mgr.close()
            return f"latest_step={step}, objects={len(paths.glob('gs://probe-bucket/run/checkpoints/*'))}"

        def tensorboardx_direct():
            from tensorboardX import SummaryWriter

            w = SummaryWriter("gs://probe-bucket/run/tb_direct")
            w.add_scalar("loss", 1.0, 0)
            w.close()
            return f"files={paths.glob('gs://probe-bucket/run/tb_direct/*')}"

        def epath_append():
            target = paths.parse("gs://probe-bucket/a/metrics.jsonl")
            with target.open("a") as f:
                f.write("1\n")
            with target.open("a") as f:
                f.write("2\n")
            content = target.read_text()
            if content != "1\n2\n":
                raise RuntimeError(f"append lost data: the object holds {content!r}, not '1\\n2\\n'")
            return f"content={content!r}"

        def array_record_direct():
            """In a subprocess with a 20 s limit: the reader has been seen to hang on gs://."""
            import subprocess

            from array_record.python.array_record_module import ArrayRecordWriter

            local = "/tmp/probe.array_record"
            writer = ArrayRecordWriter(local, "group_size:1")
            writer.write(b"r0")
            writer.close()
            paths.write_bytes("gs://probe-bucket/d/x.array_record", open(local, "rb").read())
            code = ("from array_record.python.array_record_module import ArrayRecordReader; "
                    "print(ArrayRecordReader('gs://probe-bucket/d/x.array_record').num_records())")
            try:
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
            except subprocess.TimeoutExpired:
                raise TimeoutError("ArrayRecordReader(gs://...) did not return within 20 s") from None
            if out.returncode:
                raise RuntimeError(out.stderr.strip().splitlines()[-1])
            return f"records={out.stdout.strip()}"

        def gcsfs_with_layout_probe():
            """gcsfs's default (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT unset): a fresh process, 90 s cap."""
            import subprocess

            env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
            code = ("import fsspec, time; fs = fsspec.filesystem('gcs', token='anon'); t = time.time(); "
                    "fs.pipe('probe-bucket/hns/x', b'1'); print(f'{time.time() - t:.1f} s for the first write')")
            try:
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
            except subprocess.TimeoutExpired:
                raise TimeoutError("the first write did not finish within 90 s") from None
            if out.returncode:
                raise RuntimeError(out.stderr.strip().splitlines()[-1])
            return out.stdout.strip()

        attempt("epath/gcsfs write, read, glob", epath_rw)
        attempt("gcsfs default (gRPC layout probe on)", gcsfs_with_layout_probe)
        attempt("epath/gcsfs open('a') twice", epath_append)
        attempt("ArrayRecordReader(gs://...)", array_record_direct)

        attempt("orbax save + restore (tensorstore)", orbax_roundtrip)
        attempt("tensorboardX SummaryWriter(gs://)", tensorboardx_direct)


if __name__ == "__main__":
    main()
