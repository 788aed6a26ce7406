"""Wire frames between the master (ROUTER) and the agents (DEALER): build, parse, validate.

Pure: no sockets, no clock. A message is ``[header, payload...]``: the header is a small
JSON object with ``v`` (protocol version), ``type`` and the fields of that type; payloads
are raw bytes (float32 weights, encoded gradients). Nothing is pickled. Every check of a
frame that came from the network raises ``ProtocolError``, which the receiver logs before
dropping the frame: a malformed frame never crashes anyone.

Conversation (master M, agent A):

    A -> M  HELLO      {rank | null, pid, peer_port?, peer_host?}   version checked, both ways
    M -> A  WELCOME    {rank, heartbeat_interval, heartbeat_liveness}
    M -> A  TRIAL      {spec, peers?, resume?}       the TrialSpec as JSON; allreduce: every
                                                     rank's peer endpoint (null: lost);
                                                     resume: {round, states} to take the trial
                                                     up from a checkpoint, with [float64
                                                     replica weights, our last payload]
    A -> M  READY      {trial}                       shard built
    M -> A  ROUND      {trial, round, ranks?, epoch?}
                                                     ps: [float32 weights];
                                                     allgather: [others' last payloads];
                                                     broadcast: [encoded mean] (b"" in round 0);
                                                     allreduce: nothing, or when the chunks are
                                                     (re)planned the members (ranks) and a new
                                                     epoch, with [float64 weights] after a loss
    A -> M  GRADIENT   {trial, round, us, bytes_peer, epoch?}
                                                     us: [compute, encode, apply] in whole
                                                     microseconds;
                                                     [encoded gradient]; allreduce: [our mean
                                                     chunk] (b"" when our chunk is empty)
    M -> A  SAVE       {trial, round}                between rounds: for a checkpoint
    A -> M  STATE      {trial, round, states}        our generators' states after that round
    both    HEARTBEAT  {}                            on the heartbeat connection (below);
                                                     any traffic also counts as one
    M -> A  STOP       {}                            the run is over: exit 0
    both    ERROR      {message}                     the peer gives up (e.g. version mismatch)

The two messages of every round, GRADIENT and a ROUND that carries no plan (just trial and
round), have binary headers too (``build`` picks the form, ``parse`` reads both): b"rB", the
version and a code (1 ROUND, 2 GRADIENT), then for ROUND trial and round (uint32), 12 bytes;
for GRADIENT a flags byte (1: an epoch follows), 3 pad bytes, trial, round, epoch and the
three durations in microseconds (uint32), bytes_peer (uint64), 40 bytes. As padded JSON they
were 56 and 124 bytes: 180 a worker a round on the master's link, 52 now.

Between agents (allreduce; each agent's peer ROUTER, the others' DEALERs), with a binary
header of PEER_HEADER bytes instead of JSON (``build``, ``parse_peer``): b"rP", the protocol
version and the type's code (1 byte each), then trial, round, epoch and rank as unsigned
32-bit little-endian integers. An agent sends and takes 2 (M - 1) of them a round each way;
as JSON (protocol 5) one took 11.6 us to build and parse and 96 bytes on the wire, now 3.2 us
and 20 (benchmarks/peer_header.py).

    A -> A  PART       {trial, round, epoch, rank}   [sender's part of the receiver's chunk]
    A -> A  MEAN       {trial, round, epoch, rank}   [the sender's mean chunk]
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

VERSION = 7  # 2: heartbeats on a connection of their own; 3: allreduce (PART, MEAN);
# 4: checkpoints (SAVE, STATE, TRIAL resume); 5: GRADIENT's durations as one list of
# microseconds and tighter padding (the master's link carries 180 header bytes a worker a
# round, not 248); 6: PART and MEAN headers binary, 20 bytes (were 96 of JSON); 7: GRADIENT
# and a plan-less ROUND binary, 40 and 12 bytes (52 a worker a round, not 180)

HELLO = "HELLO"
WELCOME = "WELCOME"
TRIAL = "TRIAL"
READY = "READY"
ROUND = "ROUND"
GRADIENT = "GRADIENT"
HEARTBEAT = "HEARTBEAT"
STOP = "STOP"
ERROR = "ERROR"
PART = "PART"
MEAN = "MEAN"
SAVE = "SAVE"
STATE = "STATE"

# An agent opens two connections to the master: data, and heartbeats only, whose routing id
# is the data connection's plus this suffix. Heartbeats (both ways) go on the second, so a
# message in flight on the first, however long it takes, never hides that a peer is alive.
HEARTBEAT_SUFFIX = b"/hb"
MAX_HEARTBEAT_BYTES = 1024  # what the heartbeat connection accepts per frame

MAX_HEADER = 64 * 1024  # bytes; a TRIAL spec or an allgather rank list fits with room to spare
MAX_RANKS = 4096
MAX_MESSAGE = 400  # characters of an ERROR message kept
# GRADIENT headers, and ROUND headers without a rank list (all but allgather's and an
# allreduce re-plan's), are binary and of a fixed size (module doc), so a round's framing
# overhead is a constant: bytes_up = payloads + M * GRADIENT_HEADER.
_BIN_MAGIC = b"rB"
_ROUND_BIN = struct.Struct("<2sBBII")  # magic, version, code 1, trial, round
_GRADIENT_BIN = struct.Struct("<2sBBBxxxIIIIIIQ")  # ..., code 2, flags, trial, round, epoch,
#                                                    the three durations (us), bytes_peer
GRADIENT_HEADER = _GRADIENT_BIN.size
ROUND_HEADER = _ROUND_BIN.size
_US_MAX = 2**32 - 1  # a duration's microseconds in GRADIENT: up to 71 minutes
# PART and MEAN: the binary header (module doc); bytes_peer = payloads + PEER_HEADER each
_PEER = struct.Struct("<2sBBIIII")
PEER_MAGIC = b"rP"
PEER_HEADER = _PEER.size

_INT, _NUM, _STR, _US = "int", "num", "str", "us"
# The fields each type must carry (beyond v and type), and their kinds.
SCHEMA: dict[str, dict[str, str]] = {
    HELLO: {"pid": _INT},
    WELCOME: {"rank": _INT, "heartbeat_interval": _NUM, "heartbeat_liveness": _INT},
    TRIAL: {"trial": _INT},
    READY: {"trial": _INT},
    ROUND: {"trial": _INT, "round": _INT},
    GRADIENT: {"trial": _INT, "round": _INT, "us": _US, "bytes_peer": _INT},
    SAVE: {"trial": _INT, "round": _INT},
    STATE: {"trial": _INT, "round": _INT},
    HEARTBEAT: {},
    STOP: {},
    ERROR: {"message": _STR},
}
PAYLOADS = {  # how many payload frames each type may carry: (min, max)
    ROUND: (0, MAX_RANKS), GRADIENT: (1, 1), TRIAL: (0, 2),
}
PEER_TYPES = (PART, MEAN)  # their codes in the binary header: 1, 2
_PEER_FIELDS = ("trial", "round", "epoch", "rank")
MAX_ENDPOINT = 300  # characters of a peer endpoint (tcp://HOST:PORT)
# Types readable whatever the sender's version, so a mismatch can be reported clearly.
ANY_VERSION = (HELLO, ERROR)


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the receiver logs it and drops it."""


class VersionMismatch(ProtocolError):
    def __init__(self, theirs: Any, ours: int = VERSION):
        self.theirs, self.ours = theirs, ours
        super().__init__(f"peer speaks protocol version {theirs!r}, this side speaks {ours}")


@dataclass
class Message:
    type: str
    header: dict[str, Any]
    payloads: list[Any] = field(default_factory=list)  # bytes, memoryview or zmq.Frame
    header_bytes: int = 0  # length of the header frame as received

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def build(type_: str, payloads: tuple | list = (), pad: int = 0, **fields: Any) -> list[Any]:
    """Frames of one message: the header (JSON; binary for PART and MEAN, whose ``pad`` is
    moot), then the payloads untouched (zero-copy)."""
    if type_ in PEER_TYPES:
        try:
            header = _PEER.pack(PEER_MAGIC, VERSION, PEER_TYPES.index(type_) + 1,
                                *(fields[k] for k in _PEER_FIELDS))
        except (KeyError, struct.error) as e:
            raise ValueError(f"{type_} needs {', '.join(_PEER_FIELDS)} as integers in "
                             f"0..2**32-1: {e}") from None
        return [header, *payloads]
    if type_ == GRADIENT or (type_ == ROUND and set(fields) == {"trial", "round"}):
        return [_binary_header(type_, fields), *payloads]
    if type_ not in SCHEMA:
        raise ValueError(f"unknown message type {type_!r}")
    header = json.dumps({"v": VERSION, "type": type_, **fields}, separators=(",", ":"),
                        allow_nan=False).encode()
    if len(header) < pad:
        header += b" " * (pad - len(header))
    return [header, *payloads]


def _binary_header(type_: str, fields: dict[str, Any]) -> bytes:
    """ROUND's or GRADIENT's binary header (module doc); ValueError if a field is missing,
    unknown or out of range."""
    try:
        if type_ == ROUND:
            return _ROUND_BIN.pack(_BIN_MAGIC, VERSION, 1, fields["trial"], fields["round"])
        extra = set(fields) - {"trial", "round", "us", "bytes_peer", "epoch"}
        us = fields["us"]
        if extra or not (isinstance(us, list) and len(us) == 3):
            raise ValueError(f"GRADIENT takes trial, round, us (3), bytes_peer and epoch; "
                             f"got {sorted(fields)}")
        return _GRADIENT_BIN.pack(_BIN_MAGIC, VERSION, 2, int("epoch" in fields),
                                  fields["trial"], fields["round"], fields.get("epoch", 0),
                                  *us, fields["bytes_peer"])
    except (KeyError, struct.error) as e:
        raise ValueError(f"{type_}: a field is missing or not an integer in range: {e}") \
            from None


def _parse_binary(raw: bytes, payloads: list[Any], max_payload: int | None) -> Message:
    """A ROUND's or GRADIENT's binary header (``raw`` starts with its magic) and payloads."""
    if len(raw) < 4:
        raise ProtocolError(f"binary header of {len(raw)} bytes")
    if raw[2] != VERSION:
        raise VersionMismatch(raw[2])
    if raw[3] == 1 and len(raw) == ROUND_HEADER:
        _, _, _, trial, round_ = _ROUND_BIN.unpack(raw)
        type_, header = ROUND, {"trial": trial, "round": round_}
    elif raw[3] == 2 and len(raw) == GRADIENT_HEADER:
        _, _, _, flags, trial, round_, epoch, *us, bytes_peer = _GRADIENT_BIN.unpack(raw)
        if flags > 1:
            raise ProtocolError(f"GRADIENT flags {flags}")
        type_ = GRADIENT
        header = {"trial": trial, "round": round_, "us": us, "bytes_peer": bytes_peer,
                  **({"epoch": epoch} if flags else {})}
    else:
        raise ProtocolError(f"binary header of code {raw[3]} and {len(raw)} bytes")
    _check_payloads(type_, payloads, max_payload)
    return Message(type_, {"v": VERSION, "type": type_, **header}, list(payloads), len(raw))


def _check_payloads(type_: str, payloads: list[Any], max_payload: int | None) -> None:
    """As many payload frames as ``type_`` may carry, none over ``max_payload`` bytes."""
    lo, hi = PAYLOADS.get(type_, (0, 0))
    if not lo <= len(payloads) <= hi:
        raise ProtocolError(f"{type_} carries {len(payloads)} payload frames, expected {lo}..{hi}")
    if max_payload is not None:
        for p in payloads:
            if _length(p) > max_payload:
                raise ProtocolError(f"payload of {_length(p)} bytes exceeds {max_payload}")


def parse(frames: list[Any], max_payload: int | None = None) -> Message:
    """Validate one received message; raises ProtocolError (VersionMismatch on a version
    this side does not speak, unless the type is readable at any version)."""
    if not frames:
        raise ProtocolError("empty message")
    if _length(frames[0]) > MAX_HEADER:
        raise ProtocolError(f"header of {_length(frames[0])} bytes exceeds {MAX_HEADER}")
    raw = _bytes(frames[0])
    if raw[:2] == _BIN_MAGIC:
        return _parse_binary(raw, frames[1:], max_payload)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    type_, v = header.get("type"), header.get("v")
    if not isinstance(type_, str) or type_ not in SCHEMA:
        raise ProtocolError(f"unknown message type {str(type_)[:40]!r}")
    if not _is_int(v):
        raise ProtocolError("header has no integer protocol version 'v'")
    if v != VERSION and type_ not in ANY_VERSION:
        raise VersionMismatch(v)
    for name, kind in SCHEMA[type_].items():
        _check_field(header, name, kind)
    payloads = frames[1:]
    _check_payloads(type_, payloads, max_payload)
    _check_extras(type_, header, len(payloads))
    return Message(type_, header, list(payloads), _length(frames[0]))


def parse_peer(frames: list[Any], max_payload: int | None = None) -> Message:
    """Validate a PART or MEAN (its binary header and one payload); raises ProtocolError
    (VersionMismatch on another version)."""
    if len(frames) != 2:
        raise ProtocolError(f"a peer message has a header and one payload, got "
                            f"{len(frames)} frames")
    raw = _bytes(frames[0])
    if len(raw) != PEER_HEADER or raw[:2] != PEER_MAGIC:
        raise ProtocolError(f"not a peer header ({len(raw)} bytes, starting {raw[:2]!r})")
    _, v, code, *values = _PEER.unpack(raw)
    if v != VERSION:
        raise VersionMismatch(v)
    if not 1 <= code <= len(PEER_TYPES):
        raise ProtocolError(f"unknown peer message type code {code}")
    if max_payload is not None and _length(frames[1]) > max_payload:
        raise ProtocolError(f"payload of {_length(frames[1])} bytes exceeds {max_payload}")
    type_ = PEER_TYPES[code - 1]
    return Message(type_, {"v": v, "type": type_, **dict(zip(_PEER_FIELDS, values,
                                                             strict=True))},
                   [frames[1]], PEER_HEADER)


def check_version(msg: Message) -> None:
    """HELLO and ERROR parse at any version; the receiver calls this to refuse a stranger."""
    if msg.header["v"] != VERSION:
        raise VersionMismatch(msg.header["v"])


def _check_extras(type_: str, header: dict[str, Any], n_payloads: int) -> None:
    if type_ == HELLO:
        rank = header.get("rank")
        if rank is not None and not (_is_int(rank) and 0 <= rank < 1 << 20):
            raise ProtocolError(f"HELLO rank must be null or a small integer, got {rank!r}")
        _check_peer_address(header)
    elif type_ == TRIAL:
        if not isinstance(header.get("spec"), dict):
            raise ProtocolError("TRIAL carries no spec object")
        peers = header.get("peers")
        if peers is not None and not (
                isinstance(peers, list) and len(peers) <= MAX_RANKS
                and all(p is None or (isinstance(p, str) and p.startswith("tcp://")
                                      and len(p) <= MAX_ENDPOINT) for p in peers)):
            raise ProtocolError("TRIAL peers must be a list of tcp:// endpoints or nulls")
        resume = header.get("resume")
        if resume is None and n_payloads:
            raise ProtocolError("TRIAL carries payloads only to resume")
        if resume is not None and not (
                isinstance(resume, dict) and _is_int(resume.get("round"))
                and resume["round"] >= 1 and isinstance(resume.get("states"), dict)
                and n_payloads == 2):
            raise ProtocolError("TRIAL resume must be {round >= 1, states} with 2 payloads")
    elif type_ == STATE:
        if not isinstance(header.get("states"), dict):
            raise ProtocolError("STATE carries no states object")
    elif type_ == ROUND and "ranks" in header:
        ranks = header["ranks"]
        if not (isinstance(ranks, list) and len(ranks) <= MAX_RANKS
                and all(_is_int(r) and r >= 0 for r in ranks) and ranks == sorted(set(ranks))):
            raise ProtocolError("ROUND ranks must be a sorted list of distinct ranks")
        if "epoch" in header and not (_is_int(header["epoch"]) and header["epoch"] >= 0):
            raise ProtocolError("ROUND epoch must be an integer >= 0")
    elif type_ == WELCOME:
        if header["heartbeat_interval"] <= 0 or header["heartbeat_liveness"] < 1:
            raise ProtocolError("WELCOME heartbeat settings must be positive")
    elif type_ == GRADIENT:
        if header["bytes_peer"] < 0:
            raise ProtocolError("GRADIENT bytes_peer must be >= 0")
    if type_ in (TRIAL, READY, ROUND, GRADIENT, SAVE, STATE):
        for key in ("trial", "round", "epoch", "rank"):  # some are optional: check the type
            if key in header and not (_is_int(header[key]) and header[key] >= 0):
                raise ProtocolError(f"{type_} {key} must be an integer >= 0")


def _check_peer_address(header: dict[str, Any]) -> None:
    """HELLO's optional peer endpoint: a port, and a host name or address without spaces."""
    port, host = header.get("peer_port"), header.get("peer_host")
    if port is not None and not (_is_int(port) and 0 < port < 65536):
        raise ProtocolError(f"HELLO peer_port must be null or a TCP port, got {port!r}")
    if host is not None and not valid_peer_host(host):
        raise ProtocolError("HELLO peer_host must be null or a host name or address")


def valid_peer_host(host: Any) -> bool:
    """A host name or address that fits in an endpoint: printable, no spaces or slashes."""
    return (isinstance(host, str) and 0 < len(host) <= 255 and host.isprintable()
            and " " not in host and "/" not in host)


def microseconds(*durations: float) -> list[int]:
    """Durations in seconds as GRADIENT's ``us`` carries them: whole microseconds, so the
    header stays short."""
    return [min(_US_MAX, max(0, round(t * 1e6))) for t in durations]


def durations(msg: Message) -> tuple[float, ...]:
    """A GRADIENT's (compute, encode, apply) seconds."""
    return tuple(us / 1e6 for us in msg.header["us"])


def peer_endpoint(host: str, port: int) -> str:
    """``tcp://HOST:PORT``, with an IPv6 address in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _check_field(header: dict[str, Any], name: str, kind: str) -> None:
    if name not in header:
        raise ProtocolError(f"{header['type']} header lacks {name!r}")
    v = header[name]
    ok = {
        _INT: _is_int(v),
        _NUM: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
        _STR: isinstance(v, str),
        _US: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x >= 0 for x in v),
    }[kind]
    if not ok:
        raise ProtocolError(f"{header['type']} field {name!r} has the wrong type")
    if kind == _STR:
        header[name] = v[:MAX_MESSAGE]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if hasattr(frame, "bytes"):  # zmq.Frame
        return frame.bytes
    return bytes(frame)


def _length(frame: Any) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    return len(frame)


def frame_bytes(frame: Any) -> int:
    """Length of one frame as it crosses the socket (bytes, memoryview or zmq.Frame)."""
    return _length(frame)


def buffer(frame: Any) -> memoryview | bytes:
    """A frame's contents without a copy where possible."""
    if hasattr(frame, "buffer"):
        return frame.buffer
    return frame



def parse_heartbeat(frames: list[Any]) -> Message:
    """A message from a heartbeat connection: a HEARTBEAT of at most MAX_HEARTBEAT_BYTES a
    frame, nothing else; raises ProtocolError."""
    msg = parse(frames, MAX_HEARTBEAT_BYTES)
    if msg.type != HEARTBEAT:
        raise ProtocolError(f"{msg.type} on a heartbeat connection")
    return msg

# ---------------------------------------------------------------- liveness


@dataclass
class Liveness:
    """One peer's heartbeat state; ``now`` is passed in so expiry is testable without sleeping.

    A peer is lost when nothing at all has been heard from it for ``interval * liveness``
    seconds. A heartbeat is due when nothing has been sent to it for ``interval`` seconds.
    """

    interval: float
    liveness: int
    last_heard: float
    last_sent: float

    @classmethod
    def start(cls, interval: float, liveness: int, now: float) -> Liveness:
        return cls(interval, liveness, now, now)

    def heard(self, now: float) -> None:
        self.last_heard = max(self.last_heard, now)

    def sent(self, now: float) -> None:
        self.last_sent = max(self.last_sent, now)

    def expired(self, now: float) -> bool:
        return now - self.last_heard > self.interval * self.liveness

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval

    def next_deadline(self, now: float) -> float:
        """Seconds until this peer next needs attention (a heartbeat or an expiry check)."""
        return max(0.0, min(self.last_sent + self.interval,
                            self.last_heard + self.interval * self.liveness) - now)
