"""The worker agent: a DEALER that turns the master's weights into encoded gradients.

The socket lives in the main thread and is never touched elsewhere (ZeroMQ sockets are
not thread-safe); the numpy work runs on one compute thread, fed in order, so the agent
keeps answering and sending heartbeats however long a gradient takes. A round's work too
small to matter to a heartbeat (d <= 65536, d x (batch + M) <= 2^21) runs on the main thread
instead, when the compute thread is idle: the hand-off would cost more than the work. Either
way one thread at a time holds the ``WorkerNode`` and calls it exactly as ``SimPool`` does
(same generators, same order), which is what makes every backend reproduce ``sim``.

Exit codes: 0 on STOP; 1 when the master refuses this agent (ERROR, e.g. a protocol
version mismatch, or a secure handshake it turned down: keys that are not the run's, or
CurveZMQ on one side only); 3 when the master has been silent longer than the timeout;
4 when a peer cannot be reached.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from worker import curve, node, peers, protocol
from worker.node import SpecError, TrialSpec, WorkerNode
from worker.protocol import Liveness, ProtocolError

log = logging.getLogger("relufit.agent")

EXIT_STOPPED, EXIT_REFUSED, EXIT_MASTER_SILENT, EXIT_PEER_UNREACHABLE = 0, 1, 3, 4
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000  # reconnect backoff doubles up to this cap
# Largest frame accepted before the trial's d is known: float32 weights at the largest d.
DEFAULT_MAX_FRAME = 4 * node.MAX_D + protocol.MAX_HEADER
# A round's job runs on the socket thread, without a hand-off, up to these sizes: d, and
# d x (batch + M): the gradient's multiply-adds and, at most, the coordinates of the M
# payloads an allgather replica decodes. At d = 1e4, batch 128, M = 8: ~1 ms alone, 2-5 ms
# on 2 loaded cores; at the bound, below 0.25 s even for Elias decoding (~0.11 us a
# coordinate), inside the tightest heartbeat window the tests use.
INLINE_MAX_D = 1 << 16
INLINE_MAX_WORK = 1 << 21


class AgentError(Exception):
    """The agent cannot start (bad option, unreadable key file); a one-line message."""


class _Refused(Exception):
    """The master's end turned down our handshake, or cannot be sent to; the message says why
    and the code is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# What the master connection's monitor reports. ZeroMQ gives up on a connection whose
# handshake failed on a protocol or authentication error (no reconnect, and the queue to it
# is gone, so a send would block for ever): the agent must say so and stop.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class AgentOptions:
    master: str  # tcp://HOST:PORT
    rank: int | None = None  # None: the master assigns one
    timeout: float = 60.0  # seconds to wait for the master before it has welcomed us
    curve_dir: str | None = None  # server.key + client.key_secret (zmq.auth format)
    max_frame: int = DEFAULT_MAX_FRAME
    # allreduce: where our peer ROUTER listens (default: peers.default_bind(master)) and the
    # host other agents reach it at (default: the address the master sees us connect from)
    peer_bind: str | None = None
    peer_host: str | None = None


class _Compute(threading.Thread):
    """Runs jobs in order off the socket thread; rings an inproc PAIR when one is done."""

    def __init__(self, ctx: zmq.Context, address: str):
        super().__init__(name="relufit-compute", daemon=True)
        self.ctx, self.address = ctx, address
        self.jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.results: queue.Queue[Any] = queue.Queue()

    def run(self) -> None:
        bell = self.ctx.socket(zmq.PAIR)
        bell.connect(self.address)
        try:
            while (job := self.jobs.get()) is not None:
                self.results.put(_outcome(job))
                bell.send(b"")
        finally:
            bell.close(linger=0)


def _outcome(job: Callable[[], Any]) -> Any:
    """A job's result, or the exception it raised (reported to the master, never a crash)."""
    try:
        return job()
    except Exception as e:
        return e


class _Work:
    """The node of the current trial: the compute thread's, or the main thread's while the
    compute thread is idle (``Agent._submit``)."""

    def __init__(self) -> None:
        self.node: WorkerNode | None = None

    def start(self, spec: TrialSpec, rank: int,
              resume: tuple[Any, Any, Any] | None = None) -> tuple[str, int]:
        """Build the trial's node; ``resume``: (states, replica frame, own payload frame)
        of a checkpoint to take it up from."""
        if self.node is not None:  # free the last trial's shard before building the next one
            self.node.close()
            self.node = None
        nd = WorkerNode(spec, rank, draw_ahead=True)  # online data: next batch while we wait
        if resume is not None:
            states, replica, own = (protocol.buffer(f) if i else f for i, f in enumerate(resume))
            nd.restore(states, node.decode_weights64(replica, spec.d) if len(replica) else None,
                       own if len(own) else None)
        self.node = nd
        return ("ready", spec.trial)

    def states(self, trial: int, round_: int) -> tuple[str, int, int, dict]:
        return ("state", trial, round_, self.node.generator_states())

    def scatter(self, key: tuple[int, int, int], down: Any, relayed: list[Any],
                members: list[int]) -> tuple[Any, ...]:
        """allreduce: step the replica with last round's means (or take the master's
        weights), then the gradient's parts."""
        nd = self.node
        t0 = time.perf_counter()
        w = nd.weights_for_round(None if down is None else protocol.buffer(down),
                                 [None if p is None else protocol.buffer(p) for p in relayed])
        apply_s = time.perf_counter() - t0
        parts, res = nd.scatter(w, key[2], members)
        return ("parts", key, parts, res, apply_s)

    def reduce(self, key: tuple[int, int, int], members: list[int],
               parts: list[Any]) -> tuple[Any, ...]:
        t0 = time.perf_counter()
        mean = self.node.reduce(key[2], members,
                                [None if p is None else protocol.buffer(p) for p in parts])
        return ("mean", key, mean, time.perf_counter() - t0)

    def step(self, trial: int, round_: int, weights: Any, ranks: list[int] | None,
             others: list[Any]) -> tuple[str, int, int, node.StepResult, float]:
        nd = self.node
        t0 = time.perf_counter()
        relayed = []
        if ranks is not None:  # allgather: the others' payloads, ours (None) in rank order
            it = iter(others)
            relayed = [None if r == nd.rank else protocol.buffer(next(it)) for r in ranks]
        down = protocol.buffer(weights) if weights is not None else None
        w = nd.weights_for_round(down, relayed)
        apply_s = time.perf_counter() - t0 if nd.spec.topology != "ps" else 0.0
        res = nd.step(w, round_)
        return ("gradient", trial, round_, res, apply_s)


@dataclass
class _Allreduce:
    """An agent's place in the current allreduce trial."""

    epoch: int = -1  # the master's plan; -1: none yet
    members: list[int] = field(default_factory=list)
    bounds: list[tuple[int, int]] = field(default_factory=list)  # each member's chunk
    round: int | None = None  # the round being worked on
    phase: str = "idle"  # idle | scatter | parts | reduce | means (ours all sent)
    start: tuple[int, Any] | None = None  # a ROUND waiting to start: (round, weights | None)
    # (epoch, round) -> ({rank: part of our chunk}, {owner: mean chunk}), as they arrive
    inbox: dict[tuple[int, int], tuple[dict[int, Any], dict[int, Any]]] = field(
        default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # Heartbeats, both ways, on a connection of their own to the same endpoint: on the
        # data connection they would wait behind a message in flight (ZeroMQ delivers whole
        # messages), and a large gradient on a slow link would make either side look dead.
        self.hb = self.ctx.socket(zmq.DEALER)
        self.bell = self.ctx.socket(zmq.PAIR)
        bell_addr = f"inproc://relufit-compute-{id(self)}"
        self.bell.bind(bell_addr)
        self.compute = _Compute(self.ctx, bell_addr)
        self.work = _Work()
        self.rank = opts.rank
        self.spec: TrialSpec | None = None
        self.next_round = 0
        self.last_sent_round = -1
        self.live = Liveness.start(opts.timeout, 1, time.monotonic())
        self.dropped = 0
        self.peers: peers.Peers | None = None  # made in run(): binding may fail
        self.handshake: zmq.Socket | None = None  # the master connection's monitor
        self.failed_handshakes = 0
        self.ar = _Allreduce()
        self.queued = 0  # jobs handed to the compute thread whose results are not in yet

    # ------------------------------------------------------------ setup

    def _connect(self) -> None:
        # A stable identity, so that after a reconnect the master still knows who we are;
        # the heartbeat connection's is the same plus protocol.HEARTBEAT_SUFFIX.
        identity = f"w{self.rank}-{os.getpid()}-{os.urandom(4).hex()}".encode()
        for s, routing_id, max_size in (
            (self.sock, identity, self.opts.max_frame),
            (self.hb, identity + protocol.HEARTBEAT_SUFFIX, protocol.MAX_HEARTBEAT_BYTES),
        ):
            s.setsockopt(zmq.LINGER, 1000 if s is self.sock else 0)
            s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            s.setsockopt(zmq.MAXMSGSIZE, max_size)
            s.setsockopt(zmq.ROUTING_ID, routing_id)
            if self.opts.curve_dir:
                curve.set_client(s, Path(self.opts.curve_dir))
            if s is self.sock:
                self.handshake = s.get_monitor_socket(HANDSHAKE_EVENTS)
            s.connect(self.opts.master)

    def _check_handshake(self) -> None:
        """Read the master connection's monitor; raise _Refused for a failure ZeroMQ will not
        retry. A failure it does retry (the master's public key is not ours to check: it
        just closes) is counted for the message the agent gives when the master stays silent."""
        while self.handshake.poll(0):
            event = recv_monitor_message(self.handshake)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.failed_handshakes += 1
                continue
            keys = "its --curve-dir" if self.opts.curve_dir else "no --curve-dir"
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = ("refused this agent's CurveZMQ key: the client key in --curve-dir is "
                       "not this run's")
            elif event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                why = (f"does not speak the agent's security mechanism (the agent has {keys}): "
                       "give master and agents the same run's CurveZMQ keys, or neither")
            else:
                why = f"broke off the handshake (ZeroMQ protocol error {event['value']:#x})"
            raise _Refused(f"the master at {self.opts.master} {why}", EXIT_REFUSED)

    def run(self) -> int:
        """Talk to the master until STOP, a refusal, or its silence; returns the exit code."""
        self._connect()
        self.peers = peers.Peers(self.ctx, self.opts.peer_bind or peers.default_bind(
            self.opts.master), self.opts.max_frame, self.opts.curve_dir)
        self.compute.start()
        poller = zmq.Poller()
        for s in (self.sock, self.hb, self.bell, self.peers.router, self.handshake):
            poller.register(s, zmq.POLLIN)
        try:
            self._send(protocol.build(protocol.HELLO, rank=self.rank, pid=os.getpid(),
                                      peer_port=self.peers.port, peer_host=self.opts.peer_host))
            while True:
                now = time.monotonic()
                events = dict(poller.poll(max(1, int(1000 * self.live.next_deadline(now)))))
                now = time.monotonic()
                if self.handshake in events:
                    self._check_handshake()
                if self.bell in events:
                    self._collect()
                if self.hb in events:
                    self._drain_heartbeats(now)
                if self.sock in events:
                    code = self._drain(now)
                    if code is not None:
                        return code
                if self.peers.router in events:
                    self._on_peer_messages()
                now = time.monotonic()
                if self.peers.waiting and self._peers_unreachable(now):
                    return EXIT_PEER_UNREACHABLE
                if self.live.expired(now):
                    print(f"relufit agent: {self._silence(now)}; exiting", file=sys.stderr)
                    return EXIT_MASTER_SILENT
                if self.live.heartbeat_due(now):
                    self._heartbeat(now)
        except _Refused as e:
            print(f"relufit agent: {e}", file=sys.stderr)
            return e.code
        finally:
            self.close()

    def _silence(self, now: float) -> str:
        said = (f"the master at {self.opts.master} has been silent for "
                f"{now - self.live.last_heard:.1f} s")
        if self.failed_handshakes:
            said += (f" ({self.failed_handshakes} secure handshake(s) with it failed: is "
                     "server.key in --curve-dir this master's public key?)")
        return said

    def _peers_unreachable(self, now: float) -> bool:
        """A peer whose connection has not come up within --timeout: say so to the master
        (which takes us for lost, with this reason) and on stderr, rather than wait in
        every round for parts and means that cannot come."""
        late = self.peers.unreachable(now)
        if not late:
            return False
        where = ", ".join(f"{r} at {endpoint}" for r, endpoint in late)
        why = (f"worker {self.rank} cannot connect to peer(s) {where} within "
               f"{self.opts.timeout:g} s: are the peer ports ({peers.PEER_PORTS[0]}-"
               f"{peers.PEER_PORTS[1]}) open between the hosts?")
        print(f"relufit agent: {why}", file=sys.stderr)
        self._send(protocol.build(protocol.ERROR, message=why[: protocol.MAX_MESSAGE]))
        return True

    def close(self) -> None:
        self.compute.jobs.put(None)
        if self.compute.ident is not None:  # run() may have failed before starting it
            self.compute.join(timeout=1.0)
        if self.work.node is not None and not self.compute.is_alive():
            self.work.node.close()  # no batch drawn ahead for a round that will not come
        self.bell.close(linger=0)
        self.hb.close(linger=0)
        if self.handshake is not None:
            self.sock.disable_monitor()
            self.handshake.close(linger=0)
        if self.peers is not None:
            self.peers.close()
        self.sock.close()
        if not self.compute.is_alive():  # a numpy call still running would hang term()
            self.ctx.term()

    # ------------------------------------------------------------ receiving

    def _drain(self, now: float) -> int | None:
        while self.sock.poll(0):
            frames = self.sock.recv_multipart(copy=False)
            self.live.heard(now)  # any traffic from the master counts as a heartbeat
            try:
                code = self._on_message(protocol.parse(frames, self.opts.max_frame))
            except ProtocolError as e:
                self._dropped(e)
                continue
            if code is not None:
                return code
        return None

    def _drain_heartbeats(self, now: float) -> None:
        """The heartbeat connection carries only HEARTBEATs; each one (and nothing else)
        shows the master alive."""
        while self.hb.poll(0):
            frames = self.hb.recv_multipart(copy=False)
            try:
                protocol.parse_heartbeat(frames)
            except ProtocolError as e:
                self._dropped(e)
                continue
            self.live.heard(now)

    def _dropped(self, why: Exception) -> None:
        self.dropped += 1
        if self.dropped <= 10 or self.dropped % 100 == 0:
            log.warning("dropped a frame from the master (%d so far): %s", self.dropped, why)

    def _on_message(self, msg: protocol.Message) -> int | None:
        if msg.type == protocol.ERROR:
            print(f"relufit agent: the master refused this agent: {msg.get('message')}",
                  file=sys.stderr)
            return EXIT_REFUSED
        if msg.type == protocol.STOP:
            return EXIT_STOPPED
        if msg.type == protocol.WELCOME:
            self._on_welcome(msg)
        elif msg.type == protocol.SAVE:
            self._on_save(msg)
        elif msg.type == protocol.TRIAL:
            self._on_trial(msg)
        elif msg.type == protocol.ROUND:
            self._on_round(msg)
        elif msg.type != protocol.HEARTBEAT:
            raise ProtocolError(f"{msg.type} is not a message for an agent")
        return None

    def _on_welcome(self, msg: protocol.Message) -> None:
        if self.rank is not None and msg.get("rank") != self.rank:
            raise ProtocolError(f"WELCOME for rank {msg.get('rank')}, this agent is {self.rank}")
        self.rank = msg.get("rank")
        interval, liveness = msg.get("heartbeat_interval"), msg.get("heartbeat_liveness")
        now = time.monotonic()
        self.live = Liveness(interval, liveness, now, self.live.last_sent)

    def _on_trial(self, msg: protocol.Message) -> None:
        if self.rank is None:
            raise ProtocolError("TRIAL before WELCOME")
        try:
            spec = TrialSpec.from_dict(msg.get("spec"))
            if spec.trial != msg.get("trial"):
                raise SpecError("TRIAL header and spec disagree on the trial number")
            if self.rank >= spec.workers:
                raise SpecError(f"rank {self.rank} is not among the trial's {spec.workers}")
        except SpecError as e:
            raise ProtocolError(f"bad trial spec: {e}") from None
        if spec.topology == "allreduce":
            endpoints = msg.get("peers")
            if not isinstance(endpoints, list) or len(endpoints) != spec.workers:
                raise ProtocolError(f"allreduce TRIAL must list {spec.workers} peer endpoints")
            self.peers.connect(self.rank, endpoints, time.monotonic() + self.opts.timeout)
        resume, first = msg.get("resume"), 0
        if resume is not None:
            first, resume = resume["round"], (resume["states"], *msg.payloads)
        self.spec, self.next_round, self.last_sent_round = spec, first, first - 1
        self.ar = _Allreduce()
        if resume is not None and spec.topology == "allreduce":  # the plan of every trial
            members = list(range(spec.workers))  # that checkpoints: no worker was lost
            self.ar = _Allreduce(epoch=0, members=members,
                                 bounds=node.chunk_bounds(spec, spec.workers))
        rank = self.rank
        self._submit(lambda: self.work.start(spec, rank, resume), inline=False)

    def _on_save(self, msg: protocol.Message) -> None:
        """A checkpoint between two rounds: our generators' states after the last one. The
        compute thread owns them, so it answers, after whatever it was given before."""
        spec = self.spec
        if spec is None or (msg.get("trial"), msg.get("round")) != (spec.trial,
                                                                     self.next_round - 1):
            raise ProtocolError(f"stale SAVE for trial {msg.get('trial')} round "
                                f"{msg.get('round')}")
        trial, round_ = spec.trial, msg.get("round")
        self._submit(lambda: self.work.states(trial, round_), inline=False)

    def _on_round(self, msg: protocol.Message) -> None:
        spec = self.spec
        if spec is not None and spec.topology == "allreduce" and msg.get("trial") == spec.trial:
            self._on_allreduce_round(msg)
            return
        if spec is None or msg.get("trial") != spec.trial or msg.get("round") != self.next_round:
            raise ProtocolError(f"stale ROUND trial {msg.get('trial')} round {msg.get('round')}")
        round_, weights, ranks, others = msg.get("round"), None, None, []
        if spec.topology == "ps":
            if len(msg.payloads) != 1 or protocol.frame_bytes(msg.payloads[0]) != 4 * spec.d:
                raise ProtocolError(f"ps ROUND must carry {4 * spec.d} bytes of weights")
            weights = msg.payloads[0]
        elif spec.topology == "broadcast":
            empty = len(msg.payloads) == 1 and protocol.frame_bytes(msg.payloads[0]) == 0
            if len(msg.payloads) != 1 or empty != (round_ == 0):
                raise ProtocolError("broadcast ROUND must carry one update, empty in round 0 only")
            weights = msg.payloads[0]
        else:
            ranks, others = msg.get("ranks", []), msg.payloads
            if not isinstance(ranks, list) or any(r >= spec.workers for r in ranks):
                raise ProtocolError("allgather ROUND ranks out of range")
            own = self.rank in ranks
            if own and self.last_sent_round != round_ - 1:
                raise ProtocolError("ROUND relays our own gradient of a round we did not send")
            if len(others) != len(ranks) - own:
                raise ProtocolError(f"allgather ROUND has {len(others)} payloads for {ranks}")
        self.next_round += 1
        trial = spec.trial
        self._submit(lambda: self.work.step(trial, round_, weights, ranks, others))

    # ------------------------------------------------------------ sending

    def _submit(self, job: Callable[[], Any], inline: bool = True) -> None:
        """Run a job of the trial: here and now when it is a round's and small (``_small``)
        and none is queued before it, else on the compute thread, in order. A thread
        hand-off costs two wake-ups and a queue each way: ~15% of a d = 1e4 allreduce round
        with 4 agents on 2 cores (benchmarks/README.md, Scaling)."""
        if inline and self.queued == 0 and self._small():
            self._on_result(_outcome(job))
            return
        self.queued += 1
        self.compute.jobs.put(job)

    def _small(self) -> bool:
        """A round's work short enough to block the socket loop for (``INLINE_MAX_D``,
        ``INLINE_MAX_WORK``): a few ms at d = 1e4, under 0.25 s at the bounds."""
        s = self.spec
        return (s is not None and s.d <= INLINE_MAX_D
                and s.d * (s.batch_size + s.workers) <= INLINE_MAX_WORK)

    def _collect(self) -> None:
        while self.bell.poll(0):
            self.bell.recv()
            self.queued -= 1
            self._on_result(self.compute.results.get())

    def _on_result(self, result: Any) -> None:
        spec = self.spec
        if isinstance(result, Exception):
            log.error("compute failed: %s: %s", type(result).__name__, result)
            msg = f"worker {self.rank} failed: {type(result).__name__}: {result}"
            self._send(protocol.build(protocol.ERROR, message=msg[: protocol.MAX_MESSAGE]))
            return
        if result[0] in ("parts", "mean"):
            self._on_allreduce_result(result)
            return
        if spec is None or result[1] != spec.trial:
            return  # a result of a trial the master has moved past
        if result[0] == "ready":
            self._send(protocol.build(protocol.READY, trial=spec.trial))
            return
        if result[0] == "state":
            _, trial, round_, states = result
            self._send(protocol.build(protocol.STATE, trial=trial, round=round_, states=states))
            return
        _, trial, round_, res, apply_s = result
        self.last_sent_round = round_
        self._send(protocol.build(
            protocol.GRADIENT, [res.payload], pad=protocol.GRADIENT_HEADER, trial=trial,
            round=round_, us=protocol.microseconds(res.compute_s, res.encode_s, apply_s),
            bytes_peer=0,
        ))

    # ------------------------------------------------------------ allreduce
    #
    # A round: ROUND r from the master starts it once last round's mean chunks are all here
    # (or it re-syncs us to the master's weights); the compute thread steps the replica and
    # cuts the gradient into parts, sent to their chunks' owners (PART); once every other
    # member's part of our chunk is here, the compute thread makes its mean, which goes to
    # every other member (MEAN) and, in our GRADIENT, to the master. Peers' messages may
    # run ahead of ours by a round (and by an epoch, after a re-plan): they wait in
    # ``ar.inbox`` until we get there.

    def _on_allreduce_round(self, msg: protocol.Message) -> None:
        spec, ar, round_ = self.spec, self.ar, msg.get("round")
        epoch = msg.get("epoch")
        if epoch is None:  # the next round of the current plan
            if ar.epoch < 0 or round_ != self.next_round or msg.payloads:
                raise ProtocolError(f"stale allreduce ROUND {round_} (expected {self.next_round})")
            ar.start = (round_, None)
        else:  # a (re)plan: new members, new epoch; after a loss, the master's weights
            ranks = msg.get("ranks")
            if epoch <= ar.epoch or round_ not in (self.next_round - 1, self.next_round):
                raise ProtocolError(f"stale allreduce plan (epoch {epoch}, round {round_})")
            if not ranks or self.rank not in ranks or ranks[-1] >= spec.workers:
                raise ProtocolError(f"allreduce plan {ranks} does not fit rank {self.rank}")
            weights = None
            if msg.payloads:
                if (len(msg.payloads) != 1
                        or protocol.frame_bytes(msg.payloads[0]) != 8 * spec.d):
                    raise ProtocolError(f"allreduce re-plan must carry {8 * spec.d} bytes")
                weights = msg.payloads[0]
            elif round_ > 0:
                raise ProtocolError("allreduce re-plan after round 0 without the weights")
            inbox = {k: v for k, v in ar.inbox.items() if k[0] == epoch}
            self.ar = ar = _Allreduce(epoch=epoch, members=list(ranks),
                                      bounds=node.chunk_bounds(spec, len(ranks)), inbox=inbox,
                                      start=(round_, weights))
        self.next_round = round_ + 1
        self._advance()

    def _on_peer_messages(self) -> None:
        spec, ar = self.spec, self.ar
        for sender, msg in self.peers.receive():
            key = (msg.get("epoch"), msg.get("round"))
            # Ours may still wait for the means of ar.round while the master's next ROUND
            # (or two) is here: accept from the round we work on to the newest announced.
            oldest = self.next_round - 1 if ar.round is None else ar.round
            trial = msg.get("trial")
            if (spec is None or spec.topology != "allreduce" or trial != spec.trial
                    or key[0] not in (ar.epoch, ar.epoch + 1)
                    or not oldest <= key[1] <= self.next_round
                    or sender == self.rank or sender >= spec.workers):
                self.dropped += 1
                # a past trial's: the round its peers went ahead with when it hit its target
                past = spec is not None and isinstance(trial, int) and trial < spec.trial
                (log.debug if past else log.warning)(
                    "dropped a stale or foreign %s (trial %s, epoch, round %s) from peer %d",
                    msg.type, trial, key, sender)
                continue
            box = ar.inbox.setdefault(key, ({}, {}))
            box[0 if msg.type == protocol.PART else 1][sender] = msg.payloads[0]
        self._advance()

    def _advance(self) -> None:
        """Hand the compute thread whatever the messages in hand allow."""
        ar, spec = self.ar, self.spec
        if ar.start is not None and ar.phase in ("idle", "means"):
            round_, weights = ar.start
            relayed: list[Any] = []
            if weights is None and ar.round is not None:
                means = ar.inbox.get((ar.epoch, ar.round), ({}, {}))[1]
                if any(o != self.rank and hi > lo and o not in means
                       for o, (lo, hi) in zip(ar.members, ar.bounds, strict=True)):
                    return  # last round's means are not all here yet
                relayed = [None if o == self.rank else means.get(o, b"") for o in ar.members]
            ar.inbox.pop((ar.epoch, ar.round), None)
            ar.round, ar.start, ar.phase = round_, None, "scatter"
            key, members = (spec.trial, ar.epoch, round_), list(ar.members)
            self._submit(lambda: self.work.scatter(key, weights, relayed, members))
        elif ar.phase == "parts":
            parts = ar.inbox.get((ar.epoch, ar.round), ({}, {}))[0]
            if all(m in parts for m in ar.members if m != self.rank):
                ar.phase = "reduce"
                key, members = (spec.trial, ar.epoch, ar.round), list(ar.members)
                mine = [None if m == self.rank else parts[m] for m in members]
                self._submit(lambda: self.work.reduce(key, members, mine))

    def _on_allreduce_result(self, result: tuple[Any, ...]) -> None:
        ar, spec = self.ar, self.spec
        key = result[1]
        if spec is None or key != (spec.trial, ar.epoch, ar.round):
            return  # a round the master has re-planned, or a past trial
        if result[0] == "parts":
            _, _, parts, res, apply_s = result
            ar.stats = {"compute_s": res.compute_s, "encode_s": res.encode_s,
                        "apply_s": apply_s, "bytes_peer": 0}
            ar.stats["bytes_peer"] += self._to_peers(protocol.PART, [
                (owner, part) for owner, part in zip(ar.members, parts, strict=True)
                if owner != self.rank and len(part)])
            lo, hi = ar.bounds[ar.members.index(self.rank)]
            if hi == lo:  # no chunk of ours this round: nothing to reduce
                self._report(b"")
            else:
                ar.phase = "parts"
        else:
            _, _, mean, reduce_s = result
            ar.stats["encode_s"] += reduce_s
            ar.stats["bytes_peer"] += self._to_peers(
                protocol.MEAN, [(m, mean) for m in ar.members if m != self.rank])
            self._report(mean)
        self._advance()

    def _to_peers(self, type_: str, sends: list[tuple[int, bytes]]) -> int:
        """Each (rank, payload) as a ``type_`` message; the bytes sent. The header is the
        same for every peer of a phase: built once."""
        ar = self.ar
        header = protocol.build(type_, trial=self.spec.trial, round=ar.round, epoch=ar.epoch,
                                rank=self.rank)[0]
        return sum(self.peers.send(rank, [header, payload]) for rank, payload in sends)

    def _report(self, mean: bytes) -> None:
        """Our GRADIENT to the master: our mean chunk and the round's figures."""
        ar = self.ar
        ar.phase = "means"
        us = protocol.microseconds(*(ar.stats[k] for k in ("compute_s", "encode_s", "apply_s")))
        self._send(protocol.build(protocol.GRADIENT, [mean], pad=protocol.GRADIENT_HEADER,
                                  trial=self.spec.trial, round=ar.round, epoch=ar.epoch,
                                  bytes_peer=ar.stats["bytes_peer"], us=us))

    def _heartbeat(self, now: float) -> None:
        try:
            self.hb.send_multipart(protocol.build(protocol.HEARTBEAT), flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full (no master for a long while): liveness decides
            pass
        self.live.sent(now)

    def _send(self, frames: list[Any]) -> None:
        """On the data connection; heartbeats keep their own schedule on theirs, since a
        message sent here may take longer than the liveness window to arrive. It never
        blocks for ever: with no connection to queue on (one ZeroMQ dropped after a failed
        handshake) it waits at most --timeout, then says why."""
        copy = len(frames[-1]) < 65536
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
            return
        except zmq.Again:
            pass
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLOUT)
        poller.register(self.handshake, zmq.POLLIN)
        deadline = time.monotonic() + self.opts.timeout
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(max(1, int(1000 * left))))
            if self.handshake in events:
                self._check_handshake()  # raises unless ZeroMQ retries
            if self.sock in events:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
                return
        raise _Refused(f"nothing could be sent to the master at {self.opts.master} for "
                       f"{self.opts.timeout:g} s: it has no connection to us", EXIT_MASTER_SILENT)


def run_agent(opts: AgentOptions) -> int:
    """Entry point of ``relufit agent``: one line on stderr for anything that goes wrong."""
    logging.basicConfig(level=logging.WARNING, format="relufit agent: %(message)s")
    if not opts.master.startswith(("tcp://", "ipc://", "inproc://")):
        raise AgentError(f"--master must look like tcp://HOST:PORT, got {opts.master!r}")
    if opts.rank is not None and opts.rank < 0:
        raise AgentError(f"--rank must be >= 0, got {opts.rank}")
    if opts.peer_host is not None and not protocol.valid_peer_host(opts.peer_host):
        raise AgentError(f"--peer-host must be a host name or address, got {opts.peer_host!r}")
    if opts.peer_bind is not None:
        try:
            peers.parse_bind(opts.peer_bind)
        except peers.PeerBindError as e:
            raise AgentError(str(e)) from None
    node.batch_scheduling()  # when asked; before Agent() starts a thread: they inherit it
    agent = Agent(opts)
    try:
        return agent.run()
    except KeyboardInterrupt:
        return 130
    except zmq.ZMQError as e:
        raise AgentError(f"cannot talk to {opts.master}: {e}") from None
    except (curve.KeyFileError, peers.PeerBindError) as e:
        raise AgentError(str(e)) from None
