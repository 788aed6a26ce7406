"""The one round loop that every backend drives.

``run_trial`` owns the master's side of SGD: it sends the weights down (``ps``),
relays last round's gradients (``allgather``) or sends last round's mean gradient,
compressed like the workers' gradients (``broadcast``); it receives the workers' encoded
gradients in rank order, decodes, averages, steps, and reports one ``RoundRow``
per round. *Where* the workers run is hidden behind a ``WorkerPool``: ``SimPool``
below calls ``WorkerNode`` in-process; the ZeroMQ master implements the same three
methods over sockets. Because both hand the loop the same bytes in the same order,
every backend produces the same ``rel_error`` sequence as ``sim``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from orchestrator.errors import INTERRUPT_REQUESTED, deferred_interrupts
from worker import node, relu
from worker.node import TrialSpec, WorkerNode


@dataclass
class Reply:
    """One worker's answer to one round."""

    rank: int
    payload: bytes
    compute_s: float = 0.0
    encode_s: float = 0.0


@dataclass
class Exchange:
    """What a pool returns for one round: replies in rank order, and what it cost."""

    replies: list[Reply]
    bytes_up: int
    bytes_down: int
    network_s: float = 0.0
    lost: list[tuple[int, str]] = field(default_factory=list)  # (rank, reason) lost this round


class WorkerPool(Protocol):
    """Where the workers run. ``down``: the float32 weights (ps), None (allgather), or the
    encoded mean of last round (broadcast; b"" in round 0)."""

    def start_trial(self, spec: TrialSpec) -> None: ...

    def exchange(self, round_: int, down: bytes | None, relay: list[Reply]) -> Exchange: ...

    def end_trial(self) -> None: ...


@dataclass
class RoundRow:
    trial: int
    round: int
    elapsed_s: float
    rel_error: float
    loss: float
    bytes_up: int
    bytes_down: int
    workers: int
    t_compute: float
    t_encode: float
    t_network: float
    t_decode: float
    t_update: float


COLUMNS = tuple(RoundRow.__dataclass_fields__)
DIVERGED = 1e6  # rel_error beyond this is divergence: stop before float32 overflows


class TrialFailed(Exception):
    """The trial stopped before its end for a recorded reason (e.g. a lost worker under abort)."""


@dataclass
class TrialResult:
    status: str  # completed | failed | interrupted
    rounds: int
    final_rel_error: float
    total_bytes_up: int
    total_bytes_down: int
    wall_time_s: float
    reached_target: bool
    reason: str = ""
    lost_workers: list[int] = field(default_factory=list)


class TrialInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that carries the interrupted trial's result."""

    def __init__(self, result: TrialResult):
        super().__init__()
        self.result = result


def run_trial(
    spec: TrialSpec,
    pool: WorkerPool,
    on_round: Callable[[RoundRow], None],
    on_event: Callable[[str], None] = lambda msg: None,
    on_worker_loss: str = "continue",
) -> TrialResult:
    """Drive one trial to its end; KeyboardInterrupt propagates after the result is known.

    Every completed round has been handed to ``on_round`` before anything else happens,
    so a caller that writes rows as they come loses nothing on failure or Ctrl-C.
    """
    w_star = relu.planted_weights(spec.d, spec.seed)
    w = np.zeros(spec.d)
    totals = {"up": 0, "down": 0}
    lost: list[int] = []
    relay: list[Reply] = []
    update = b""  # broadcast: last round's encoded mean, which every replica applies
    down_rng = relu.down_quant_rng(spec.seed)
    start = time.perf_counter()
    rounds_done, err = 0, relu.rel_error(w, w_star)

    def result(status: str, reason: str = "") -> TrialResult:
        return TrialResult(
            status, rounds_done, err, totals["up"], totals["down"],
            time.perf_counter() - start, bool(err <= spec.target_rel_error), reason, list(lost),
        )

    pool.start_trial(spec)
    try:
        for r in range(spec.rounds):
            if INTERRUPT_REQUESTED.is_set():  # a KeyboardInterrupt that was swallowed
                raise KeyboardInterrupt
            if spec.topology == "ps":
                down: bytes | None = node.encode_weights(w)
            else:
                down = update if spec.topology == "broadcast" else None
            ex = pool.exchange(r, down, relay)
            for rank, why in ex.lost:
                lost.append(rank)
                on_event(f"trial {spec.trial} round {r}: worker {rank} lost ({why})")
                if on_worker_loss == "abort":
                    raise TrialFailed(
                        f"worker {rank} lost in round {r} ({why}); on_worker_loss=abort"
                    )
            if not ex.replies:
                raise TrialFailed(f"no worker left in round {r}")
            t0 = time.perf_counter()
            try:
                g = node.aggregate([rep.payload for rep in ex.replies], spec)
            except ValueError as e:  # a payload that passed the pool's checks but not decode
                raise TrialFailed(f"undecodable gradient in round {r}: {e}") from None
            t1 = time.perf_counter()
            master_encode_s = 0.0
            if spec.topology == "broadcast":  # the replicas take this exact step next round
                update, g = node.encode_exact(g, spec, down_rng)
                master_encode_s = time.perf_counter() - t1
            w = w - spec.lr * g
            err = relu.rel_error(w, w_star)
            t2 = time.perf_counter()
            relay = ex.replies
            row = RoundRow(
                spec.trial, r, time.perf_counter() - start, err, relu.population_loss(w, w_star),
                ex.bytes_up, ex.bytes_down, len(ex.replies),
                max(rep.compute_s for rep in ex.replies),
                max(rep.encode_s for rep in ex.replies) + master_encode_s,
                ex.network_s, t1 - t0, t2 - t1 - master_encode_s,
            )
            with deferred_interrupts():  # on Ctrl-C the rows handed on and the count agree
                totals["up"] += ex.bytes_up
                totals["down"] += ex.bytes_down
                rounds_done = r + 1
                on_round(row)
            if not np.isfinite(err) or err > DIVERGED:
                raise TrialFailed(f"diverged in round {r} (rel_error {err}); lower train.lr")
            if spec.target_rel_error > 0 and err <= spec.target_rel_error:
                break
        return result("completed")
    except TrialFailed as e:
        on_event(f"trial {spec.trial} failed: {e}")
        return result("failed", str(e))
    except KeyboardInterrupt:
        on_event(f"trial {spec.trial} interrupted after {rounds_done} rounds")
        raise TrialInterrupted(result("interrupted", "interrupted by the user (Ctrl-C)")) from None
    finally:
        pool.end_trial()


class SimPool:
    """The reference backend: the M workers in this process, called in rank order."""

    def __init__(self) -> None:
        self.nodes: list[WorkerNode] = []

    def start_trial(self, spec: TrialSpec) -> None:
        self.nodes = [WorkerNode(spec, rank) for rank in range(spec.workers)]

    def exchange(self, round_: int, down: bytes | None, relay: list[Reply]) -> Exchange:
        replies, bytes_down = [], 0
        for nd in self.nodes:
            w = nd.weights_for_round(
                down, [None if rep.rank == nd.rank else rep.payload for rep in relay])
            if down is not None:
                bytes_down += len(down)
            else:
                bytes_down += sum(len(rep.payload) for rep in relay if rep.rank != nd.rank)
            res = nd.step(w, round_)
            replies.append(Reply(nd.rank, res.payload, res.compute_s, res.encode_s))
        return Exchange(replies, sum(len(r.payload) for r in replies), bytes_down)

    def end_trial(self) -> None:
        self.nodes = []
