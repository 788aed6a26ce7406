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
    bytes_peer: int = 0  # allreduce: what the workers sent each other
    # allreduce: a worker was lost mid-round, so the round did not finish; run it again
    # (the pool re-plans the chunks over the workers left)
    retry: bool = False


@dataclass
class Checkpoint:
    """A trial after ``round`` rounds, as much as it takes to go on exactly as if it had
    never stopped: the master's weights and step state, and every worker's generators.

    ``replica`` is what every replica holds before it applies last round's update: the
    weights one step back (broadcast, allgather), or ``w`` itself (allreduce, whose means
    travel between workers and are applied before anyone could stop); None for ps. The
    first round after a resume then sends what it would have sent anyway (``update``,
    ``relay``), so its bytes, too, are the uninterrupted run's."""

    trial: int
    round: int  # rounds done
    w: np.ndarray
    replica: np.ndarray | None
    workers: dict[int, dict]  # rank -> WorkerNode.generator_states()
    update: bytes = b""  # broadcast: last round's encoded mean
    relay: list[Reply] = field(default_factory=list)  # allgather: last round's gradients
    down_rng: dict | None = None  # broadcast: the master's quantizer generator
    totals: dict[str, int] = field(default_factory=dict)  # bytes so far: up, down, peer
    elapsed_s: float = 0.0


class WorkerPool(Protocol):
    """Where the workers run. ``down``: the float32 weights (ps), None (allgather), the
    encoded mean of last round (broadcast; b"" in round 0), or the master's weights as
    float64 (allreduce: sent only when the chunks are re-planned, to re-sync the replicas).
    ``relay``: last round's replies (allgather: gradients; allreduce: mean chunks).
    ``start_trial`` with a checkpoint takes every worker up where it left off;
    ``states`` is every worker's generator states between two rounds (rank -> states).
    ``run_trial`` sets ``run_ahead`` before each round: whether the pool may start the
    next round as soon as this one's replies are in, before its step is taken (False when
    a checkpoint follows the round, since the workers' states must be those between the
    two rounds). A pool that does (``ZmqPool``, allreduce) may thus have started one round
    that is not wanted when the trial stops at its target; nothing of it is recorded."""

    run_ahead: bool

    def start_trial(self, spec: TrialSpec, resume: Checkpoint | None = None) -> None: ...

    def exchange(self, round_: int, down: bytes | np.ndarray | None,
                 relay: list[Reply]) -> Exchange: ...

    def states(self, round_: int) -> dict[int, dict]: ...

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
    bytes_peer: int
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
    total_bytes_peer: int
    wall_time_s: float
    reached_target: bool
    reason: str = ""
    lost_workers: list[int] = field(default_factory=list)


class TrialInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that carries the interrupted trial's result."""

    def __init__(self, result: TrialResult):
        super().__init__()
        self.result = result


CHECKPOINT_S = 10.0  # train.checkpoint_rounds = 0: a checkpoint about this often


def run_trial(
    spec: TrialSpec,
    pool: WorkerPool,
    on_round: Callable[[RoundRow], None],
    on_event: Callable[[str], None] = lambda msg: None,
    on_worker_loss: str = "continue",
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint_rounds: int = 0,
) -> TrialResult:
    """Drive one trial to its end; KeyboardInterrupt propagates after the result is known.

    Every completed round has been handed to ``on_round`` before anything else happens,
    so a caller that writes rows as they come loses nothing on failure or Ctrl-C.
    ``on_checkpoint`` gets a ``Checkpoint`` every ``checkpoint_rounds`` rounds (0: about
    every ``CHECKPOINT_S`` seconds), while no worker has been lost; ``resume`` takes the
    trial up from one, after which every row is the uninterrupted run's but its times.
    """
    w_star = relu.planted_weights(spec.d, spec.seed)
    w, w_prev = np.zeros(spec.d), np.zeros(spec.d)
    totals = {"up": 0, "down": 0, "peer": 0}
    lost: list[int] = []
    relay: list[Reply] = []
    update = b""  # broadcast: last round's encoded mean, which every replica applies
    down_rng = relu.down_quant_rng(spec.seed)
    first = 0
    if resume is not None:
        w, relay, update, first = resume.w.copy(), list(resume.relay), resume.update, resume.round
        totals.update(resume.totals)
        if resume.down_rng is not None:
            down_rng.bit_generator.state = resume.down_rng
    start = time.perf_counter() - (resume.elapsed_s if resume else 0.0)
    last_checkpoint = time.perf_counter()
    rounds_done, err = first, relu.rel_error(w, w_star)

    def result(status: str, reason: str = "") -> TrialResult:
        return TrialResult(
            status, rounds_done, err, totals["up"], totals["down"], totals["peer"],
            time.perf_counter() - start, bool(err <= spec.target_rel_error), reason, list(lost),
        )

    def due(r: int) -> bool:
        if on_checkpoint is None or lost or r + 1 >= spec.rounds:
            return False
        if checkpoint_rounds > 0:
            return (r + 1) % checkpoint_rounds == 0
        return time.perf_counter() - last_checkpoint >= CHECKPOINT_S

    pool.start_trial(spec, resume)
    try:
        for r in range(first, spec.rounds):
            if INTERRUPT_REQUESTED.is_set():  # a KeyboardInterrupt that was swallowed
                raise KeyboardInterrupt
            checkpoint = due(r)  # decided before the round: the workers may not wait after it
            pool.run_ahead = not checkpoint
            ex = pool.exchange(r, _down(spec, w, update), relay)
            while True:
                for rank, why in ex.lost:
                    lost.append(rank)
                    on_event(f"trial {spec.trial} round {r}: worker {rank} lost ({why})")
                    if on_worker_loss == "abort":
                        raise TrialFailed(
                            f"worker {rank} lost in round {r} ({why}); on_worker_loss=abort"
                        )
                if not ex.retry:
                    break
                # allreduce: the round was cut short; the pool re-plans the chunks over the
                # workers left and re-syncs their replicas to w (no longer comparable to sim)
                ex = _again(ex, pool.exchange(r, w, []))
            if not ex.replies:
                raise TrialFailed(f"no worker left in round {r}")
            t0 = time.perf_counter()
            try:
                payloads = [rep.payload for rep in ex.replies]
                g = (node.assemble(payloads, spec) if spec.topology == "allreduce"
                     else node.aggregate(payloads, spec))
            except ValueError as e:  # a payload that passed the pool's checks but not decode
                raise TrialFailed(f"undecodable gradient in round {r}: {e}") from None
            t1 = time.perf_counter()
            master_encode_s = 0.0
            if spec.topology == "broadcast":  # the replicas take this exact step next round
                update, g = node.encode_exact(g, spec, down_rng)
                master_encode_s = time.perf_counter() - t1
            w_prev, w = w, w - spec.lr * g
            err = relu.rel_error(w, w_star)
            t2 = time.perf_counter()
            relay = ex.replies
            row = RoundRow(
                spec.trial, r, time.perf_counter() - start, err, relu.population_loss(w, w_star),
                ex.bytes_up, ex.bytes_down, ex.bytes_peer, len(ex.replies),
                max(rep.compute_s for rep in ex.replies),
                max(rep.encode_s for rep in ex.replies) + master_encode_s,
                ex.network_s, t1 - t0, t2 - t1 - master_encode_s,
            )
            with deferred_interrupts():  # on Ctrl-C the rows handed on and the count agree
                totals["up"] += ex.bytes_up
                totals["down"] += ex.bytes_down
                totals["peer"] += ex.bytes_peer
                rounds_done = r + 1
                on_round(row)
            if not np.isfinite(err) or err > DIVERGED:
                raise TrialFailed(f"diverged in round {r} (rel_error {err}); lower train.lr")
            if spec.target_rel_error > 0 and err <= spec.target_rel_error:
                break
            if checkpoint:
                states = pool.states(r)
                if len(states) == spec.workers and not lost:  # else: next time
                    on_checkpoint(Checkpoint(
                        spec.trial, r + 1, w, _replica(spec, w, w_prev), states, update,
                        [Reply(x.rank, bytes(x.payload)) for x in relay]
                        if spec.topology == "allgather" else [],
                        down_rng.bit_generator.state if spec.topology == "broadcast" else None,
                        dict(totals), time.perf_counter() - start))
                    last_checkpoint = time.perf_counter()
        return result("completed")
    except TrialFailed as e:
        on_event(f"trial {spec.trial} failed: {e}")
        return result("failed", str(e))
    except KeyboardInterrupt:
        on_event(f"trial {spec.trial} interrupted after {rounds_done} rounds")
        raise TrialInterrupted(result("interrupted", "interrupted by the user (Ctrl-C)")) from None
    finally:
        pool.end_trial()


def _replica(spec: TrialSpec, w: np.ndarray, w_prev: np.ndarray) -> np.ndarray | None:
    """What the replicas hold between two rounds (``Checkpoint.replica``)."""
    if spec.topology == "ps":
        return None
    return w if spec.topology == "allreduce" else w_prev


def _down(spec: TrialSpec, w: np.ndarray, update: bytes) -> bytes | np.ndarray | None:
    """What goes down in a round: ps the float32 weights, broadcast last round's encoded
    mean, allgather nothing (the replicas follow on their own); allreduce the weights as
    they are, which the pool sends only to re-sync the replicas after a re-plan."""
    if spec.topology == "ps":
        return node.encode_weights(w)
    if spec.topology == "allreduce":
        return w
    return update if spec.topology == "broadcast" else None


def _again(before: Exchange, after: Exchange) -> Exchange:
    """A round run again after a loss: its bytes include the attempt that was cut short."""
    after.bytes_up += before.bytes_up
    after.bytes_down += before.bytes_down
    after.bytes_peer += before.bytes_peer
    return after


class SimPool:
    """The reference backend: the M workers in this process, called in rank order."""

    run_ahead = False  # each round runs whole within exchange(): nothing to start early

    def __init__(self) -> None:
        self.nodes: list[WorkerNode] = []

    def start_trial(self, spec: TrialSpec, resume: Checkpoint | None = None) -> None:
        self.nodes = [WorkerNode(spec, rank) for rank in range(spec.workers)]
        if resume is not None:
            own = {rep.rank: rep.payload for rep in resume.relay}
            for nd in self.nodes:
                nd.restore(resume.workers[nd.rank], resume.replica, own.get(nd.rank))

    def states(self, round_: int) -> dict[int, dict]:
        return {nd.rank: nd.generator_states() for nd in self.nodes}

    def exchange(self, round_: int, down: bytes | None, relay: list[Reply]) -> Exchange:
        if self.nodes and self.nodes[0].spec.topology == "allreduce":
            return self._allreduce(round_, relay)
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

    def _allreduce(self, round_: int, relay: list[Reply]) -> Exchange:
        """Each worker scatters its chunks, each chunk's owner reduces them (parts in rank
        order) and its mean goes to every other worker and to the master. Bytes are the
        payloads alone, as for the other topologies here."""
        members = [nd.rank for nd in self.nodes]
        parts, timing = [], []
        for nd in self.nodes:
            w = nd.weights_for_round(
                None, [None if rep.rank == nd.rank else rep.payload for rep in relay])
            p, res = nd.scatter(w, round_, members)
            parts.append(p)
            timing.append(res)
        replies, peer = [], 0
        for j, nd in enumerate(self.nodes):
            t0 = time.perf_counter()
            mean = nd.reduce(round_, members,
                             [None if i == j else p[j] for i, p in enumerate(parts)])
            extra = time.perf_counter() - t0
            replies.append(Reply(nd.rank, mean, timing[j].compute_s, timing[j].encode_s + extra))
            peer += sum(len(p) for i, p in enumerate(parts[j]) if i != j)
            peer += len(mean) * (len(members) - 1)
        return Exchange(replies, sum(len(r.payload) for r in replies), 0, bytes_peer=peer)

    def end_trial(self) -> None:
        self.nodes = []
