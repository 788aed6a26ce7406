"""The ``local`` backend: the master in this process on 127.0.0.1, M agent processes.

Every process it starts is tracked by PID and gone when the context exits, whatever the
reason (end of run, crash, Ctrl-C, SIGTERM): STOP first, then SIGTERM, then SIGKILL after a
grace period. Agents run in their own session, so a terminal's Ctrl-C reaches only this
process, which records the interrupted trial before stopping them; and should this process
die without cleaning up, each agent exits by itself once the master has been silent for
``heartbeat_interval * heartbeat_liveness`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.config import Experiment
from orchestrator.errors import RunError, interrupt_handler
from orchestrator.master import ZmqPool
from worker.node import SCHED_ENV, usable_cpus

GRACE_S = 3.0
SINGLE_THREADED = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                    "MKL_NUM_THREADS")}


def agent_argv(master: str, rank: int, timeout: float) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "agent", "--master", master,
            "--rank", str(rank), "--timeout", f"{timeout:g}"]


def agent_env(workers: int, cpus: int | None = None) -> dict[str, str]:
    """The agents' environment: one BLAS thread each, and SCHED_BATCH when the agents and
    the master outnumber the cores (``worker.node.batch_scheduling``: rounds 0.82-0.92x as
    long with 8 agents on 2 cores, 1.07x with 1). A ``RELUFIT_AGENT_SCHED`` already set wins."""
    env = {**os.environ, **SINGLE_THREADED}
    if workers + 1 > (usable_cpus() if cpus is None else cpus):
        env.setdefault(SCHED_ENV, "batch")
    return env


@contextmanager
def local_pool(exp: Experiment) -> Iterator[ZmqPool]:
    """A connected ``ZmqPool`` with one agent process per rank of the largest trial."""
    pool = ZmqPool.for_experiment(exp, "tcp://127.0.0.1:*")
    procs: list[subprocess.Popen] = []
    restore = _sigterm_as_interrupt()
    try:
        env = agent_env(pool.workers)
        for rank in range(pool.workers):
            procs.append(subprocess.Popen(
                agent_argv(pool.endpoint, rank, exp.cluster.connect_timeout), env=env,
                stdin=subprocess.DEVNULL, start_new_session=True,
            ))
        pool.processes = procs  # for tests and diagnostics
        pool.wait_for_workers(exp.cluster.connect_timeout, check=lambda: _check_alive(procs))
        yield pool
    finally:
        try:
            pool.close()
        finally:
            stop_processes(procs)
            restore()


def _check_alive(procs: list[subprocess.Popen]) -> None:
    for rank, p in enumerate(procs):
        if p.poll() is not None:
            raise RunError(f"agent rank {rank} (pid {p.pid}) exited with code {p.returncode} "
                           "before connecting; see its message above")


def stop_processes(procs: list[subprocess.Popen], grace: float = GRACE_S) -> None:
    """Wait for each process to exit after STOP; SIGTERM, then SIGKILL, the ones that do not.
    A second Ctrl-C during the wait skips straight to SIGKILL: nothing is left behind."""
    try:
        _wait_all(procs, grace)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        _wait_all(procs, 1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C (status interrupted, agents stopped); returns the
    function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    previous = signal.signal(signal.SIGTERM, interrupt_handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
