"""The worker agent: a DEALER that turns the master's weights into encoded gradients.

The socket lives in the main thread and is never touched elsewhere (ZeroMQ sockets are
not thread-safe); the numpy work runs on one compute thread, fed in order, so the agent
keeps answering and sending heartbeats however long a gradient takes. The compute thread
holds the ``WorkerNode`` and calls it exactly as ``SimPool`` does (same generators, same
order), which is what makes every backend reproduce ``sim``.

Exit codes: 0 on STOP; 1 when the master refuses this agent (ERROR, e.g. a protocol
version mismatch); 3 when the master has been silent longer than the timeout.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from worker import node, protocol
from worker.node import SpecError, TrialSpec, WorkerNode
from worker.protocol import Liveness, ProtocolError

log = logging.getLogger("relufit.agent")

EXIT_STOPPED, EXIT_REFUSED, EXIT_MASTER_SILENT = 0, 1, 3
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000  # reconnect backoff doubles up to this cap
# Largest frame accepted before the trial's d is known: float32 weights at the largest d.
DEFAULT_MAX_FRAME = 4 * node.MAX_D + protocol.MAX_HEADER


class AgentError(Exception):
    """The agent cannot start (bad option, unreadable key file); a one-line message."""


@dataclass(frozen=True)
class AgentOptions:
    master: str  # tcp://HOST:PORT
    rank: int | None = None  # None: the master assigns one
    timeout: float = 60.0  # seconds to wait for the master before it has welcomed us
    curve_dir: str | None = None  # server.key + client.key_secret (zmq.auth format)
    max_frame: int = DEFAULT_MAX_FRAME


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
                try:
                    self.results.put(job())
                except Exception as e:  # reported to the master, never a crash
                    self.results.put(e)
                bell.send(b"")
        finally:
            bell.close(linger=0)


class _Work:
    """What the compute thread owns: the node of the current trial."""

    def __init__(self) -> None:
        self.node: WorkerNode | None = None

    def start(self, spec: TrialSpec, rank: int) -> tuple[str, int]:
        self.node = None  # free the last trial's shard before building the next one
        self.node = WorkerNode(spec, rank)
        return ("ready", spec.trial)

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
                set_client_curve(s, Path(self.opts.curve_dir))
            s.connect(self.opts.master)

    def run(self) -> int:
        """Talk to the master until STOP, a refusal, or its silence; returns the exit code."""
        self._connect()
        self.compute.start()
        self._send(protocol.build(protocol.HELLO, rank=self.rank, pid=os.getpid()))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.hb, zmq.POLLIN)
        poller.register(self.bell, zmq.POLLIN)
        try:
            while True:
                now = time.monotonic()
                events = dict(poller.poll(max(1, int(1000 * self.live.next_deadline(now)))))
                now = time.monotonic()
                if self.bell in events:
                    self._collect()
                if self.hb in events:
                    self._drain_heartbeats(now)
                if self.sock in events:
                    code = self._drain(now)
                    if code is not None:
                        return code
                now = time.monotonic()
                if self.live.expired(now):
                    print(f"relufit agent: the master at {self.opts.master} has been silent for "
                          f"{now - self.live.last_heard:.1f} s; exiting", file=sys.stderr)
                    return EXIT_MASTER_SILENT
                if self.live.heartbeat_due(now):
                    self._heartbeat(now)
        finally:
            self.close()

    def close(self) -> None:
        self.compute.jobs.put(None)
        self.compute.join(timeout=1.0)
        self.bell.close(linger=0)
        self.hb.close(linger=0)
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
        self.spec, self.next_round, self.last_sent_round = spec, 0, -1
        self.compute.jobs.put(lambda: self.work.start(spec, self.rank))

    def _on_round(self, msg: protocol.Message) -> None:
        spec = self.spec
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
        self.compute.jobs.put(lambda: self.work.step(trial, round_, weights, ranks, others))

    # ------------------------------------------------------------ sending

    def _collect(self) -> None:
        while self.bell.poll(0):
            self.bell.recv()
            self._on_result(self.compute.results.get())

    def _on_result(self, result: Any) -> None:
        spec = self.spec
        if isinstance(result, Exception):
            log.error("compute failed: %s: %s", type(result).__name__, result)
            msg = f"worker {self.rank} failed: {type(result).__name__}: {result}"
            self._send(protocol.build(protocol.ERROR, message=msg[: protocol.MAX_MESSAGE]))
            return
        if spec is None or result[1] != spec.trial:
            return  # a result of a trial the master has moved past
        if result[0] == "ready":
            self._send(protocol.build(protocol.READY, trial=spec.trial))
            return
        _, trial, round_, res, apply_s = result
        self.last_sent_round = round_
        self._send(protocol.build(
            protocol.GRADIENT, [res.payload], pad=protocol.GRADIENT_HEADER, trial=trial,
            round=round_, compute_s=res.compute_s, encode_s=res.encode_s, apply_s=apply_s,
        ))

    def _heartbeat(self, now: float) -> None:
        try:
            self.hb.send_multipart(protocol.build(protocol.HEARTBEAT), flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full (no master for a long while): liveness decides
            pass
        self.live.sent(now)

    def _send(self, frames: list[Any]) -> None:
        """On the data connection; heartbeats keep their own schedule on theirs, since a
        message sent here may take longer than the liveness window to arrive."""
        self.sock.send_multipart(frames, copy=len(frames[-1]) < 65536)


def load_key(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise AgentError(f"{path}: no such key file (make keys with zmq.auth.create_certificates)")
    if secret and path.stat().st_mode & 0o077:
        raise AgentError(f"{path}: secret key readable by others; chmod 600 {path}")
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise AgentError(f"{path}: not a ZeroMQ certificate ({type(e).__name__})") from None


def set_client_curve(sock: zmq.Socket, curve_dir: Path) -> None:
    """CurveZMQ client: the master's public key (server.key) and our pair (client.key_secret).

    Key files are in the format ``zmq.auth.create_certificates`` writes; a secret key file
    must not be readable by others. Keys are never printed or logged."""
    server_public, _ = load_key(curve_dir / "server.key", secret=False)
    public, secret = load_key(curve_dir / "client.key_secret", secret=True)
    if secret is None:
        raise AgentError(f"{curve_dir / 'client.key_secret'}: holds no secret key")
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = server_public


def run_agent(opts: AgentOptions) -> int:
    """Entry point of ``relufit agent``: one line on stderr for anything that goes wrong."""
    logging.basicConfig(level=logging.WARNING, format="relufit agent: %(message)s")
    if not opts.master.startswith(("tcp://", "ipc://", "inproc://")):
        raise AgentError(f"--master must look like tcp://HOST:PORT, got {opts.master!r}")
    if opts.rank is not None and opts.rank < 0:
        raise AgentError(f"--rank must be >= 0, got {opts.rank}")
    agent = Agent(opts)
    try:
        return agent.run()
    except KeyboardInterrupt:
        return 130
    except zmq.ZMQError as e:
        raise AgentError(f"cannot talk to {opts.master}: {e}") from None
