"""An agent's sockets to the other agents (the ``allreduce`` topology).

Each agent binds one ROUTER (its *peer endpoint*, announced in HELLO) and opens one DEALER
to each other agent's endpoint as the master hands them out in TRIAL. What arrives on the
ROUTER is tagged with the sender's routing id, ``p<rank>-<pid>-<random>``, so a PART or MEAN
whose header names another rank than its connection is dropped. On clusters both ends are
CurveZMQ with the run's agent keys (``worker.curve``): a process without them cannot connect.

Like the agent's main socket, these live in the main thread only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from worker import curve, protocol

log = logging.getLogger("relufit.agent.peers")

# Inside RELUFIT_PORTS (5555-5655, which EC2 opens within a cluster's security group); the
# master has 5555.
PEER_PORTS = (5556, 5655)
_BIND = re.compile(r"tcp://(?P<host>[^\s/]+?)(?::(?P<lo>\d+)(?:-(?P<hi>\d+))?|:\*)?")


class PeerBindError(ValueError):
    """A --peer-bind that is malformed (not tcp://HOST, tcp://HOST:*, tcp://HOST:PORT or
    tcp://HOST:LO-HI) or cannot be bound."""


def parse_bind(spec: str) -> tuple[str, int | None, int | None]:
    """(host, lo, hi) of a peer bind spec; lo = hi = None for any free port."""
    m = _BIND.fullmatch(spec)
    if not m:
        raise PeerBindError(f"--peer-bind must look like tcp://HOST[:PORT|:LO-HI|:*], got {spec!r}")
    if m["lo"] is None:
        return m["host"], None, None
    lo, hi = int(m["lo"]), int(m["hi"] or m["lo"])
    if not 0 < lo <= hi < 65536:
        raise PeerBindError(f"--peer-bind ports must satisfy 0 < LO <= HI < 65536, got {spec!r}")
    return m["host"], lo, hi


def default_bind(master: str) -> str:
    """Loopback for a master on loopback (the local backend); else every interface, on a
    port of ``PEER_PORTS``."""
    if re.match(r"tcp://(127\.|localhost[:/]|\[::1\])", master):
        return "tcp://127.0.0.1:*"
    return f"tcp://0.0.0.0:{PEER_PORTS[0]}-{PEER_PORTS[1]}"


class Peers:
    """The peer ROUTER and the DEALERs to the other agents."""

    def __init__(self, ctx: zmq.Context, bind: str, max_frame: int,
                 curve_dir: str | None = None):
        host, lo, hi = parse_bind(bind)
        self.ctx, self.curve_dir, self.max_frame = ctx, curve_dir, max_frame
        self.auth = None  # one per context: ZeroMQ's ZAP handler is a context-wide endpoint
        self.out: dict[int, tuple[str, zmq.Socket]] = {}  # rank -> (endpoint, DEALER)
        # rank -> (its DEALER's monitor, the time by which it must have connected), until
        # it has: a peer we cannot reach (a firewall) would otherwise stall every round
        self.waiting: dict[int, tuple[zmq.Socket, float]] = {}
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame)
        try:
            if curve_dir:
                self.auth = curve.set_peer_server(self.router, ctx, Path(curve_dir))
            if lo is None:
                self.port = self.router.bind_to_random_port(f"tcp://{host}")
            elif lo == hi:
                self.router.bind(f"tcp://{host}:{lo}")
                self.port = lo
            else:
                self.port = self.router.bind_to_random_port(f"tcp://{host}", lo, hi + 1, 200)
        except (zmq.ZMQError, zmq.ZMQBindError) as e:
            self.close()
            raise PeerBindError(f"cannot listen for peers on {bind}: {e}") from None
        except BaseException:
            self.close()
            raise

    def connect(self, rank: int, peers: list[str | None],
                deadline: float = float("inf")) -> None:
        """DEALERs to every other rank with an endpoint; kept across trials while the
        endpoint is the same. Each new one must connect by ``deadline`` (monotonic time;
        ``unreachable`` says which did not)."""
        for r, endpoint in enumerate(peers):
            if r == rank or endpoint is None:
                continue
            old = self.out.get(r)
            if old is not None and old[0] == endpoint:
                continue
            if old is not None:
                self._forget(r)
                old[1].close(linger=0)
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, f"p{rank}-{os.getpid()}-{os.urandom(4).hex()}".encode())
            if self.curve_dir:
                curve.set_peer_client(s, Path(self.curve_dir))
            self.waiting[r] = (s.get_monitor_socket(zmq.EVENT_CONNECTED), deadline)
            s.connect(endpoint)
            self.out[r] = (endpoint, s)

    def unreachable(self, now: float) -> list[tuple[int, str]]:
        """The peers (rank, endpoint) whose connection has not come up by its deadline; the
        ones that did are forgotten (their monitors closed)."""
        late = []
        for r, (mon, deadline) in list(self.waiting.items()):
            connected = False
            while mon.poll(0):
                connected |= recv_monitor_message(mon)["event"] == zmq.EVENT_CONNECTED
            if connected:
                self._forget(r)
            elif now > deadline:
                late.append((r, self.out[r][0]))
        return late

    def _forget(self, rank: int) -> None:
        entry = self.waiting.pop(rank, None)
        if entry is not None:
            self.out[rank][1].disable_monitor()
            entry[0].close(linger=0)

    def send(self, rank: int, frames: list[Any]) -> int:
        """Send to ``rank`` without blocking; returns the bytes sent (0 when it could not be
        queued: that peer is gone or stuck, and the master's liveness check decides)."""
        entry = self.out.get(rank)
        if entry is None:
            log.warning("no connection to peer %d", rank)
            return 0
        n = sum(protocol.frame_bytes(f) for f in frames)
        try:
            entry[1].send_multipart(frames, flags=zmq.NOBLOCK, copy=n < 65536)
        except zmq.Again:
            log.warning("peer %d is not draining; message dropped", rank)
            return 0
        return n

    def receive(self) -> list[tuple[int, protocol.Message]]:
        """Every PART and MEAN waiting on the ROUTER, each with the rank its connection
        belongs to; raises nothing (malformed frames are logged and dropped)."""
        out = []
        while self.router.poll(0):
            frames = self.router.recv_multipart(copy=False)
            try:
                msg = protocol.parse_peer(frames[1:], self.max_frame)
                sender = msg.get("rank")
                if not frames[0].bytes.startswith(f"p{sender}-".encode()):
                    raise protocol.ProtocolError(f"{msg.type} claims rank {sender} on the "
                                                 "connection of another rank")
            except protocol.ProtocolError as e:
                log.warning("dropped a frame from a peer: %s", e)
                continue
            out.append((sender, msg))
        return out

    def close(self) -> None:
        for r in list(self.waiting):
            self._forget(r)
        for _, s in self.out.values():
            s.close(linger=0)
        self.out = {}
        self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
