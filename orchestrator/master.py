"""The round coordinator over ZeroMQ: ``ZmqPool`` is a ``WorkerPool`` whose workers are
agent processes (``relufit agent``) connected to one ROUTER socket.

It registers workers (HELLO -> WELCOME, protocol version checked), sends each trial's spec,
and drives the rounds that ``trial.run_trial`` asks for: in ``ps`` the float32 weights go
down and each worker's encoded gradient comes up; in ``allgather`` each worker gets the
other workers' gradients of the last round (it re-inserts its own) and applies the same
update as the master's replica. Bytes are counted as they cross the socket, headers
included. Heartbeats run both ways; the poll timeout is the heartbeat interval; a worker
silent for ``heartbeat_liveness`` intervals is lost, and stays lost for the rest of the run
(later trials run without it and report it in their first round).

Every frame that fails to parse, comes from an unknown identity or belongs to a stale
round is dropped and logged; nothing a peer sends can crash the master.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from orchestrator.errors import RunError
from orchestrator.trial import Checkpoint, Exchange, Reply
from worker import curve, node, protocol
from worker.node import TrialSpec
from worker.protocol import Liveness, ProtocolError, VersionMismatch

log = logging.getLogger("relufit.master")

MAX_DRAIN = 1000  # messages handled per poll, so a flood cannot starve heartbeats
STOP_LINGER_MS = 1000


def payload_cap(d: int) -> int:
    """Largest gradient payload accepted for dimension ``d``: float32 is 4d bytes; QSGD's
    worst case (every coordinate nonzero, one bucket per coordinate, levels near 2^31) is
    under 12 bytes a coordinate plus its header."""
    return 16 * d + 65536


@dataclass
class _Worker:
    rank: int
    identity: bytes
    live: Liveness
    pid: int = 0
    lost: str = ""  # the reason, once lost
    reported: bool = False  # the loss has been handed to run_trial
    ready: bool = False
    hb: bool = False  # its heartbeat connection has spoken: heartbeats go there
    peer: str | None = None  # allreduce: the endpoint other agents reach it at


@dataclass
class _Round:
    trial: int
    round: int
    pending: set[int]
    replies: dict[int, Reply] = field(default_factory=dict)
    busy_s: dict[int, float] = field(default_factory=dict)  # apply + compute + encode
    bytes_up: int = 0
    bytes_peer: int = 0
    bounds: dict[int, tuple[int, int]] = field(default_factory=dict)  # allreduce: chunks


class ZmqPool:
    """A ``WorkerPool`` over a ROUTER socket. Call ``wait_for_workers`` before the first trial
    and ``close`` at the end (it sends STOP to every agent)."""

    def __init__(
        self,
        bind: str,
        workers: int,
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        max_d: int = 1 << 20,
        curve_dir: str | Path | None = None,
    ):
        self.workers = workers
        self.interval, self.liveness = heartbeat_interval, heartbeat_liveness
        self.max_payload = payload_cap(max_d)
        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        s = self.sock
        s.setsockopt(zmq.LINGER, STOP_LINGER_MS)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails, not vanishes
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting agent keeps its identity
        s.setsockopt(zmq.MAXMSGSIZE, max(self.max_payload, protocol.MAX_HEADER))
        try:
            if curve_dir is not None:
                self.auth = set_server_curve(s, self.ctx, Path(curve_dir))
            s.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise RunError(f"cannot listen on {bind}: {e}") from None
        except RunError:
            self.close()
            raise
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self.by_identity: dict[bytes, _Worker] = {}
        self.by_rank: dict[int, _Worker] = {}
        self.refused: list[str] = []  # version mismatches, reported by wait_for_workers
        self.spec: TrialSpec | None = None
        self.round: _Round | None = None
        self.plan: list[int] = []  # allreduce: the ranks the chunks are planned over
        self.epoch = -1  # allreduce: bumped at every (re)plan
        # allreduce: run_trial's leave to announce the next round as soon as this one's
        # replies are in (WorkerPool.run_ahead); the round so announced and when; and the
        # round a finished trial left announced, whose answers are dropped without a word
        self.run_ahead = False
        self.announced: tuple[_Round, float, int] | None = None
        self.abandoned: tuple[int, int] | None = None
        self.dropped = 0
        self.saving: dict[int, dict] | None = None  # states(): the answers so far
        self.saving_round = -1
        self.closed = False
        self.processes: list[Any] = []  # agent processes, when a provider started them

    @classmethod
    def for_experiment(cls, exp: Any, bind: str, curve_dir: str | Path | None = None) -> ZmqPool:
        """A pool sized for every trial of ``exp``: as many workers as its largest trial."""
        trials = exp.trials()
        k = exp.cluster
        return cls(bind, max(t.spec.workers for t in trials), k.heartbeat_interval,
                   k.heartbeat_liveness, max(t.spec.d for t in trials), curve_dir)

    # ------------------------------------------------------------ WorkerPool

    def wait_for_workers(self, timeout: float, check: Callable[[], None] = lambda: None) -> None:
        """Block until all workers said HELLO; RunError naming the missing ranks otherwise.
        ``check`` is called every poll (the local backend checks its processes there)."""
        deadline = time.monotonic() + timeout
        while len(self.by_rank) < self.workers:
            if self.refused:
                raise RunError(self.refused[0])
            check()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.workers)) - set(self.by_rank))
                raise RunError(
                    f"{len(missing)} of {self.workers} workers did not connect to "
                    f"{self.endpoint} within {timeout:g} s (missing ranks: "
                    f"{', '.join(map(str, missing))}); are the agents running "
                    f"`relufit agent --master {self.endpoint}`?"
                )
            self._pump()
        if self.refused:
            raise RunError(self.refused[0])

    def start_trial(self, spec: TrialSpec, resume: Checkpoint | None = None) -> None:
        if spec.workers > self.workers:
            raise RunError(f"trial {spec.trial} needs {spec.workers} workers, pool has "
                           f"{self.workers}")
        self.spec, self.round, self.plan, self.epoch = spec, None, [], -1
        self.announced = None
        for w in self._members(lost=True):  # lost in an earlier trial: this one reports it too
            w.reported = False
        fields: dict[str, Any] = {"spec": spec.to_dict()}
        if spec.topology == "allreduce":
            missing = [w.rank for w in self._members() if w.peer is None]
            if missing:
                raise RunError(f"agents {missing} announced no peer endpoint; the allreduce "
                               "topology needs every agent to listen for its peers")
            fields["peers"] = [None if (w := self.by_rank.get(r)) is None or w.lost else w.peer
                               for r in range(spec.workers)]
        if resume is not None and spec.topology == "allreduce":  # as the agents take it up
            self.plan, self.epoch = list(range(spec.workers)), 0
        for w in self._members():
            w.ready = False
            payloads, extra = _resume_fields(resume, w.rank)
            self._send(w, protocol.build(protocol.TRIAL, payloads, trial=spec.trial, **fields,
                                         **extra))
        while any(not w.ready for w in self._members()):
            self._pump()

    def states(self, round_: int) -> dict[int, dict]:
        """Every live member's generator states after ``round_`` (SAVE -> STATE); the ranks
        lost meanwhile are missing from the answer."""
        spec = self.spec
        self.saving = {}
        frames = protocol.build(protocol.SAVE, trial=spec.trial, round=round_)
        members = self._members()
        for w in members:
            self._send(w, frames)
        self.saving_round = round_
        while any(w.rank not in self.saving and not w.lost for w in members):
            self._pump()
        states, self.saving = self.saving, None
        return states

    def exchange(self, round_: int, down: Any, relay: list[Reply]) -> Exchange:
        spec = self.spec
        if spec is None:
            raise RuntimeError("exchange() before start_trial()")
        if spec.topology == "allreduce":
            return self._allreduce(round_, down)
        t0 = time.perf_counter()
        members = self._members()
        rnd = _Round(spec.trial, round_, {w.rank for w in members})
        self.round = rnd
        ranks = [rep.rank for rep in relay]
        bytes_down = 0
        plain = None if down is None else protocol.build(  # the same for every worker
            protocol.ROUND, [down], pad=protocol.ROUND_HEADER, trial=spec.trial, round=round_)
        for w in members:
            if plain is not None:
                frames = plain
            else:
                others = [rep.payload for rep in relay if rep.rank != w.rank]
                frames = protocol.build(protocol.ROUND, others, trial=spec.trial,
                                        round=round_, ranks=ranks)
            self._send(w, frames)
            bytes_down += sum(protocol.frame_bytes(f) for f in frames)
        while rnd.pending:
            self._pump()
            rnd.pending -= {w.rank for w in self._members(lost=True)}
        self.round = None
        replies = [rnd.replies[r] for r in sorted(rnd.replies)]
        slowest = max(rnd.busy_s.values(), default=0.0)
        wall = time.perf_counter() - t0
        return Exchange(replies, rnd.bytes_up, bytes_down, max(0.0, wall - slowest),
                        self._new_losses())

    def _allreduce(self, round_: int, w: Any) -> Exchange:
        """A clock tick: ROUND to every member (with the plan when it changes, and the
        weights when it changes after round 0), unless the round was announced ahead; then
        one GRADIENT from each, carrying the mean chunk it owns. A member lost before the
        round ends cuts it short (``retry``). With ``run_ahead``, the next round is
        announced as soon as the replies are in (``_announce``)."""
        spec, t0 = self.spec, time.perf_counter()
        members = self._members()
        if not members:  # run_trial fails the trial: no worker left
            return Exchange([], 0, 0, 0.0, self._new_losses())
        ranks = [m.rank for m in members]
        early, self.announced = self.announced, None
        if early is not None and early[0].round == round_ and ranks == self.plan:
            rnd, t0, bytes_down = early  # the workers went ahead: replies may be here already
        else:  # (announced, but a worker was lost since: planned and announced again)
            rnd, frames = self._plan_round(round_, ranks, w)
            for m in members:
                self._send(m, frames)
            bytes_down = len(members) * sum(protocol.frame_bytes(f) for f in frames)
            bytes_down += early[2] if early is not None else 0
        self.round = rnd
        while rnd.pending:
            self._pump()
            if any(m.lost for m in members):
                break
        self.round = None
        lost = self._new_losses()
        if rnd.pending:  # cut short by a loss: run_trial decides (abort, or again)
            return Exchange([], rnd.bytes_up, bytes_down, 0.0, lost, rnd.bytes_peer, retry=True)
        wall = time.perf_counter() - t0
        if self.run_ahead and round_ + 1 < spec.rounds:
            self._announce(round_ + 1, members)
        replies = [rnd.replies[r] for r in ranks]
        slowest = max(rnd.busy_s.values(), default=0.0)
        return Exchange(replies, rnd.bytes_up, bytes_down, max(0.0, wall - slowest), lost,
                        rnd.bytes_peer)

    def _plan_round(self, round_: int, ranks: list[int], w: Any) -> tuple[_Round, list[Any]]:
        """allreduce: the round's bookkeeping and its ROUND, the same for every member: with
        the plan when it changes, and the weights when it changes after round 0."""
        spec = self.spec
        fields: dict[str, Any] = {}
        payloads: list[Any] = []
        if ranks != self.plan:
            self.plan, self.epoch = ranks, self.epoch + 1
            fields = {"ranks": ranks, "epoch": self.epoch}
            if round_ > 0:  # replicas start at zero; later they may have parted ways
                payloads = [node.encode_weights64(w)]
        rnd = _Round(spec.trial, round_, set(ranks))
        rnd.bounds = dict(zip(ranks, node.chunk_bounds(spec, len(ranks)), strict=True))
        return rnd, protocol.build(protocol.ROUND, payloads, pad=protocol.ROUND_HEADER,
                                   trial=spec.trial, round=round_, **fields)

    def _announce(self, round_: int, members: list[_Worker]) -> None:
        """allreduce: ROUND ``round_`` right away, while run_trial still takes the step of
        the round before: a worker starts it as soon as it holds that round's means, and the
        master's hop is off the round's critical path. Only with the plan unchanged (no
        weights to send), so the ROUND is what ``exchange(round_)`` would send."""
        rnd, frames = self._plan_round(round_, [m.rank for m in members], None)
        for m in members:
            self._send(m, frames)
        self.round = rnd  # its GRADIENTs may come before exchange(round_) is called
        self.announced = (rnd, time.perf_counter(),
                          len(members) * sum(protocol.frame_bytes(f) for f in frames))

    def end_trial(self) -> None:
        if self.announced is not None:  # stopped at the target: that round is not wanted
            self.abandoned = (self.announced[0].trial, self.announced[0].round)
        self.spec, self.round, self.announced = None, None, None

    def close(self) -> None:
        """STOP every agent still with us, then close the socket (lingering so STOP leaves)."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        for w in getattr(self, "by_rank", {}).values():
            if not w.lost:
                self._send(w, protocol.build(protocol.STOP))
        self.sock.close(linger=STOP_LINGER_MS)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    # ------------------------------------------------------------ internals

    def _members(self, lost: bool = False) -> list[_Worker]:
        """The current trial's workers (ranks below its worker count), alive or lost."""
        n = self.spec.workers if self.spec else self.workers
        return [w for r, w in sorted(self.by_rank.items()) if r < n and bool(w.lost) == lost]

    def _new_losses(self) -> list[tuple[int, str]]:
        out = []
        for w in self._members(lost=True):
            if not w.reported:
                w.reported = True
                out.append((w.rank, w.lost))
        return out

    def _lose(self, w: _Worker, why: str) -> None:
        if not w.lost:
            log.warning("worker %d lost: %s", w.rank, why)
            w.lost = why

    def _pump(self) -> None:
        """One poll of at most a heartbeat interval, then liveness and heartbeats."""
        now = time.monotonic()
        alive = [w for w in self.by_rank.values() if not w.lost]
        wait = min([self.interval] + [w.live.next_deadline(now) for w in alive])
        if self.sock.poll(max(1, int(1000 * wait))):
            for _ in range(MAX_DRAIN):
                try:
                    frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_frames(frames, time.monotonic())
        now = time.monotonic()
        for w in alive:
            if w.live.expired(now):
                self._lose(w, f"silent for {now - w.live.last_heard:.2f} s (heartbeat "
                              f"{self.interval:g} s x {self.liveness}, on a connection of its "
                              f"own: the agent or its host is gone or stuck)")
            elif w.live.heartbeat_due(now):
                self._heartbeat(w, now)

    def _send(self, w: _Worker, frames: list[Any]) -> None:
        """On the worker's data connection. Once its heartbeat connection has spoken, what
        goes here no longer counts as a heartbeat: it may take longer than the liveness
        window to arrive, so heartbeats keep their schedule on the other connection."""
        self._send_to(w, w.identity, frames)
        if not w.hb:
            w.live.sent(time.monotonic())

    def _heartbeat(self, w: _Worker, now: float) -> None:
        """On the heartbeat connection, or on the data one while that has not spoken yet."""
        suffix = protocol.HEARTBEAT_SUFFIX if w.hb else b""
        self._send_to(w, w.identity + suffix, protocol.build(protocol.HEARTBEAT))
        w.live.sent(now)

    def _send_to(self, w: _Worker, identity: bytes, frames: list[Any]) -> None:
        big = sum(protocol.frame_bytes(f) for f in frames) >= 65536
        try:
            self.sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=not big)
        except zmq.ZMQError as e:  # gone (EHOSTUNREACH) or not draining: liveness decides
            log.debug("send to worker %d failed: %s", w.rank, e)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped <= 10 or self.dropped % 100 == 0:
            log.warning("dropped a frame (%d so far): %s", self.dropped, why)

    def _on_frames(self, frames: list[Any], now: float) -> None:
        identity = frames[0].bytes
        if identity.endswith(protocol.HEARTBEAT_SUFFIX):
            self._on_heartbeat(identity[: -len(protocol.HEARTBEAT_SUFFIX)], frames[1:], now)
            return
        w = self.by_identity.get(identity)
        if w is not None and w.lost:
            return  # a lost worker stays lost
        if w is not None:
            w.live.heard(now)  # any traffic counts as a heartbeat
        try:
            msg = protocol.parse(frames[1:], self.max_payload)
            if w is None:
                self._on_stranger(identity, msg, now, _peer_address(frames[1]))
            else:
                self._on_message(w, msg)
        except ProtocolError as e:
            self._drop(f"from {f'worker {w.rank}' if w else 'an unknown peer'}: {e}")

    def _on_heartbeat(self, identity: bytes, frames: list[Any], now: float) -> None:
        """A HEARTBEAT on the heartbeat connection of the agent whose data connection is
        ``identity``. One that comes before its HELLO (the two connections race) is ignored;
        the next one counts."""
        w = self.by_identity.get(identity)
        try:
            protocol.parse_heartbeat(frames)
        except ProtocolError as e:
            self._drop(f"from {f'worker {w.rank}' if w else 'an unknown peer'}: {e}")
            return
        if w is not None and not w.lost:
            w.live.heard(now)
            w.hb = True

    def _on_stranger(self, identity: bytes, msg: protocol.Message, now: float,
                     peer_address: str | None = None) -> None:
        if msg.type != protocol.HELLO:
            raise ProtocolError(f"{msg.type} from an identity that never said HELLO")
        try:
            protocol.check_version(msg)
        except VersionMismatch as e:
            why = (f"protocol version mismatch: the agent (pid {msg.get('pid')}) speaks version "
                   f"{e.theirs}, this master speaks {e.ours}; install the same relufit on "
                   f"every node")
            self._refuse(identity, why)
            self.refused.append(why)
            raise ProtocolError(why) from None
        rank = msg.get("rank")
        free = [r for r in range(self.workers) if r not in self.by_rank]
        if rank is None:
            if not free:
                self._refuse(identity, f"the master already has its {self.workers} workers")
                raise ProtocolError("HELLO with no free rank")
            rank = free[0]
        elif rank not in free:
            why = (f"rank {rank} is out of range for {self.workers} workers" if rank >= self.workers
                   else f"rank {rank} is already taken")
            self._refuse(identity, why)
            raise ProtocolError(f"HELLO refused: {why}")
        w = _Worker(rank, identity, Liveness.start(self.interval, self.liveness, now),
                    msg.get("pid"))
        if msg.get("peer_port") is not None:
            host = msg.get("peer_host") or peer_address
            w.peer = protocol.peer_endpoint(host, msg.get("peer_port")) if host else None
        self.by_identity[identity], self.by_rank[rank] = w, w
        self._send(w, protocol.build(protocol.WELCOME, rank=rank,
                                     heartbeat_interval=self.interval,
                                     heartbeat_liveness=self.liveness))

    def _refuse(self, identity: bytes, why: str) -> None:
        try:
            self.sock.send_multipart([identity, *protocol.build(protocol.ERROR, message=why)],
                                     flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_message(self, w: _Worker, msg: protocol.Message) -> None:
        t = msg.type
        if t == protocol.HEARTBEAT:
            return
        if t == protocol.ERROR:
            self._lose(w, f"the agent reported: {msg.get('message')}")
        elif t == protocol.HELLO:  # the agent said HELLO again: welcome it again
            self._send(w, protocol.build(protocol.WELCOME, rank=w.rank,
                                         heartbeat_interval=self.interval,
                                         heartbeat_liveness=self.liveness))
        elif t == protocol.READY:
            if self.spec is None or msg.get("trial") != self.spec.trial:
                raise ProtocolError(f"stale READY for trial {msg.get('trial')}")
            w.ready = True
        elif t == protocol.GRADIENT:
            self._on_gradient(w, msg)
        elif t == protocol.STATE:
            if self.saving is None or (msg.get("trial"), msg.get("round")) != (
                    self.spec.trial, self.saving_round):
                raise ProtocolError(f"stale STATE for round {msg.get('round')}")
            try:
                self.saving[w.rank] = node.check_states(msg.get("states"))
            except node.SpecError as e:
                raise ProtocolError(f"STATE: {e}") from None
        else:
            raise ProtocolError(f"{t} is not a message for the master")

    def _on_gradient(self, w: _Worker, msg: protocol.Message) -> None:
        rnd, spec = self.round, self.spec
        if (msg.get("trial"), msg.get("round")) == self.abandoned:
            return  # a round announced ahead when the trial stopped at its target
        if rnd is None or spec is None or (msg.get("trial"), msg.get("round")) != (
                rnd.trial, rnd.round) or w.rank not in rnd.pending:
            raise ProtocolError(f"stale GRADIENT for trial {msg.get('trial')} round "
                                f"{msg.get('round')} from worker {w.rank}")
        payload = msg.payloads[0]
        if spec.topology == "allreduce":  # the mean of the chunk it owns (b"": none)
            if msg.get("epoch") != self.epoch:  # a round cut short and planned again
                raise ProtocolError(f"GRADIENT of plan {msg.get('epoch')} from worker "
                                    f"{w.rank}; the plan is {self.epoch}")
            lo, hi = rnd.bounds[w.rank]
            if hi == lo:
                if protocol.frame_bytes(payload):
                    raise ProtocolError(f"worker {w.rank} sent a mean for an empty chunk")
            else:
                check_payload(protocol.buffer(payload), node.chunk_spec(spec, lo, hi))
        else:
            check_payload(protocol.buffer(payload), spec)
        rnd.pending.discard(w.rank)
        compute_s, encode_s, apply_s = protocol.durations(msg)
        rnd.replies[w.rank] = Reply(w.rank, protocol.buffer(payload), compute_s, encode_s)
        rnd.busy_s[w.rank] = apply_s + compute_s + encode_s
        rnd.bytes_up += msg.header_bytes + protocol.frame_bytes(payload)
        rnd.bytes_peer += msg.get("bytes_peer")


def _resume_fields(resume: Checkpoint | None, rank: int) -> tuple[list[Any], dict[str, Any]]:
    """TRIAL's payloads and fields that take worker ``rank`` up from a checkpoint: its
    generators, and the replica and last payload of its own it had (b"": none)."""
    if resume is None:
        return [], {}
    replica = b"" if resume.replica is None else node.encode_weights64(resume.replica)
    own = next((rep.payload for rep in resume.relay if rep.rank == rank), b"")
    return [replica, own], {"resume": {"round": resume.round, "states": resume.workers[rank]}}


@contextmanager
def listen_pool(
    exp: Any, bind: str, curve_dir: str | Path | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Iterator[ZmqPool]:
    """The master of a cluster whose agents are started elsewhere (the SSH backends): bind
    ``bind``, wait ``connect_timeout`` for every rank, STOP them all at the end."""
    pool = ZmqPool.for_experiment(exp, bind, curve_dir)
    try:
        progress(f"waiting for {pool.workers} agents at {pool.endpoint}"
                 + (" (CurveZMQ)" if curve_dir else ""))
        pool.wait_for_workers(exp.cluster.connect_timeout)
        yield pool
    finally:
        pool.close()


def _peer_address(frame: Any) -> str | None:
    """The address a TCP peer connected from (ZeroMQ's frame metadata), or None."""
    try:
        return frame.get("Peer-Address") or None
    except (zmq.ZMQError, AttributeError):
        return None


_QSGD_HEAD = struct.Struct("<4sBBBBIIII")


def check_payload(payload: Any, spec: TrialSpec) -> None:
    """Cheap structural check of a gradient before it reaches ``aggregate``: float32 is
    exactly 4d bytes; a QSGD payload must announce this trial's d and levels."""
    n = protocol.frame_bytes(payload)
    if spec.scheme == "none":
        if n != 4 * spec.d:
            raise ProtocolError(f"float32 gradient of {n} bytes, expected {4 * spec.d}")
        return
    if n < _QSGD_HEAD.size:
        raise ProtocolError(f"QSGD gradient of {n} bytes is shorter than its header")
    magic, _, _, _, _, d, levels, _, _ = _QSGD_HEAD.unpack_from(payload)
    if magic != b"QSGD" or d != spec.d or levels != spec.levels:
        raise ProtocolError("QSGD gradient does not match the trial (magic, d or levels)")


def set_server_curve(sock: zmq.Socket, ctx: zmq.Context, curve_dir: Path) -> Any:
    """CurveZMQ server for the master's ROUTER (``worker.curve.set_server``); a bad key file
    is a RunError."""
    try:
        return curve.set_server(sock, ctx, curve_dir)
    except curve.KeyFileError as e:
        raise RunError(str(e)) from None


def create_curve_keys(curve_dir: str | Path) -> Path:
    """A fresh server and client key pair in ``curve_dir`` (secret files mode 0600)."""
    return curve.create_keys(curve_dir)
