"""QSGD quantizer and codecs: statistics against the paper's bounds, exact round trips,
bit counts, and hostile payloads. Fixed seeds throughout."""

import math
import struct

import numpy as np
import pytest

from worker import qsgd
from worker.qsgd import CodecError

CODINGS = ("elias", "fixed")


def buckets(d: int, bucket_size: int) -> list[slice]:
    step = bucket_size or d
    return [slice(i, min(i + step, d)) for i in range(0, d, step)]


def exact_moments(v: np.ndarray, q: qsgd.Quantized) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate Var(Q_i) and P(Q_i != 0), from the quantizer's definition with the
    float32 norms it used (which are fixed by v alone, not by the random draw)."""
    s = q.levels
    var = np.zeros(q.d)
    p_nonzero = np.zeros(q.d)
    for b, sl in enumerate(buckets(q.d, q.bucket_size)):
        norm = float(q.norms[b])
        if norm == 0:
            continue
        x = np.abs(v[sl]) / norm * s
        frac = x - np.floor(x)
        var[sl] = (norm / s) ** 2 * frac * (1 - frac)
        p_nonzero[sl] = np.where(x >= 1, 1.0, x)
    return var, p_nonzero


VECTORS = {
    "gaussian": lambda rng, d: rng.standard_normal(d),
    "spiky": lambda rng, d: rng.standard_normal(d) * (rng.random(d) < 0.1) * 100 + 0.01,
    "flat": lambda rng, d: np.where(rng.random(d) < 0.5, -1.0, 1.0),
}


@pytest.mark.parametrize(
    "d,levels,bucket_size",
    [(64, 1, None), (64, 4, None), (64, 16, 16), (50, 3, 7), (100, 10, 0), (37, 2, 64)],
)
def test_unbiased_with_the_exact_variance(d, levels, bucket_size):
    rng = np.random.default_rng(1000 + d + levels)
    v = VECTORS["gaussian"](rng, d)
    draws = 3000
    samples = np.empty((draws, d))
    for k in range(draws):
        samples[k] = qsgd.dequantize(qsgd.quantize(v, levels, rng, bucket_size))
    q = qsgd.quantize(v, levels, rng, bucket_size)
    var, _ = exact_moments(v, q)
    # every coordinate's sample mean lies within 5 standard errors of v_i
    err = np.abs(samples.mean(axis=0) - v)
    assert np.all(err <= 5 * np.sqrt(var / draws) + 1e-12)
    # and the total squared error matches its exact expectation
    sq = ((samples - v) ** 2).sum(axis=1)
    assert abs(sq.mean() - var.sum()) <= 5 * sq.std() / math.sqrt(draws) + 1e-12
    # each level is floor(a*s) or one above it
    levels_drawn = np.abs(q.signed_levels.astype(np.int64))
    for b, sl in enumerate(buckets(d, q.bucket_size)):
        x = np.abs(v[sl]) / float(q.norms[b]) * levels
        assert np.all((levels_drawn[sl] == np.floor(x)) | (levels_drawn[sl] == np.floor(x) + 1))


@pytest.mark.parametrize("kind", sorted(VECTORS))
@pytest.mark.parametrize("levels", [1, 2, 4, 16, 100])
@pytest.mark.parametrize("d,bucket_size", [(10, None), (1000, None), (1000, 128), (999, 100)])
def test_variance_and_sparsity_bounds_per_bucket(kind, levels, d, bucket_size):
    """E||Q(v)-v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2 and E||Q(v)||_0 <= s(s + sqrt n),
    per bucket of n coordinates, evaluated exactly (the quantizer's law is checked above)."""
    rng = np.random.default_rng(7)
    v = VECTORS[kind](rng, d)
    q = qsgd.quantize(v, levels, rng, bucket_size)
    var, p_nonzero = exact_moments(v, q)
    for sl in buckets(d, q.bucket_size):
        n = sl.stop - sl.start
        bound = min(n / levels**2, math.sqrt(n) / levels) * np.sum(v[sl] ** 2)
        assert var[sl].sum() <= bound * (1 + 1e-6)  # float32 norm rounded up: 1 + 2**-23
        assert p_nonzero[sl].sum() <= levels * (levels + math.sqrt(n)) + 1e-9


def test_sampled_sparsity_and_variance_at_s_equal_sqrt_n():
    rng = np.random.default_rng(3)
    d, s = 2500, 50
    v = rng.standard_normal(d)
    sq, nnz = [], []
    for _ in range(200):
        q = qsgd.quantize(v, s, rng)
        sq.append(np.sum((qsgd.dequantize(q) - v) ** 2))
        nnz.append(q.nnz())
    assert np.mean(sq) <= 1.0 * np.sum(v**2)  # min(n/s^2, sqrt(n)/s) = 1
    assert np.mean(nnz) <= s * (s + math.sqrt(d))


def roundtrip(q: qsgd.Quantized) -> None:
    for coding in CODINGS:
        payload = qsgd.encode(q, coding)
        back = qsgd.decode(payload)
        assert back == q
        assert back.signed_levels.dtype == q.signed_levels.dtype
        assert np.array_equal(qsgd.dequantize(back), qsgd.dequantize(q))
        assert len(payload) == qsgd.HEADER_BYTES + math.ceil(qsgd.encoded_bits(q, coding) / 8)


@pytest.mark.parametrize(
    "name,v,levels,bucket_size",
    [
        ("zero vector", np.zeros(100), 4, None),
        ("zero vector, buckets", np.zeros(100), 4, 7),
        ("d = 1", np.array([-2.5]), 1, None),
        ("d = 1, zero", np.array([0.0]), 3, None),
        ("s = 1", np.linspace(-1, 1, 301), 1, None),
        ("huge s", np.linspace(-3, 2, 1000), 2**20, None),
        ("max s", np.linspace(-3, 2, 100), qsgd.MAX_LEVELS, 10),
        ("s = 127, 128 (dtype edge)", np.linspace(-1, 1, 77), 127, None),
        ("s = 128", np.linspace(-1, 1, 77), 128, None),
        ("bucket does not divide d", np.linspace(-1, 4, 1003), 5, 64),
        ("bucket size 1", np.linspace(-1, 4, 33), 3, 1),
        ("bucket >= d", np.linspace(-1, 4, 33), 3, 1000),
        ("all negative", -np.arange(1, 200, dtype=float), 8, None),
        ("tiny values", np.full(50, 1e-300), 4, None),
        ("huge values", np.full(50, 1e30), 4, 8),
        ("subnormal float32 norm", np.full(50, 1e-44), 4, None),
        ("one spike", np.eye(1, 5000, 4321).ravel(), 16, None),
    ],
)
def test_exact_round_trip_edge_cases(name, v, levels, bucket_size):
    q = qsgd.quantize(v, levels, np.random.default_rng(0), bucket_size)
    roundtrip(q)


def test_round_trip_with_zero_buckets_between_nonzero_ones():
    v = np.zeros(1000)
    v[:10] = 1.0
    v[500:510] = -2.0
    v[-3:] = 0.5
    q = qsgd.quantize(v, 4, np.random.default_rng(1), bucket_size=64)
    assert np.count_nonzero(q.norms == 0) > 10
    roundtrip(q)


@pytest.mark.parametrize("d", [1, 7, 8, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 7, 8, 15, 16, 31, 63, 64, 127, 255, 1000, 70000])
def test_round_trip_across_widths_and_lengths(d, levels):
    rng = np.random.default_rng(d * 1000 + levels)
    q = qsgd.quantize(rng.standard_normal(d) ** 3, levels, rng, bucket_size=d // 3 or None)
    roundtrip(q)


def test_round_trip_of_large_gaps_and_levels():
    # gaps of ~2**20 and levels of ~2**20: records longer than 64 bits
    v = np.zeros(3_000_000)
    v[[5, 1_500_000, 2_999_999]] = [1.0, -1.0, 1e-3]
    q = qsgd.quantize(v, 2**20, np.random.default_rng(2))
    roundtrip(q)


@pytest.mark.parametrize("d", [10_000, 40_000])
def test_elias_bits_at_s_sqrt_d_within_the_papers_bound(d):
    """Corollary 3.3: at s = sqrt(n), at most 2.8 n + 32 bits on average.

    The bound carries an o(1) term: at d = 100 Gaussian vectors need about 3.15 bits per
    coordinate, at d = 1e4 about 2.75. So it is tested at d >= 1e4.
    """
    rng = np.random.default_rng(d)
    s = math.isqrt(d)
    v = rng.standard_normal(d)
    bits = [qsgd.encoded_bits(qsgd.quantize(v, s, rng), "elias") for _ in range(10)]
    assert np.mean(bits) <= 2.8 * d + 32
    assert np.mean(bits) < 32 * d / 11  # about 11x fewer than float32


def test_elias_bits_are_norm_plus_codewords():
    # one nonzero at position 0 with level 1: 32 + |omega(1)| + 1 + |omega(1)| = 35 bits
    q = qsgd.Quantized(3, 4, 0, np.array([2.0], np.float32), np.array([-1, 0, 0], np.int8))
    assert qsgd.encoded_bits(q, "elias") == 35
    # omega(5) = 10 101 0 (6 bits), omega(4) = 10 100 0 (6 bits)
    q = qsgd.Quantized(
        9, 4, 0, np.array([2.0], np.float32), np.array([0] * 4 + [4] + [0] * 4, np.int8)
    )
    assert qsgd.encoded_bits(q, "elias") == 32 + 6 + 1 + 6
    stream = qsgd.encode(q)[qsgd.HEADER_BYTES + 4 :]
    assert stream == bytes([0b10101001, 0b01000000])  # 101010 0 101000 + pad


@pytest.mark.parametrize("levels", [1, 3, 16, 127, 128, 1000, 2**20])
@pytest.mark.parametrize("d,bucket_size", [(1, None), (1000, None), (1001, 100)])
def test_fixed_size_formula(levels, d, bucket_size):
    q = qsgd.quantize(np.linspace(-1, 1, d), levels, np.random.default_rng(0), bucket_size)
    nb = math.ceil(d / bucket_size) if bucket_size else 1
    width = 1 + math.ceil(math.log2(levels + 1))
    assert qsgd.encoded_bits(q, "fixed") == 32 * nb + d * width
    assert len(qsgd.encode(q, "fixed")) == qsgd.HEADER_BYTES + 4 * nb + math.ceil(d * width / 8)


# ---------------------------------------------------------------- hostile payloads


def sample_payloads() -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for levels, bucket_size in [(4, None), (16, 7), (1000, None), (1, 5)]:
        q = qsgd.quantize(rng.standard_normal(40), levels, rng, bucket_size)
        out += [qsgd.encode(q, c) for c in CODINGS]
    return out


def decode_or_codec_error(payload: bytes) -> None:
    """A payload is either rejected with CodecError or canonical: it re-encodes to itself."""
    try:
        q = qsgd.decode(payload)
    except CodecError:
        return
    coding = {1: "elias", 2: "fixed"}[payload[5]]
    assert qsgd.encode(q, coding) == payload


@pytest.mark.parametrize("index", range(8))
def test_every_truncation_is_rejected(index):
    payload = sample_payloads()[index]
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            qsgd.decode(payload[:cut])


@pytest.mark.parametrize("index", range(8))
def test_bit_flips_are_rejected_or_canonical(index):
    payload = sample_payloads()[index]
    rng = np.random.default_rng(index)
    for _ in range(300):
        bad = bytearray(payload)
        for bit in rng.integers(0, 8 * len(bad), size=rng.integers(1, 4)):
            bad[bit // 8] ^= 1 << (bit % 8)
        decode_or_codec_error(bytes(bad))


def test_random_bytes_and_streams_are_rejected_or_canonical():
    rng = np.random.default_rng(9)
    header = bytearray(qsgd.encode(qsgd.quantize(np.ones(64), 16, rng)))[: qsgd.HEADER_BYTES]
    for k in range(300):
        body = rng.integers(0, 256, size=rng.integers(0, 40), dtype=np.uint8).tobytes()
        h = bytearray(header)
        h[5] = 1 + k % 2  # coding
        h[6] = rng.integers(0, 8)  # pad
        struct.pack_into("<I", h, 20, int(rng.integers(0, 20)) if k % 2 == 0 else 0)  # nnz
        decode_or_codec_error(bytes(h) + b"\0\0\x80\x3f" + body)
        decode_or_codec_error(rng.integers(0, 256, size=k % 60, dtype=np.uint8).tobytes())


def patched(payload: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(payload)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize("coding", CODINGS)
def test_bad_headers_and_trailing_bytes_are_rejected(coding):
    q = qsgd.quantize(np.linspace(-1, 1, 100), 4, np.random.default_rng(0), bucket_size=30)
    good = qsgd.encode(q, coding)
    cases = {
        "bad magic": patched(good, 0, "4s", b"QSGX"),
        "bad version": patched(good, 4, "B", 2),
        "bad coding": patched(good, 5, "B", 9),
        "bad pad": patched(good, 6, "B", 8),
        "reserved byte": patched(good, 7, "B", 1),
        "d = 0": patched(good, 8, "<I", 0),
        "absurd d": patched(good, 8, "<I", 2**32 - 1),
        "other d": patched(good, 8, "<I", 99),
        "levels 0": patched(good, 12, "<I", 0),
        "levels beyond int32": patched(good, 12, "<I", 2**31),
        "bucket >= d": patched(good, 16, "<I", 100),
        "nnz beyond d": patched(good, 20, "<I", 101),
        "NaN norm": patched(good, qsgd.HEADER_BYTES, "<f", float("nan")),
        "negative norm": patched(good, qsgd.HEADER_BYTES, "<f", -1.0),
        "trailing byte": good + b"\0",
        "trailing garbage": good + b"garbage",
    }
    for name, payload in cases.items():
        with pytest.raises(CodecError):
            qsgd.decode(payload)
            pytest.fail(name)
    assert qsgd.decode(good) == q


def test_max_d_refuses_a_large_dimension_before_allocating():
    # an all-zero vector of any d has a tiny elias payload: the receiver bounds d
    tiny = patched(
        qsgd.encode(qsgd.quantize(np.zeros(10), 4, np.random.default_rng(0))), 8, "<I", qsgd.MAX_D
    )
    with pytest.raises(CodecError, match="out of range"):
        qsgd.decode(tiny, max_d=10)
    assert qsgd.decode(tiny[:8] + struct.pack("<I", 10) + tiny[12:], max_d=10).d == 10


def test_non_canonical_encodings_are_rejected():
    q = qsgd.Quantized(4, 2, 0, np.array([1.0], np.float32), np.array([0, 1, 0, -2], np.int8))
    fixed = qsgd.encode(q, "fixed")
    head = fixed[:-2]
    # width 3 (sign + 2 level bits): 000 001 000 110, then 4 padding bits
    assert fixed[-2:] == bytes([0b00000100, 0b01100000])
    assert qsgd.decode(head + bytes([0b00000100, 0b01100000])) == q
    with pytest.raises(CodecError, match="negative zero"):
        qsgd.decode(head + bytes([0b10000100, 0b01100000]))
    with pytest.raises(CodecError, match="exceeds"):
        qsgd.decode(head + bytes([0b00001100, 0b01100000]))
    with pytest.raises(CodecError, match="padding"):
        qsgd.decode(head + bytes([0b00000100, 0b01100001]))
    elias = bytearray(qsgd.encode(q, "elias"))
    elias[-1] |= 1  # a padding bit
    with pytest.raises(CodecError):
        qsgd.decode(bytes(elias))


def test_encode_many_and_decode_many_equal_one_by_one():
    """Same-shape fixed vectors are packed and unpacked together; mixed batches keep their
    order."""
    rng = np.random.default_rng(3)
    batch, want = [], []
    for d, levels, bucket, coding in [(1280, 15, 128, "fixed"), (1280, 15, 128, "fixed"),
                                      (1150, 15, 128, "fixed"), (1280, 15, 128, "elias"),
                                      (1280, 15, 128, "fixed"), (333, 3, 50, "fixed"),
                                      (70, 300, 0, "fixed"), (70, 300, 0, "fixed"),
                                      (9, 1, 0, "fixed")]:
        q = qsgd.quantize(rng.standard_normal(d) ** 3, levels, rng, bucket)
        batch.append(qsgd.encode(q, coding))
        want.append(q)
    for coding in ("fixed", "elias"):
        assert qsgd.encode_many(want, coding) == [qsgd.encode(q, coding) for q in want]
    assert qsgd.encode_many([]) == []
    got = qsgd.decode_many([memoryview(p) for p in batch])
    assert got == want
    assert got == [qsgd.decode(p) for p in batch]
    assert qsgd.decode_many([]) == []


def test_decode_many_rejects_a_bad_payload_among_good_ones():
    q = qsgd.Quantized(4, 2, 0, np.array([1.0], np.float32), np.array([0, 1, 0, -2], np.int8))
    good = qsgd.encode(q, "fixed")
    head = good[:-2]
    for bad in (head + bytes([0b10000100, 0b01100000]),  # negative zero
                head + bytes([0b00001100, 0b01100000]),  # level beyond s
                head + bytes([0b00000100, 0b01100001]),  # a padding bit
                good[:-1]):  # truncated: another shape than its group
        for at in range(3):
            batch = [good, good]
            batch.insert(at, bad)
            with pytest.raises(CodecError):
                qsgd.decode_many(batch)
    with pytest.raises(CodecError, match="out of range"):
        qsgd.decode_many([good, good], max_d=3)


def test_decode_accepts_memoryview_and_bytearray():
    q = qsgd.quantize(np.linspace(-1, 1, 50), 4, np.random.default_rng(0))
    payload = qsgd.encode(q)
    assert qsgd.decode(memoryview(payload)) == q
    assert qsgd.decode(bytearray(payload)) == q


# ---------------------------------------------------------------- inputs and values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_raise(bad):
    v = np.ones(10)
    v[3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        qsgd.quantize(v, 4, np.random.default_rng(0))


@pytest.mark.parametrize("levels", [0, -1, 1.5, True, "4", 2**31])
def test_bad_levels_raise(levels):
    with pytest.raises(ValueError, match="levels"):
        qsgd.quantize(np.ones(4), levels, np.random.default_rng(0))


@pytest.mark.parametrize("bucket_size", [-1, 2.5, "8"])
def test_bad_bucket_size_raises(bucket_size):
    with pytest.raises(ValueError, match="bucket_size"):
        qsgd.quantize(np.ones(4), 4, np.random.default_rng(0), bucket_size)


def test_bad_vectors_and_codings_raise():
    rng = np.random.default_rng(0)
    for v in (np.ones((2, 2)), np.array([])):
        with pytest.raises(ValueError):
            qsgd.quantize(v, 4, rng)
    with pytest.raises(ValueError, match="float32"):
        qsgd.quantize(np.array([1e300, 1e300]) * 1e8, 4, rng)
    with pytest.raises(ValueError, match="coding"):
        qsgd.encode(qsgd.quantize(np.ones(3), 4, rng), "huffman")


def test_dequantize_is_norm_times_level_over_s_and_equality_is_by_value():
    rng = np.random.default_rng(4)
    v = rng.standard_normal(20)
    q = qsgd.quantize(v, 8, rng, bucket_size=6)
    expect = np.repeat(q.norms.astype(np.float64), [6, 6, 6, 2]) * q.signed_levels / 8
    assert np.array_equal(qsgd.dequantize(q), expect)
    assert qsgd.dequantize(q).dtype == np.float64
    assert q.norms.dtype == np.float32 and q.bucket_size == 6
    same = qsgd.Quantized(q.d, q.levels, q.bucket_size, q.norms.copy(), q.signed_levels.copy())
    assert same == q and not (same != q)
    other = qsgd.Quantized(q.d, q.levels, q.bucket_size, q.norms * 2, q.signed_levels.copy())
    assert other != q
    with pytest.raises(AttributeError):
        q.levels = 3
    with pytest.raises(ValueError):
        q.signed_levels[0] = 1


def test_same_generator_state_gives_the_same_quantization():
    v = np.random.default_rng(0).standard_normal(100)
    a = qsgd.quantize(v, 4, np.random.default_rng(11))
    b = qsgd.quantize(v, 4, np.random.default_rng(11))
    assert a == b


def test_bucket_size_none_and_zero_and_large_are_one_bucket():
    v = np.linspace(-1, 1, 10)
    for bucket_size in (None, 0, 10, 11):
        q = qsgd.quantize(v, 4, np.random.default_rng(0), bucket_size)
        assert q.bucket_size == 0 and len(q.norms) == 1


# ---------------------------------------------------------------- reference codec


def omega_bits(n: int) -> str:
    """Elias omega, as in the paper: recursive binary groups, then a 0."""
    code = "0"
    while n > 1:
        code = format(n, "b") + code
        n = n.bit_length() - 1
    return code


def reference_stream(q: qsgd.Quantized, coding: str) -> str:
    """The payload's bit stream after header and norms, one character per bit."""
    lv = [int(x) for x in q.signed_levels]
    if coding == "elias":
        out, last = [], -1
        for i, x in enumerate(lv):
            if x:
                out += [omega_bits(i - last), "1" if x < 0 else "0", omega_bits(abs(x))]
                last = i
        return "".join(out)
    width = q.levels.bit_length()
    group = 8 // math.gcd(1 + width, 8)
    m = q.d // (8 * group) * 8  # byte planes over the first group * m coordinates
    field = ["1" * (x < 0) + "0" * (x >= 0) + format(abs(x), f"0{width}b") for x in lv]
    if width + 1 > 8:
        return "".join(field)
    groups = ["".join(field[k + i * m] for i in range(group)) for k in range(m)]
    nbytes = len(groups[0]) // 8 if groups else 0
    planes = "".join(g[8 * j : 8 * j + 8] for j in range(nbytes) for g in groups)
    return planes + "".join(field[group * m :])


@pytest.mark.parametrize("levels", [1, 2, 3, 5, 16, 100, 1000])
@pytest.mark.parametrize("d,bucket_size", [(1, None), (9, None), (200, None), (333, 50)])
def test_payload_bits_match_a_plain_reference(levels, d, bucket_size):
    rng = np.random.default_rng(d + levels)
    q = qsgd.quantize(rng.standard_normal(d) ** 3, levels, rng, bucket_size)
    start = qsgd.HEADER_BYTES + 4 * len(q.norms)
    for coding in CODINGS:
        payload = qsgd.encode(q, coding)
        bits = "".join(format(b, "08b") for b in payload[start:])
        ref = reference_stream(q, coding)
        assert bits == ref + "0" * (-len(ref) % 8)
        assert payload[start - 4 * len(q.norms) : start] == q.norms.astype("<f4").tobytes()


def test_codeword_lengths_at_every_bit_match_a_plain_reader():
    """The decoder's table-driven read of an omega codeword at every bit position."""

    def read(bits: str, p: int) -> int:
        n, at = 1, p
        while at < len(bits) and bits[at] == "1":
            if n > 30 or at + n + 1 > len(bits):
                return 0
            n, at = int(bits[at : at + n + 1], 2), at + n + 1
        return at + 1 - p if at < len(bits) else 0

    rng = np.random.default_rng(0)
    body = rng.integers(0, 256, 300, dtype=np.uint8)
    body[100:140] = 0xFF  # long runs of ones: long and invalid codewords
    bits = "".join(format(b, "08b") for b in body)
    total = len(bits) - 3
    w64 = qsgd._windows64(body)
    length, _ = qsgd._codeword_lengths(w64, qsgd._window16(body, total), total)
    assert [int(x) for x in length[:total]] == [read(bits[:total], p) for p in range(total)]


def test_quantized_from_strided_arrays_encodes_and_leaves_them_writable():
    levels = np.zeros(20, np.int8)
    levels[::3] = [1, -2, 3, 0, -1, 2, 1]
    norms = np.array([1.5, 2.5], np.float32)
    q = qsgd.Quantized(10, 3, 5, norms, levels[::2])
    roundtrip(q)
    levels[1] = 2  # still the caller's to write
    assert levels.flags.writeable and not q.signed_levels.flags.writeable


def _cuts(d: int, unit: int, members: int) -> list[tuple[int, int]]:
    units = -(-d // unit)
    cuts = [min(d, (j * units // members) * unit) for j in range(members + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@pytest.mark.parametrize("coding", ["elias", "fixed"])
@pytest.mark.parametrize("levels", [1, 15, 16, 200])
@pytest.mark.parametrize("d,bucket_size,members", [
    (1, 0, 3), (7, 0, 8), (100, 0, 4), (100, 128, 2), (1000, 128, 3), (1000, 128, 16),
    (10_000, 128, 5), (257, 1, 4), (300, 7, 6), (129, 128, 2), (512, 128, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("one_pass_max_d", [qsgd.ONE_PASS_MAX_D, 0])
def test_quantize_chunks_equals_per_chunk_quantize_byte_for_byte(
        d, bucket_size, members, levels, coding, seed, one_pass_max_d, monkeypatch):
    monkeypatch.setattr(qsgd, "ONE_PASS_MAX_D", one_pass_max_d)
    data = np.random.default_rng(seed + 100)
    v = data.standard_normal(d) * data.choice([1e-30, 1.0, 1e30])
    v[data.random(d) < 0.3] = 0.0
    if seed == 2 and d > 2:
        v[: d // 2] = 0.0  # all-zero chunks
    unit = bucket_size if 0 < bucket_size < d else 1
    bounds = _cuts(d, unit, members)
    one, per = np.random.default_rng(seed), np.random.default_rng(seed)
    got = qsgd.quantize_chunks(v, levels, one, bounds, bucket_size)
    for (lo, hi), q in zip(bounds, got, strict=True):
        if hi == lo:
            assert q is None
            continue
        want = qsgd.quantize(v[lo:hi], levels, per, bucket_size or None)
        assert q == want
        assert qsgd.encode(q, coding) == qsgd.encode(want, coding)
        assert np.array_equal(qsgd.dequantize(q), qsgd.dequantize(want))
    assert one.random() == per.random()  # the generators end in the same state
