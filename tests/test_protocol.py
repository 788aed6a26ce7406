"""worker.protocol: pure frame building/parsing and heartbeat liveness (no sockets)."""

import json
import struct

import pytest

from worker import protocol as p
from worker.protocol import Liveness, ProtocolError, VersionMismatch


def roundtrip(frames):
    return p.parse([bytes(f) for f in frames])


def test_every_message_type_round_trips():
    cases = [
        (p.HELLO, [], {"rank": None, "pid": 12}),
        (p.HELLO, [], {"rank": 3, "pid": 12}),
        (p.WELCOME, [], {"rank": 1, "heartbeat_interval": 0.5, "heartbeat_liveness": 3}),
        (p.TRIAL, [], {"trial": 2, "spec": {"d": 10}}),
        (p.READY, [], {"trial": 2}),
        (p.ROUND, [b"\x00" * 40], {"trial": 0, "round": 5}),
        (p.ROUND, [b"a", b"bc"], {"trial": 0, "round": 5, "ranks": [0, 2, 3]}),
        (p.GRADIENT, [b"xyz"], {"trial": 1, "round": 0, "us": [100000, 0, 7],
                                "bytes_peer": 0}),
        (p.HELLO, [], {"rank": None, "pid": 12, "peer_port": 5601, "peer_host": "10.0.0.7"}),
        (p.TRIAL, [], {"trial": 2, "spec": {"d": 10}, "peers": ["tcp://h:5600", None]}),
        (p.ROUND, [], {"trial": 0, "round": 5, "ranks": [0, 2], "epoch": 1}),
        (p.ROUND, [b"\x00" * 80], {"trial": 0, "round": 5, "ranks": [0, 2], "epoch": 2}),
        (p.PART, [b"part"], {"trial": 1, "round": 3, "epoch": 0, "rank": 2}),
        (p.MEAN, [b""], {"trial": 1, "round": 3, "epoch": 0, "rank": 2}),
        (p.HEARTBEAT, [], {}),
        (p.STOP, [], {}),
        (p.ERROR, [], {"message": "no"}),
    ]
    for type_, payloads, fields in cases:
        frames = [bytes(f) for f in p.build(type_, payloads, **fields)]
        msg = p.parse_peer(frames) if type_ in p.PEER_TYPES else p.parse(frames)
        assert msg.type == type_ and msg.payloads == payloads
        assert {k: msg.header[k] for k in fields} == fields


def test_padded_headers_have_a_fixed_size_and_still_parse():
    a = p.build(p.GRADIENT, [b"x"], pad=p.GRADIENT_HEADER, trial=0, round=1,
                us=p.microseconds(0.0, 0.0, 0.0), bytes_peer=0)
    b = p.build(p.GRADIENT, [b"x"], pad=p.GRADIENT_HEADER, trial=999, round=999999,
                us=p.microseconds(99.99999912345, 98.7654321987, 97.5555555555),
                bytes_peer=99_999_999_999, epoch=99)
    assert len(a[0]) == len(b[0]) == p.GRADIENT_HEADER
    assert roundtrip(b).header["round"] == 999999
    assert p.durations(roundtrip(b)) == (99.999999, 98.765432, 97.555556)
    assert roundtrip(b).header_bytes == p.GRADIENT_HEADER
    r0 = p.build(p.ROUND, [b"x"], pad=p.ROUND_HEADER, trial=0, round=0)
    r1 = p.build(p.ROUND, [b"x"], pad=p.ROUND_HEADER, trial=9999, round=9_999_999)
    assert len(r0[0]) == len(r1[0]) == p.ROUND_HEADER
    assert roundtrip(r1).header["round"] == 9_999_999
    c = p.build(p.PART, [b"x"], trial=0, round=0, epoch=0, rank=0)
    d = p.build(p.MEAN, [b"x"], trial=123456, round=98765432, epoch=99, rank=4095)
    assert len(c[0]) == len(d[0]) == p.PEER_HEADER == 20
    got = p.parse_peer(d)
    assert (got.type, got.header_bytes, got.payloads) == (p.MEAN, p.PEER_HEADER, [b"x"])
    assert [got.get(k) for k in ("trial", "round", "epoch", "rank")] == [
        123456, 98765432, 99, 4095]
    assert p.parse_peer(c).type == p.PART


def hdr(**h):
    return json.dumps(h).encode()


MALFORMED = [
    [],
    [b""],
    [b"\xff\xfe"],
    [b"not json"],
    [b"[1, 2]"],
    [b"null"],
    [hdr(type="HEARTBEAT")],  # no version
    [hdr(v="1", type="HEARTBEAT")],
    [hdr(v=True, type="HEARTBEAT")],
    [hdr(v=1, type="NOPE")],
    [hdr(v=1, type=["ROUND"])],
    [hdr(v=1, type="ROUND", trial=0)],  # no round
    [hdr(v=1, type="ROUND", trial=0, round="3")],
    [hdr(v=1, type="ROUND", trial=0, round=-1)],
    [hdr(v=1, type="ROUND", trial=0, round=2, ranks=[2, 1]), b"a"],
    [hdr(v=1, type="ROUND", trial=0, round=2, ranks="01")],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0, 0], bytes_peer=0)],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[-1, 0, 0], bytes_peer=0), b"x"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0, 0], bytes_peer=0), b"x",
     b"y"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0], bytes_peer=0), b"x"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0.5, 0], bytes_peer=0), b"x"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, True, 0], bytes_peer=0), b"x"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us="0,0,0", bytes_peer=0), b"x"],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, compute_s=0, encode_s=0, apply_s=0,
         bytes_peer=0), b"x"],  # version 4's durations
    [b'{"v":%d,"type":"GRADIENT","trial":0,"round":0,"us":[NaN,0,0],"bytes_peer":0}'
     % p.VERSION, b"x"],
    [b'{"v":%d,"type":"GRADIENT","trial":0,"round":0,"us":[1e999,0,0],"bytes_peer":0}'
     % p.VERSION, b"x"],
    [hdr(v=1, type="HEARTBEAT"), b"unexpected payload"],
    [hdr(v=1, type="TRIAL", trial=0)],
    [hdr(v=1, type="TRIAL", trial=0, spec=[1])],
    [hdr(v=1, type="HELLO", pid=1, rank=-2)],
    [hdr(v=1, type="HELLO", pid=1, rank="0")],
    [hdr(v=1, type="WELCOME", rank=0, heartbeat_interval=0, heartbeat_liveness=3)],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0, 0]), b"x"],  # no bytes_peer
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0, 0], bytes_peer=-1), b"x"],
    [hdr(v=p.VERSION, type="HELLO", pid=1, rank=0, peer_port=0)],
    [hdr(v=p.VERSION, type="HELLO", pid=1, rank=0, peer_port=70000)],
    [hdr(v=p.VERSION, type="HELLO", pid=1, rank=0, peer_port=5600, peer_host="a b")],
    [hdr(v=p.VERSION, type="HELLO", pid=1, rank=0, peer_port=5600, peer_host="x/y")],
    [hdr(v=p.VERSION, type="TRIAL", trial=0, spec={}, peers="tcp://h:1")],
    [hdr(v=p.VERSION, type="TRIAL", trial=0, spec={}, peers=["ipc:///tmp/x"])],
    [hdr(v=p.VERSION, type="TRIAL", trial=0, spec={}, peers=["tcp://" + "h" * 400])],
    [hdr(v=p.VERSION, type="ROUND", trial=0, round=1, ranks=[0, 1], epoch=-1)],
    [hdr(v=p.VERSION, type="ROUND", trial=0, round=1, epoch="1")],  # no ranks: no crash
    [hdr(v=p.VERSION, type="ROUND", trial=0, round=1, epoch=[1])],
    [hdr(v=p.VERSION, type="GRADIENT", trial=0, round=0, us=[0, 0, 0], bytes_peer=0,
         epoch="0"), b"x"],
    [hdr(v=p.VERSION, type="PART", trial=0, round=1, epoch=0, rank=0), b"x"],  # JSON: no more
    [hdr(v=1, type="ERROR", message=5)],
    [hdr(v=1, type="READY", trial=2**70)],
    [b"[" * 100000],  # deep nesting, and longer than the header cap
    [b"[" * 5000 + b"]" * 5000],
    [b" " * (p.MAX_HEADER + 1)],
]


@pytest.mark.parametrize("frames", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_input_raises_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse(frames)


def peer_header(magic=b"rP", v=None, code=1, values=(0, 1, 0, 2)):
    return struct.pack("<2sBBIIII", magic, p.VERSION if v is None else v, code, *values)


MALFORMED_PEER = [
    [],
    [peer_header()],  # no payload
    [peer_header(), b"x", b"y"],  # two
    [peer_header()[:-1], b"x"],  # short
    [peer_header() + b"\0", b"x"],  # long
    [peer_header(magic=b"rp"), b"x"],
    [peer_header(code=0), b"x"],
    [peer_header(code=3), b"x"],
    [hdr(v=p.VERSION, type="PART", trial=0, round=1, epoch=0, rank=0), b"x"],  # JSON
    [b"", b"x"],
]


@pytest.mark.parametrize("frames", MALFORMED_PEER, ids=range(len(MALFORMED_PEER)))
def test_malformed_peer_messages_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_peer(frames)


def test_a_peer_header_of_another_version_or_out_of_range_fields_is_refused():
    with pytest.raises(p.VersionMismatch):
        p.parse_peer([peer_header(v=p.VERSION - 1), b"x"])
    with pytest.raises(ProtocolError, match="exceeds"):
        p.parse_peer([peer_header(), b"x" * 11], max_payload=10)
    for bad in ({"rank": -1}, {"round": 2**32}, {"epoch": 0.5}, {}):
        fields = {"trial": 0, "round": 1, "epoch": 0, "rank": 1, **bad}
        if not bad:
            del fields["rank"]
        with pytest.raises(ValueError):
            p.build(p.PART, [b"x"], **fields)


def test_random_bytes_never_escape_a_peer_parse_as_another_exception():
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(2000):
        head = rng.bytes(int(rng.integers(0, 24)))
        if rng.random() < 0.5:  # a valid magic and version get further into the checks
            head = peer_header()[:4] + head
        try:
            p.parse_peer([head, rng.bytes(4)])
        except ProtocolError:
            pass


def test_oversized_payload_is_refused():
    frames = p.build(p.ROUND, [b"x" * 101], trial=0, round=0)
    p.parse(frames, max_payload=101)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.parse(frames, max_payload=100)


def test_random_bytes_never_escape_as_another_exception():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 4))
        frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(n)]
        if rng.random() < 0.5:  # a JSON-ish prefix gets further into the checks
            kind = rng.choice(list(p.SCHEMA)).encode()
            frames[0] = b'{"v":%d,"type":"%s"' % (p.VERSION, kind) + frames[0]
        try:
            p.parse(frames)
        except ProtocolError:
            pass


def test_version_mismatch_is_its_own_error_but_hello_and_error_still_parse():
    with pytest.raises(VersionMismatch) as e:
        p.parse([hdr(v=p.VERSION + 1, type="ROUND", trial=0, round=0)])
    assert e.value.theirs == p.VERSION + 1 and e.value.ours == p.VERSION
    other = p.VERSION + 5
    hello = p.parse([hdr(v=other, type="HELLO", pid=3, rank=None)])  # readable, to refuse it
    with pytest.raises(VersionMismatch, match=str(other)):
        p.check_version(hello)
    err = p.parse([hdr(v=other, type="ERROR", message="you are too old")])
    assert err.header["message"] == "you are too old"


def test_liveness_expires_after_exactly_liveness_intervals_of_silence():
    lv = Liveness.start(interval=0.5, liveness=3, now=100.0)
    assert not lv.expired(101.5) and lv.expired(101.51)
    lv.heard(101.0)  # any traffic resets it
    assert not lv.expired(102.5) and lv.expired(102.51)
    assert not lv.heartbeat_due(100.4) and lv.heartbeat_due(100.5)
    lv.sent(100.5)
    assert not lv.heartbeat_due(100.9) and lv.heartbeat_due(101.0)
    assert lv.next_deadline(100.6) == pytest.approx(0.4)  # the next heartbeat
    lv.heard(90.0)  # an old timestamp never moves it back
    assert lv.last_heard == 101.0


def test_gradient_and_a_planless_round_are_binary_and_of_fixed_size():
    g = p.build(p.GRADIENT, [b"pay"], trial=7, round=123456, us=[1, 2, 2**32 - 1],
                bytes_peer=2**40)
    ge = p.build(p.GRADIENT, [b""], trial=7, round=1, us=[0, 0, 0], bytes_peer=0, epoch=3)
    r = p.build(p.ROUND, [b"w"], trial=7, round=9)
    assert [len(f[0]) for f in (g, ge, r)] == [p.GRADIENT_HEADER, p.GRADIENT_HEADER,
                                               p.ROUND_HEADER] and p.ROUND_HEADER == 12
    assert p.GRADIENT_HEADER + p.ROUND_HEADER == 52  # a worker's a round (was 180)
    got = roundtrip(g)
    assert (got.type, got.header_bytes, got.payloads) == (p.GRADIENT, p.GRADIENT_HEADER,
                                                          [b"pay"])
    assert {k: got.get(k) for k in ("trial", "round", "us", "bytes_peer")} == {
        "trial": 7, "round": 123456, "us": [1, 2, 2**32 - 1], "bytes_peer": 2**40}
    assert "epoch" not in got.header and roundtrip(ge).get("epoch") == 3
    assert roundtrip(r).header == {"v": p.VERSION, "type": p.ROUND, "trial": 7, "round": 9}
    plan = p.build(p.ROUND, [], trial=7, round=0, ranks=[0, 1], epoch=0)  # stays JSON
    assert plan[0].startswith(b"{") and roundtrip(plan).get("ranks") == [0, 1]
    assert p.microseconds(1e9, -1.0) == [2**32 - 1, 0]  # clamped to what the header holds


@pytest.mark.parametrize("fields", [
    {"trial": 0, "round": 0, "us": [0, 0], "bytes_peer": 0},
    {"trial": 0, "round": 0, "us": [0, 0, -1], "bytes_peer": 0},
    {"trial": 0, "round": 0, "us": [0, 0, 0]},
    {"trial": 0, "round": 2**32, "us": [0, 0, 0], "bytes_peer": 0},
    {"trial": 0, "round": 0, "us": [0, 0, 0], "bytes_peer": 0, "extra": 1},
    {"trial": 0.5, "round": 0, "us": [0, 0, 0], "bytes_peer": 0},
])
def test_a_gradient_that_does_not_fit_its_header_is_refused_at_build(fields):
    with pytest.raises(ValueError):
        p.build(p.GRADIENT, [b"x"], **fields)


def bin_header(code=2, v=None, size=None, flags=0):
    v = p.VERSION if v is None else v
    if code == 1:
        raw = struct.pack("<2sBBII", b"rB", v, 1, 0, 1)
    else:
        raw = struct.pack("<2sBBBxxxIIIIIIQ", b"rB", v, code, flags, 0, 1, 0, 0, 0, 0, 0)
    return raw if size is None else (raw + b"\0" * size)[:size]


MALFORMED_BINARY = [
    [b"rB"],
    [bin_header(code=3), b"x"],
    [bin_header(size=p.GRADIENT_HEADER - 1), b"x"],
    [bin_header(size=p.GRADIENT_HEADER + 1), b"x"],
    [bin_header(code=1, size=p.ROUND_HEADER + 4)],
    [bin_header(flags=2), b"x"],
    [bin_header()],  # GRADIENT without its payload
    [bin_header(), b"x", b"y"],
]


@pytest.mark.parametrize("frames", MALFORMED_BINARY, ids=range(len(MALFORMED_BINARY)))
def test_malformed_binary_headers_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse(frames)


def test_a_binary_header_of_another_version_or_too_large_a_payload_is_refused():
    with pytest.raises(VersionMismatch):
        p.parse([bin_header(v=p.VERSION - 1), b"x"])
    with pytest.raises(VersionMismatch):
        p.parse([bin_header(code=1, v=p.VERSION + 1)])
    with pytest.raises(ProtocolError, match="exceeds"):
        p.parse([bin_header(), b"x" * 11], max_payload=10)
    import numpy as np

    rng = np.random.default_rng(2)
    for _ in range(2000):  # after the magic and version, anything: ProtocolError or a parse
        head = b"rB" + bytes([p.VERSION]) + rng.bytes(int(rng.integers(0, 48)))
        try:
            p.parse([head, *([rng.bytes(3)] * int(rng.integers(0, 3)))])
        except ProtocolError:
            pass
