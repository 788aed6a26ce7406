"""Small structured exceptions; cli.main is the one place that turns them into exit codes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RelufitError(Exception):
    """A failure the user can act on. ``str()`` is the one-line message shown to them."""

    exit_code = 1


class ConfigError(RelufitError):
    """Bad user input in an experiment, cluster or hosts file, or a --set override."""

    exit_code = 2

    def __init__(self, key: str, why: str):
        self.key = key
        self.why = why
        super().__init__(f"{key}: {why}" if key else why)


class CloudError(RelufitError):
    """An AWS call failed in a way the user can fix (credentials, quota, capacity...)."""


class SSHError(RelufitError):
    """A failure on one host, printed as ``[host] message``."""

    def __init__(self, host: str, message: str):
        self.host = host
        self.message = message
        super().__init__(f"[{host}] {message}")


class RunError(RelufitError):
    """A run could not start or finish (workers did not connect, a backend failed)."""


# ------------------------------------------------------------------ interruption
# Ctrl-C and SIGTERM end a run through KeyboardInterrupt. A KeyboardInterrupt raised while a C
# extension cleans up (pyzmq's Frame dealloc) is printed as "Exception ignored" and lost, and
# the run would go on until killed; the flag survives it, and run_trial raises it again at
# the next round.
INTERRUPT_REQUESTED = threading.Event()
_DEFERRING = [0]  # > 0: inside deferred_interrupts(), where the handler only notes a request


def interrupt_handler(signum: int, frame: object) -> None:
    """Signal handler for SIGINT and SIGTERM: note the request, then interrupt (at once, or
    at the end of a ``deferred_interrupts`` section)."""
    INTERRUPT_REQUESTED.set()
    if not _DEFERRING[0]:
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A section that Ctrl-C or SIGTERM must not cut in two (a round's row handed on and the
    round counted); a request made inside it raises KeyboardInterrupt as the section ends."""
    _DEFERRING[0] += 1
    try:
        yield
    finally:
        _DEFERRING[0] -= 1
    if not _DEFERRING[0] and INTERRUPT_REQUESTED.is_set():
        raise KeyboardInterrupt
