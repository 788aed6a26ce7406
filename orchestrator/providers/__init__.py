"""Where workers run. Each backend only decides where processes start and how
addresses are found; all of them hand ``runner.run_experiment`` a ``WorkerPool``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.config import Experiment
from orchestrator.errors import ConfigError
from orchestrator.trial import SimPool, WorkerPool

BACKENDS = ("sim", "local")
DEFAULT_BACKEND = "sim"


@contextmanager
def open_pool(backend: str, exp: Experiment) -> Iterator[WorkerPool]:
    """The worker pool of a backend on this machine; everything it started is gone on exit."""
    if backend == "sim":
        yield SimPool()
        return
    raise ConfigError("--backend", f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
