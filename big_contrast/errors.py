"""Errors a user can fix: one base class, `BigContrastError`, for every expected failure.

Every expected failure says in one sentence what went wrong and what to change. The CLI
turns a `BigContrastError` (and absl's flag errors) into exit status 2 and that sentence on
stderr; the traceback is shown only with `--debug` (or BIG_CONTRAST_DEBUG=1). Anything else
(a bare `ValueError`, a `KeyError`, ...) is a bug in this package or a library and keeps its
traceback. `ConfigError` and `MissingFileError` also inherit `ValueError` / `FileNotFoundError`
so that callers (and tests) that catch those still do.

The log filters that keep library noise off stderr live in `big_contrast.logs`.
"""

from __future__ import annotations

import re


class BigContrastError(Exception):
    """An expected failure whose message says what to change."""


class ConfigError(BigContrastError, ValueError):
    """A config value, flag or input that cannot work; the message says what to change."""


class MissingFileError(BigContrastError, FileNotFoundError):
    """A file or folder the user named (or a step they asked for) does not exist."""


class ConfigMismatch(BigContrastError, ValueError):
    """The config cannot resume the state stored in the workdir."""


class CheckpointError(BigContrastError):
    """A checkpoint cannot be read or written."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step exists but cannot be restored (truncated files, bad metadata)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class CheckpointSaveFailed(CheckpointError):
    """Writing a checkpoint failed (full disk, permissions, a quota)."""


class StartupError(BigContrastError):
    """The processes of a multi-host run could not start together."""


class UsageError(BigContrastError):
    """A command line that lacks or misuses a flag."""


USER_ERRORS = (BigContrastError,)


def short_reason(error: BaseException, limit: int = 240) -> str:
    """The first line of `error`, cut to `limit` characters from its end (where tensorstore
    and orbax put the specific cause, after the chain of drivers that reported it)."""
    text = (str(error).strip().splitlines() or [""])[0].strip() or type(error).__name__
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)  # the JSON spec of the failed read
    if isinstance(error, KeyError):
        text = text.strip("'\"")
    return text if len(text) <= limit else "..." + text[-limit:]
