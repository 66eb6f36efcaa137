"""Errors a user can act on.

Every layer raises :class:`UserError` (or a subclass) for bad input; the CLI prints its message as one
line and exits with code 2. The message names the problem and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a config, a flag, a file or a device request that cannot be honoured."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded as it is."""


class DeviceUnavailableError(UserError):
    """The requested device (or a device feature) is not available here; we never fall back silently."""


class MemoryAbort(RuntimeError):
    """The memory watchdog's hard threshold was crossed; the running work was aborted.

    Not a UserError: callers (the study's trial worker) classify it as a memory failure.
    """
