"""Where workers run. Each backend only decides where processes start and how
addresses are found; all of them hand ``runner.run_experiment`` a ``WorkerPool``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.config import Experiment
from orchestrator.errors import ConfigError
from orchestrator.trial import SimPool, WorkerPool

BACKENDS = ("sim", "local")
DEFAULT_BACKEND = "local"


@contextmanager
def open_pool(backend: str, exp: Experiment, **options: Any) -> Iterator[WorkerPool]:
    """The worker pool of a backend on this machine; everything it started is gone on exit.

    ``options`` are backend-specific: ``listen`` (hidden: the master of a cluster whose
    agents someone else starts) takes ``bind`` (tcp://0.0.0.0:PORT), ``curve_dir`` and
    ``progress``."""
    if backend == "sim":
        yield SimPool()
        return
    if backend == "local":
        from orchestrator.providers.local import local_pool

        with local_pool(exp) as pool:
            yield pool
        return
    if backend == "listen":
        from orchestrator.master import listen_pool

        with listen_pool(exp, **options) as pool:
            yield pool
        return
    raise ConfigError("--backend", f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
