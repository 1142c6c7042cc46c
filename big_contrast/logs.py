"""Log and warning filters: the noise orbax, tensorstore and asyncio print around a failure
that has already been reported in one sentence.

None of this is an error: a failed save or restore is raised as a `big_contrast.errors`
error; what these filters drop is the same failure seen again from a library's background
threads (a logged traceback, an abandoned read reported at garbage collection, a callback
into an event loop that is already closed). Everything else goes through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings


class _AbandonedIO(logging.Filter):
    """Drops asyncio's '... exception was never retrieved' for orbax / tensorstore reads and
    writes that a failed restore or save abandoned (their error is the one already reported)."""

    def filter(self, record):
        first_line = str(record.msg).split("\n", 1)[0]
        unretrieved = first_line.endswith("exception was never retrieved")
        return not (unretrieved and any(word in str(record.msg) for word in ("tensorstore", "orbax", "OCDBT")))


class _LibraryTracebacks(logging.Filter):
    """Drops the tracebacks orbax logs from its background threads when a save or restore
    fails: the error reaches the caller, which reports it in one sentence."""

    def filter(self, record):
        if not record.exc_info or record.exc_info[2] is None:
            return True
        files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(record.exc_info[2])]
        return not any(f"{os.sep}orbax{os.sep}" in name for name in files)


class _HoldOrbaxRecords(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record):
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        self.held.append(record)
        return False


@contextlib.contextmanager
def orbax_records_held_on_failure():
    """Holds what orbax logs inside the block (e.g. 'Failed to json parse Metadata file' for a
    truncated checkpoint): released as logged if the block succeeds, dropped if it raises, as
    the error then says what went wrong in one sentence."""
    holder = _HoldOrbaxRecords()
    logger = logging.getLogger("absl")
    logger.addFilter(holder)
    try:
        yield
    except BaseException:
        logger.removeFilter(holder)
        raise
    logger.removeFilter(holder)
    for record in holder.held:
        logger.handle(record)


def quiet_library_tracebacks() -> None:
    """For the CLI without --debug: orbax's logged tracebacks and asyncio's reports of the
    I/O a failure abandoned stay off stderr."""
    logging.getLogger("absl").addFilter(_LibraryTracebacks())
    logging.getLogger("asyncio").addFilter(_AbandonedIO())
    # A failed async save leaves orbax's unstarted write coroutines behind; Python reports each
    # at exit ("coroutine ... was never awaited"): noise once the failure has been reported.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def _abandoned_orbax_coroutine(unraisable) -> bool:
    """An orbax coroutine that a failed restore left suspended, closed by the garbage
    collector: its `except BaseException` turns the close into a new exception (one per
    unread array, each with a traceback and the TensorStore spec: thousands of lines)."""
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def silence_closed_event_loop() -> None:
    """Drops the 'RuntimeError: Event loop is closed' that tensorstore callbacks raise when a
    failed orbax restore has already closed its asyncio loop (reads still in flight finish
    later, possibly while the interpreter shuts down), the exceptions raised when the garbage
    collector closes the orbax read coroutines such a restore abandoned, and asyncio's report
    of the reads and writes a failed restore or save abandoned; every other unraisable
    exception and log record goes through. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_noise", False):
        return

    # Everything the hook uses is bound now: at shutdown this module's globals are cleared
    # while the hook can still be called.
    def hook(unraisable, previous=previous, noise=RuntimeError("Event loop is closed"),
             abandoned=_abandoned_orbax_coroutine):
        error = unraisable.exc_value
        if not (type(error) is type(noise) and error.args == noise.args) and not abandoned(unraisable):
            previous(unraisable)

    hook._drops_closed_loop_noise = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedIO())
