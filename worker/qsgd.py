"""QSGD: stochastic quantization and its two codecs. Pure numpy, no I/O.

``quantize(v, levels, rng, bucket_size)`` draws ``Q_s(v)`` (Alistarh et al. 2017, see
docs/reference.md) per bucket; ``encode``/``decode`` turn it into a self-describing payload and
back, exactly; ``dequantize`` gives ``norm_b * signed_level / s`` in float64.

Payload layout (all integers little-endian)::

    header, 24 bytes:
      0  4s  magic b"QSGD"
      4  u8  format version (1)
      5  u8  coding: 1 = "elias", 2 = "fixed"
      6  u8  pad: zero bits at the end of the bit stream (0..7)
      7  u8  reserved, 0
      8  u32 d                 (1 .. 2**31 - 1)
      12 u32 levels s          (1 .. 2**31 - 1)
      16 u32 bucket_size       (0: one bucket, the whole vector; else 1 .. d - 1)
      20 u32 nnz               (elias: number of nonzero coordinates; fixed: 0)
    norms: one float32 per bucket, nb = ceil(d / bucket_size) (1 when bucket_size is 0)
    bit stream, most significant bit of each byte first, zero-padded to a byte:
      elias: for each nonzero coordinate i in increasing order, Elias-omega(gap),
             one sign bit (1: negative), Elias-omega(z_i). gap is i + 1 for the first
             nonzero and the distance to the previous nonzero after that. Gaps run over
             the whole vector, not restarting per bucket, so the stream needs no
             per-bucket table: the bucket of a coordinate is i // bucket_size. The code
             is the paper's Code_s (same codewords; 32 bits of norm per bucket).
      fixed: per coordinate a field of width w = 1 + s.bit_length() bits: the sign bit,
             then z. For w <= 8, g = 8 / gcd(w, 8) fields fill nb = g*w/8 whole bytes;
             with m = 8 * floor(d / (8g)), group k (k < m) holds coordinates k, m + k,
             ..., (g-1)m + k, and the stream is byte plane 0 (byte 0 of groups 0..m-1),
             plane 1, ..., plane nb-1, then the remaining d - g*m fields in order. For
             w > 8 (s >= 128) all fields are in order. Either way ceil(d*w/8) bytes.

``encoded_bits(q, coding)`` counts the norms and the stream (the paper's measure): the
payload is ``HEADER_BYTES + ceil(encoded_bits / 8)`` bytes.

Decoding accepts only canonical payloads (encode(decode(p)) == p): anything else raises
CodecError. Its memory is bounded by the payload (about 12 bytes per stream bit for
Elias), except the decoded length-d level array: pass ``max_d``.

Every hot path is vectorized: encode and decode loop only over the few Elias recursion
depths and decoder walk steps (see "Elias decoding" below), the pointer-doubling steps
of its fallback, and the <= 8 fields of a fixed-width group; never over coordinates,
nonzeros or buckets.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CodecError",
    "Quantized",
    "quantize",
    "quantize_chunks",
    "dequantize",
    "encode",
    "encode_many",
    "decode",
    "decode_many",
    "encoded_bits",
    "fixed_payload_bytes",
    "HEADER_BYTES",
    "MAX_D",
    "MAX_LEVELS",
]

MAGIC = b"QSGD"
VERSION = 1
CODINGS = {"elias": 1, "fixed": 2}
_CODING_NAMES = {v: k for k, v in CODINGS.items()}
_HEADER = struct.Struct("<4sBBBBIIII")
HEADER_BYTES = _HEADER.size
MAX_D = 2**31 - 1
MAX_LEVELS = 2**31 - 1
# Gaps <= d and levels <= s fit in 31 bits: an omega codeword of a value < 2**31 has at
# most 4 groups (31 + 5 + 3 + 2 bits) and a group is at most 31 bits long.
_MAX_GROUP_BITS = 31
_MAX_OMEGA_DEPTH = 4
# quantize_chunks' one pass saves a fixed ~0.1 ms per chunk, but past this length its
# length-d temporaries leave the cache and it is 0.6-0.9x the per-chunk speed
# (benchmarks/codec.py, scatter table: d = 1e6, M = 2..16).
ONE_PASS_MAX_D = 1 << 17


class CodecError(ValueError):
    """A payload that is truncated, corrupt, or not a QSGD payload of this version."""


def _level_dtype(levels: int) -> np.dtype:
    """Smallest signed integer type holding -s..s: memory bandwidth is the cost."""
    for dt in (np.int8, np.int16, np.int32):
        if levels <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _n_buckets(d: int, bucket_size: int) -> int:
    return 1 if bucket_size == 0 else -(-d // bucket_size)


@dataclass(frozen=True, eq=False)
class Quantized:
    """``Q_s(v)``: per-bucket float32 norms and the signed levels ``sign * z``, z in 0..s.

    ``==`` compares the fields and the array contents. ``bucket_size`` is 0 when the whole
    vector is one bucket (``quantize`` normalizes None and sizes >= d to 0).
    """

    d: int
    levels: int
    bucket_size: int
    norms: np.ndarray  # float32, one per bucket
    signed_levels: np.ndarray  # _level_dtype(levels), length d

    def __post_init__(self) -> None:
        if not 1 <= self.d <= MAX_D:
            raise ValueError(f"d must be in 1..{MAX_D}, got {self.d}")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ValueError(f"levels must be in 1..{MAX_LEVELS}, got {self.levels}")
        if not (self.bucket_size == 0 or 1 <= self.bucket_size < self.d):
            raise ValueError(f"bucket_size must be 0 or in 1..d-1, got {self.bucket_size}")
        nb = _n_buckets(self.d, self.bucket_size)
        if self.norms.dtype != np.float32 or self.norms.shape != (nb,):
            raise ValueError(f"norms must be float32 of shape ({nb},)")
        lv = self.signed_levels
        if lv.dtype != _level_dtype(self.levels) or lv.shape != (self.d,):
            want = _level_dtype(self.levels)
            raise ValueError(f"signed_levels must be {want} of shape ({self.d},)")
        if lv.max() > self.levels or lv.min() < -self.levels:
            raise ValueError(f"signed_levels exceed levels={self.levels}")
        if not (np.isfinite(self.norms).all() and (self.norms >= 0).all()):
            raise ValueError("norms must be finite and non-negative")
        # read-only contiguous views: the caller's arrays keep their own flags
        for name in ("norms", "signed_levels"):
            view = np.ascontiguousarray(getattr(self, name)).view()
            view.setflags(write=False)
            object.__setattr__(self, name, view)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Quantized):
            return NotImplemented
        return (
            (self.d, self.levels, self.bucket_size) == (other.d, other.levels, other.bucket_size)
            and np.array_equal(self.norms, other.norms)
            and np.array_equal(self.signed_levels, other.signed_levels)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: equal but not hashable

    @classmethod
    def _trusted(cls, d: int, levels: int, bucket_size: int, norms, signed_levels) -> Quantized:
        """Skip the O(d) checks for fields that decode has already validated."""
        q = object.__new__(cls)
        for name, value in zip(
            ("d", "levels", "bucket_size", "norms", "signed_levels"),
            (d, levels, bucket_size, norms, signed_levels),
            strict=True,
        ):
            object.__setattr__(q, name, value)
        norms.setflags(write=False)
        signed_levels.setflags(write=False)
        return q

    def nnz(self) -> int:
        return int(np.count_nonzero(self.signed_levels))


# ---------------------------------------------------------------- quantizer


def _check_levels(levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise ValueError(f"levels must be in 1..{MAX_LEVELS}, got {levels}")
    return int(levels)


def _check_bucket_size(bucket_size: object, d: int) -> int:
    if bucket_size is None:
        return 0
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)):
        raise ValueError(f"bucket_size must be None or an integer >= 0, got {bucket_size!r}")
    if bucket_size < 0:
        raise ValueError(f"bucket_size must be >= 0, got {bucket_size}")
    return 0 if bucket_size >= d else int(bucket_size)


def _per_bucket(x: np.ndarray, bucket_size: int, fn) -> np.ndarray:
    """``fn`` reduced over each bucket (axis=1 of a reshape, plus the short last bucket)."""
    if bucket_size == 0:
        return np.atleast_1d(fn(x, axis=0))
    full = len(x) // bucket_size * bucket_size
    out = fn(x[:full].reshape(-1, bucket_size), axis=1)
    if full < len(x):
        out = np.append(out, fn(x[full:], axis=0))
    return out


def _sum_squares(x: np.ndarray, bucket_size: int) -> np.ndarray:
    """Per-bucket sums of squares without a length-d temporary.

    einsum's own loop, not BLAS: a threaded BLAS dot is erratic on a busy machine.
    """
    if bucket_size == 0:
        return np.array([np.einsum("i,i", x, x)])
    full = len(x) // bucket_size * bucket_size
    rows = x[:full].reshape(-1, bucket_size)
    out = np.einsum("ij,ij->i", rows, rows)
    if full < len(x):
        out = np.append(out, np.einsum("i,i", x[full:], x[full:]))
    return out


def _scale_per_bucket(
    x: np.ndarray, scale: np.ndarray, bucket_size: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``x * scale[bucket of i]`` without materializing a length-d repeat of ``scale``;
    ``out`` may be ``x`` itself."""
    if out is None:
        out = np.empty_like(x)
    if bucket_size == 0:
        return np.multiply(x, scale[0], out=out)
    full = len(x) // bucket_size * bucket_size
    np.multiply(
        x[:full].reshape(-1, bucket_size),
        scale[: full // bucket_size, None],
        out=out[:full].reshape(-1, bucket_size),
    )
    if full < len(x):
        np.multiply(x[full:], scale[-1], out=out[full:])
    return out


def _float32_norms_rounded_up(absv: np.ndarray, bucket_size: int) -> np.ndarray:
    """Per-bucket 2-norms, rounded UP to float32.

    Rounding up keeps |v_i| / norm <= 1, so z <= s without clipping and Q stays exactly
    unbiased; the float32 norm is what the payload carries, so decoding reproduces Q.
    """
    with np.errstate(over="ignore"):  # an overflow lands in the scaled branch below
        squares = _sum_squares(absv, bucket_size)
    if np.all((squares > 2.0**-900) & (squares < 2.0**900)):
        norms = np.sqrt(squares)
    else:  # squares under- or overflowed (or a bucket is zero): scale by the peak first
        if not np.isfinite(absv).all():  # the common case above implies finite values
            raise ValueError("v contains NaN or inf")
        peak = _per_bucket(absv, bucket_size, np.max)
        safe = np.where(peak > 0, peak, 1.0)
        scaled = _scale_per_bucket(absv, 1.0 / safe, bucket_size)
        norms = safe * np.sqrt(_sum_squares(scaled, bucket_size))
    with np.errstate(over="ignore"):
        n32 = norms.astype(np.float32)
    low = n32.astype(np.float64) < norms
    n32[low] = np.nextafter(n32[low], np.float32(np.inf))
    if not np.isfinite(n32).all():
        raise ValueError("a bucket's norm exceeds the float32 range")
    return n32


def quantize(
    v: np.ndarray, levels: int, rng: np.random.Generator, bucket_size: int | None = None
) -> Quantized:
    """Draw ``Q_s(v)`` with ``s = levels``, per bucket of ``bucket_size`` coordinates.

    ``bucket_size`` None or 0: one bucket, the whole vector; a size that does not divide
    d leaves a shorter last bucket. Raises ValueError on NaN/inf or bad arguments.
    """
    s = _check_levels(levels)
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or not 1 <= v.size <= MAX_D:
        raise ValueError(f"v must be a 1-D vector of 1..{MAX_D} entries, got shape {v.shape}")
    bs = _check_bucket_size(bucket_size, v.size)
    # a few length-d buffers reused in place: fresh pages cost as much as the arithmetic
    absv = np.abs(v)
    norms = _float32_norms_rounded_up(absv, bs)  # raises on NaN/inf
    n64 = norms.astype(np.float64)
    scale = np.divide(s, n64, out=np.zeros_like(n64), where=n64 > 0)
    x = _scale_per_bucket(absv, scale, bs, out=absv)  # a_i * s
    np.minimum(x, s, out=x)  # <= s already, unless float64 rounding says s + 1 ulp
    z = np.floor(x)
    np.subtract(x, z, out=x)  # l = floor(a*s); round up with probability a*s - l
    up = rng.random(v.size)
    z += up < x
    np.copysign(z, v, out=z)
    return Quantized(v.size, s, bs, norms, z.astype(_level_dtype(s)))


def quantize_chunks(
    v: np.ndarray, levels: int, rng: np.random.Generator, bounds: list[tuple[int, int]],
    bucket_size: int,
) -> list[Quantized | None]:
    """``[quantize(v[lo:hi], levels, rng, bucket_size) for (lo, hi) in bounds]`` (None for an
    empty chunk), equal field for field and drawing from ``rng`` in the same order.

    When every chunk starts on a bucket boundary (0 < bucket_size < len(v)) and the vector
    is at most ``ONE_PASS_MAX_D`` long, it is quantized in one pass and cut: a chunk's
    buckets are the vector's. Otherwise each chunk is quantized on its own (its own bucket
    when unaligned).
    """
    v = np.asarray(v, dtype=np.float64)
    bs = int(bucket_size or 0)
    aligned = (0 < bs < v.size <= ONE_PASS_MAX_D) and all(lo % bs == 0 for lo, _ in bounds)
    if not aligned or [lo for lo, _ in bounds[1:]] != [hi for _, hi in bounds[:-1]]:
        return [quantize(v[lo:hi], levels, rng, bs or None) if hi > lo else None
                for lo, hi in bounds]
    lo0, hi_end = bounds[0][0], bounds[-1][1]
    whole = quantize(v[lo0:hi_end], levels, rng, bs)  # one draw of hi_end - lo0 uniforms
    out: list[Quantized | None] = []
    for lo, hi in bounds:
        if hi == lo:
            out.append(None)
            continue
        b0, b1 = (lo - lo0) // bs, -(-(hi - lo0) // bs)
        out.append(Quantized._trusted(hi - lo, whole.levels, bs if bs < hi - lo else 0,
                                      whole.norms[b0:b1].copy(),
                                      whole.signed_levels[lo - lo0:hi - lo0].copy()))
    return out


def dequantize(q: Quantized) -> np.ndarray:
    """``norm_b * signed_level / s`` as float64."""
    per_level = q.norms.astype(np.float64) / q.levels
    return _scale_per_bucket(q.signed_levels.astype(np.float64), per_level, q.bucket_size)


# ---------------------------------------------------------------- Elias omega


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of positive integers < 2**31 (exact: float64 frexp of an integer)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def _omega_code(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elias-omega codewords of n >= 1 (< 2**31): (bits right-aligned in uint64, length).

    The codeword is built from its end: the final 0, then n, then bit_length(n) - 1, ...
    each group prepended above the previous ones, until the group would be 1.
    """
    code = np.zeros(len(n), dtype=np.uint64)
    length = np.ones(len(n), dtype=np.int64)
    cur = n.astype(np.int64)
    for _ in range(_MAX_OMEGA_DEPTH):
        more = cur > 1
        if not more.any():
            break
        bl = _bit_length(np.where(more, cur, 1))
        code |= np.where(more, cur, 0).astype(np.uint64) << length.astype(np.uint64)
        length += np.where(more, bl, 0)
        cur = np.where(more, bl - 1, 1)
    return code, length


def _write_words(fields: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Concatenate bit fields (uint64, 1..64 bits each), MSB first: (bytes, pad bits).

    Each field lands in at most two 64-bit output words; fields sharing a word are
    consecutive (offsets increase), so one OR-reduceat per word half assembles the words.
    """
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    starts = ends - lengths
    aligned = fields << (64 - lengths).astype(np.uint64)  # field's first bit at bit 63
    word = starts >> 6
    shift = (starts & 63).astype(np.uint64)
    first = aligned >> shift
    second = (aligned << (np.uint64(63) - shift)) << np.uint64(1)  # 0 if it fits in one
    bounds = np.concatenate([[0], np.flatnonzero(word[1:] != word[:-1]) + 1])
    out = np.zeros((total + 63) // 64 + 1, dtype=np.uint64)
    at = word[bounds]
    out[at] = np.bitwise_or.reduceat(first, bounds)
    out[at + 1] |= np.bitwise_or.reduceat(second, bounds)
    return out.byteswap().view(np.uint8)[: (total + 7) // 8], (-total) % 8


@functools.cache
def _omega_code_table() -> tuple[np.ndarray, np.ndarray]:
    """Codewords of 0 .. 2**16 - 1 (entry 0 unused): one gather instead of the loop."""
    code, length = _omega_code(np.arange(1 << 16, dtype=np.int64))
    return code, length


def _omega_code_fast(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    table_code, table_len = _omega_code_table()
    small = np.minimum(n, len(table_code) - 1)
    code, length = table_code[small], table_len[small]
    big = np.flatnonzero(n >= len(table_code))
    if len(big):
        code[big], length[big] = _omega_code(n[big])
    return code, length


def _nonzero_indices(lv: np.ndarray) -> np.ndarray:
    """np.flatnonzero(lv), faster when sparse: find the nonzero 8-byte words first."""
    per_word = 8 // lv.itemsize
    full = len(lv) // per_word * per_word
    as_words = lv[:full].view(np.uint64)
    words = np.flatnonzero(as_words != 0)
    if len(words) * 8 > full:  # dense: the direct scan is cheaper
        return np.flatnonzero(lv != 0)
    inside = np.flatnonzero(as_words[words].view(lv.dtype) != 0)
    shift = per_word.bit_length() - 1  # per_word is a power of two
    idx = (words[inside >> shift] << shift) | (inside & (per_word - 1))
    return np.concatenate([idx, full + np.flatnonzero(lv[full:])])


def _elias_codes(lv: np.ndarray):
    """Per nonzero: the gap and level codewords and the sign, in coordinate order."""
    idx = _nonzero_indices(lv)
    vals = lv[idx]
    gap_code, gap_len = _omega_code_fast(np.diff(idx, prepend=-1))
    z_code, z_len = _omega_code_fast(np.abs(vals.astype(np.int64)))
    return gap_code, gap_len, (vals < 0).astype(np.uint64), z_code, z_len


def _encode_elias(q: Quantized) -> tuple[np.ndarray, int, int]:
    gap_code, gap_len, neg, z_code, z_len = _elias_codes(q.signed_levels)
    nnz = len(neg)
    if nnz == 0:
        return np.zeros(0, dtype=np.uint8), 0, 0
    rec_len = gap_len + 1 + z_len
    if rec_len.max() <= 64:  # usual case: one field per record
        zl = z_len.astype(np.uint64)
        fields = (gap_code << (zl + np.uint64(1))) | (neg << zl) | z_code
        stream, pad = _write_words(fields, rec_len)
    else:  # huge gaps and levels: (gap code + sign) and level code as two fields
        fields = np.empty(2 * nnz, dtype=np.uint64)
        lengths = np.empty(2 * nnz, dtype=np.int64)
        fields[0::2], lengths[0::2] = (gap_code << np.uint64(1)) | neg, gap_len + 1
        fields[1::2], lengths[1::2] = z_code, z_len
        stream, pad = _write_words(fields, lengths)
    return stream, pad, nnz


def _fixed_width(levels: int) -> int:
    return 1 + levels.bit_length()


def encoded_bits(q: Quantized, coding: str = "elias") -> int:
    """Bits of norms plus code stream (the paper's count; header and byte padding excluded)."""
    _check_coding(coding)
    norm_bits = 32 * len(q.norms)
    if coding == "fixed":
        return norm_bits + q.d * _fixed_width(q.levels)
    _, gap_len, neg, _, z_len = _elias_codes(q.signed_levels)
    return norm_bits + int(gap_len.sum() + len(neg) + z_len.sum())


def fixed_payload_bytes(d: int, levels: int, bucket_size: int = 0) -> int:
    """Bytes of a fixed-coding payload (header included), known before quantizing."""
    bits = 32 * _n_buckets(d, bucket_size) + d * _fixed_width(levels)
    return HEADER_BYTES + -(-bits // 8)


def _check_coding(coding: str) -> int:
    if coding not in CODINGS:
        raise ValueError(f"coding must be one of {sorted(CODINGS)}, got {coding!r}")
    return CODINGS[coding]


# ---------------------------------------------------------------- fixed width


def _unsigned(dt: np.dtype) -> np.dtype:
    return np.dtype(f"u{dt.itemsize}")


def _overlaps(width: int):
    """(field i, byte j, bits of the overlap, field's shift, byte's shift) within a group.

    A group is the fewest fields that fill whole bytes: lcm(width, 8) bits. Field i holds
    bits [i*width, (i+1)*width) of the group, MSB first; byte j holds bits [8j, 8j + 8).
    """
    group = 8 // math.gcd(width, 8)
    for i in range(group):
        for j in range(i * width // 8, ((i + 1) * width - 1) // 8 + 1):
            lo, hi = max(i * width, 8 * j), min((i + 1) * width, 8 * j + 8)
            yield i, j, hi - lo, (i + 1) * width - hi, 8 * j + 8 - hi


@functools.cache
def _overlap_table(width: int) -> tuple[tuple[int, int, int, int, int], ...]:
    return tuple(_overlaps(width))


_REP = 0x0101010101010101  # one in every byte of a uint64


def _rep(byte: int) -> np.uint64:
    return np.uint64(_REP * byte)


@functools.cache
def _planar_ops(width: int) -> tuple[tuple[int, int, np.uint64, np.uint64, np.uint64], ...]:
    """``_overlaps(width)`` as (field, byte, field shift, byte shift, byte-parallel mask),
    made once per width: a chunked allreduce codes many small vectors a round, and building
    these per call cost as much as the coding itself at d ~ 1e3."""
    t = np.uint64
    return tuple((i, j, t(fshift), t(bshift), _rep((1 << nbits) - 1))
                 for i, j, nbits, fshift, bshift in _overlaps(width))


def _planar_split(d: int, width: int) -> tuple[int, int, int]:
    """(fields per group, bytes per group, plane length m) of the fixed layout, width <= 8.

    Coordinates [0, g*m) form m groups, group k = coordinates k, m + k, ..., (g-1)m + k;
    m is a multiple of 8 so each plane is a whole number of uint64 words.
    """
    group = 8 // math.gcd(width, 8)
    return group, group * width // 8, d // (8 * group) * 8


def _sign_magnitude(lv: np.ndarray, width: int) -> np.ndarray:
    """(k, d) int8 levels -> bytes ``neg << (width-1) | |z|``, byte-parallel in uint64 words
    (each row padded to whole words)."""
    k, d = lv.shape
    buf = np.zeros((k, -(-d // 8) * 8), dtype=np.uint8)
    buf[:, :d] = lv.view(np.uint8)
    words = buf.view(np.uint64)
    neg = (words >> np.uint64(7)) & _rep(1)
    words ^= neg * np.uint64(0xFF)  # two's complement negation of negative bytes:
    words += neg  # (b ^ 0xFF) + 1 per byte, no carry since |z| >= 1 there
    words |= neg << np.uint64(width - 1)
    return buf


def _signed_from_fields(buf: np.ndarray, d: int, width: int, levels: int) -> np.ndarray:
    """Inverse of ``_sign_magnitude`` with the canonical-form checks, on each row of ``buf``
    (k rows of whole uint64 words): the (k, d) int8 levels."""
    words = buf.view(np.uint64)
    neg = (words >> np.uint64(width - 1)) & _rep(1)
    words &= _rep((1 << (width - 1)) - 1)
    z = buf[:, :d]
    if z.max() > levels:
        raise CodecError(f"a level exceeds s={levels}")
    if ((z == 0) & neg.view(np.uint8)[:, :d].astype(bool)).any():
        raise CodecError("negative zero level (not a canonical encoding)")
    words ^= neg * np.uint64(0xFF)
    words += neg
    return buf[:, :d].view(np.int8)


def _pack_planar(u: np.ndarray, d: int, width: int) -> np.ndarray:
    """Fields of <= 8 bits (one per byte of each row of ``u``, zero beyond d) into the fixed
    layout: (k, stream bytes), k vectors of one shape packed together.

    Byte j of every group is one contiguous plane, computed from the field planes with
    byte-parallel shifts and masks on uint64 words: a few whole-array ops.
    """
    group, nbytes, m = _planar_split(d, width)
    k = len(u)
    fields = np.ascontiguousarray(u[:, : group * m]).view(np.uint64).reshape(k, group, m // 8)
    tail = _pack_bits(u[:, group * m : d], width)
    planes = np.zeros((k, nbytes, m // 8), dtype=np.uint64)
    for i, j, fshift, bshift, mask in _planar_ops(width):
        part = (fields[:, i] >> fshift) & mask
        planes[:, j] |= part << bshift if bshift else part
    if not tail.shape[1]:
        return planes.view(np.uint8).reshape(k, nbytes * m)
    return np.concatenate([planes.view(np.uint8).reshape(k, nbytes * m), tail], axis=1)


def _unpack_planar(body: np.ndarray, d: int, width: int) -> np.ndarray:
    """Inverse of ``_pack_planar`` for each row of ``body`` (k streams of one shape, unpacked
    together: the per-call cost is paid once): (k, d rounded up to whole uint64 words)
    bytes, one per field."""
    group, nbytes, m = _planar_split(d, width)
    k = len(body)
    u = np.zeros((k, -(-d // 8) * 8), dtype=np.uint8)
    aligned = np.empty((k, nbytes * m), dtype=np.uint8)  # frombuffer data may be unaligned
    aligned[:] = body[:, : nbytes * m]
    planes = aligned.view(np.uint64).reshape(k, nbytes, m // 8)
    fields = np.zeros((k, group, m // 8), dtype=np.uint64)
    for i, j, fshift, bshift, mask in _planar_ops(width):
        part = (planes[:, j] >> bshift) & mask
        fields[:, i] |= part << fshift if fshift else part
    u[:, : group * m] = fields.view(np.uint8).reshape(k, group * m)
    if d > group * m:
        u[:, group * m : d] = _unpack_bits(body[:, nbytes * m :], d - group * m, width)
    return u


# The planar layout's tail (fewer than 64 fields) is the plain MSB-first bit stream that
# ``_pack_columns`` writes; for so few fields, numpy's bit (un)packing does it in 3 calls
# where the column loop takes a dozen (~40 us a call, most of a small chunk's coding).


def _pack_bits(u: np.ndarray, width: int) -> np.ndarray:
    """Each row of fields of ``width`` <= 8 bits (one per byte) as an MSB-first bit stream,
    zero-padded to whole bytes."""
    k, d = u.shape
    bits = np.unpackbits(u[:, :, None], axis=2)[:, :, 8 - width :]
    return np.packbits(bits.reshape(k, d * width), axis=1)


def _unpack_bits(body: np.ndarray, d: int, width: int) -> np.ndarray:
    """Inverse of ``_pack_bits`` for each row of ``body``: (k, d) fields, one per byte."""
    k = len(body)
    bits = np.zeros((k, d, 8), dtype=np.uint8)
    bits[:, :, 8 - width :] = np.unpackbits(body, axis=1)[:, : d * width].reshape(k, d, width)
    return np.packbits(bits, axis=2).reshape(k, d)


def _pack_columns(u: np.ndarray, width: int) -> np.ndarray:
    """Fields wider than a byte: one strided column per field of a byte-filling group.

    Works on groups of fields that fill whole bytes, one strided column per field: a
    handful of whole-array shifts and ORs, no per-coordinate loop and no bit arrays.
    """
    group = 8 // math.gcd(width, 8)
    nbytes = group * width // 8
    d = len(u)
    m = -(-d // group)
    if m * group != d:
        u = np.concatenate([u, np.zeros(m * group - d, dtype=u.dtype)])
    cols = u.reshape(m, group)
    out = np.zeros((m, nbytes), dtype=np.uint8)
    for i, j, nbits, fshift, bshift in _overlap_table(width):
        part = cols[:, i] >> u.dtype.type(fshift) if fshift else cols[:, i]
        if nbits < width or fshift:
            part = part & u.dtype.type((1 << nbits) - 1)
        if bshift:
            part = part << u.dtype.type(bshift)
        out[:, j] |= part.astype(np.uint8, copy=False)
    return out.ravel()[: -(-d * width // 8)]


def _unpack_columns(body: np.ndarray, d: int, width: int, udt: np.dtype) -> np.ndarray:
    group = 8 // math.gcd(width, 8)
    nbytes = group * width // 8
    m = -(-d // group)
    if m * nbytes != len(body):
        body = np.concatenate([body, np.zeros(m * nbytes - len(body), dtype=np.uint8)])
    rows = body.reshape(m, nbytes)
    cols = np.zeros((m, group), dtype=udt)
    t = udt.type
    for i, j, nbits, fshift, bshift in _overlap_table(width):
        part = rows[:, j].astype(udt) if udt.itemsize > 1 else rows[:, j]
        if bshift:
            part = part >> t(bshift)
        if nbits + bshift < 8:
            part = part & t((1 << nbits) - 1)
        if fshift:
            part = part << t(fshift)
        cols[:, i] |= part
    return cols.ravel()[:d]


def _encode_fixed(lv: np.ndarray, levels: int) -> tuple[np.ndarray, int]:
    """The streams of the rows of ``lv`` ((k, d) levels of one shape), and their pad bits."""
    d = lv.shape[1]
    width = _fixed_width(levels)
    pad = (-(d * width)) % 8
    if width <= 8:
        return _pack_planar(_sign_magnitude(lv, width), d, width), pad
    return np.stack([_encode_wide(row, width) for row in lv]), pad


def _encode_wide(lv: np.ndarray, width: int) -> np.ndarray:
    """One stream of fields wider than a byte (s >= 128), in order."""
    udt = _unsigned(lv.dtype)
    u = np.abs(lv).view(udt)  # |lv| <= s fits: no overflow at the dtype's minimum
    u |= (lv.view(udt) >> udt.type(8 * udt.itemsize - 1)) << udt.type(width - 1)
    return _pack_columns(u, width)


def _decode_fixed(body: np.ndarray, d: int, levels: int, pad: int) -> np.ndarray:
    """The (k, d) levels of k fixed-width streams of one shape, the rows of ``body``."""
    width = _fixed_width(levels)
    expect = -(-d * width // 8)
    if body.shape[1] != expect:
        raise CodecError(f"fixed payload body has {body.shape[1]} bytes, expected {expect}")
    if pad != (-(d * width)) % 8:
        raise CodecError("header pad does not match d and levels")
    if pad and (body[:, -1] & ((1 << pad) - 1)).any():
        raise CodecError("nonzero padding bits")
    if width <= 8:
        return _signed_from_fields(_unpack_planar(body, d, width), d, width, levels)
    return np.stack([_decode_wide(row, d, width, levels) for row in body])


def _decode_wide(body: np.ndarray, d: int, width: int, levels: int) -> np.ndarray:
    """One stream of fields wider than a byte (s >= 128), in order."""
    sdt = _level_dtype(levels)
    udt = _unsigned(sdt)
    t = udt.type
    u = _unpack_columns(body, d, width, udt)
    neg = u >> t(width - 1)
    z = u & t((1 << (width - 1)) - 1)
    if z.max() > levels:
        raise CodecError(f"a level exceeds s={levels}")
    if (u == t(1 << (width - 1))).any():
        raise CodecError("negative zero level (not a canonical encoding)")
    z ^= np.negative(neg)  # two's complement negation where neg: (z ^ -neg) + neg
    z += neg
    return z.view(sdt)


# ---------------------------------------------------------------- Elias decoding
#
# The stream has no record boundaries, so the decoder finds them in parallel:
# 1. the length of an omega codeword read at EVERY bit position (a 64K-entry table on the
#    next 16 bits; the few longer or invalid ones by shift arithmetic on 64-bit windows);
# 2. from it the jump J(p) = p + record length at every p (p + 1 where no record can
#    start), so that the record starts are the chain 0, J(0), J(J(0)), ... to the end;
# 3. walkers started every 256 bits follow J in lockstep for a while: Elias streams
#    resynchronize within a few codewords, so their paths cover the true chain; pointer
#    doubling over those few candidates extracts it (over all positions if they do not).
# A chain that passes through a position where no record starts, or that does not hold
# exactly nnz records, is a corrupt stream.

_LUT_BITS = 16
_UNRESOLVED = 255  # in the length table: read this codeword the long way
_WALK_EVERY = 256  # bits between walkers
_WALK_MARGIN = 24  # steps a walker takes beyond its stretch, to resynchronize
_WALK_SLACK = 2.0  # times the mean number of records in a stretch
# Up to this many stream bits, pointer doubling (log2 steps over every position) costs less
# than the walkers' lockstep walk: 190-370 us against 350-830 us per decode at d = 100..2500
# (s16 b128, measured 2026-12-03); past ~16k bits the walk wins.
_DOUBLING_MAX_BITS = 1 << 14


def _windows64(body: np.ndarray) -> np.ndarray:
    """W[j] = the 64 bits starting at byte j (big-endian, zero past the end), as uint64."""
    n = len(body)
    buf = np.zeros(n + 16, dtype=np.uint8)
    buf[:n] = body
    w = np.empty(n + 8, dtype=np.uint64)
    for r in range(8):  # 8 interleaved aligned views instead of 8 shifts per byte
        view = np.frombuffer(buf.data, dtype=">u8", offset=r, count=(len(buf) - r) // 8)
        w[r::8] = view[: len(w[r::8])]
    return w


def _omega_at(w: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(length, value) of the omega codeword at each bit position; length 0 if invalid.

    A codeword of a value < 2**31 has groups of 2, 3-4, 5-16 and 17-31 bits plus the
    final 0: at most 55 bits, all inside the 57 bits a byte-aligned 64-bit window holds
    past the position. So it decodes with straight-line shifts: every candidate group
    is read, then the first 0 where a group would start picks the result.
    """
    u, one = np.uint64, np.uint64(1)
    x = w[pos >> 3] << (pos & 7).astype(u)  # the codeword starts at bit 63
    n1 = x >> u(62)
    at2 = n1 + u(3)  # bits consumed after group 2
    n2 = (x << u(2)) >> (u(63) - n1)
    at3 = at2 + n2 + one
    n3 = (x << at2) >> (u(63) - n2)
    big = n3 > u(_MAX_GROUP_BITS - 1)  # a next group would be longer than 31 bits
    n3_read = np.minimum(n3, u(_MAX_GROUP_BITS - 1))
    at4 = at3 + n3_read + one
    n4 = (x << at3) >> (u(63) - n3_read)
    ends = [x >> u(63) == 0, ((x >> u(61)) & one) == 0]
    ends += [(x << at) >> u(63) == 0 for at in (at2, at3, at4)]
    ends[4] &= ~big
    # the first end found wins: fold from the last candidate back to the first
    length = np.where(ends[4], at4 + one, u(0))
    value = n4
    for end, at, n in zip(ends[3::-1], (at3, at2, u(2), u(0)), (n3, n2, n1, one), strict=True):
        length = np.where(end, at + one, length)
        value = np.where(end, n, value)
    return length.astype(np.int64), value.astype(np.int64)


@functools.cache
def _omega_table() -> tuple[np.ndarray, np.ndarray]:
    """For each 16-bit pattern: (length, value) of the omega codeword at its start.

    Length 0: no valid codeword starts there, whatever follows (a third group of value
    > 30 that does not end the codeword). Length _UNRESOLVED: the codeword does not end
    within the 16 bits; value 0 then too.
    """
    patterns = np.arange(1 << _LUT_BITS, dtype=">u2").view(np.uint8)
    starts = _LUT_BITS * np.arange(1 << _LUT_BITS, dtype=np.int64)
    length, value = _omega_at(_windows64(patterns), starts)
    u, one = np.uint64, np.uint64(1)
    x = np.arange(1 << _LUT_BITS, dtype=np.uint64) << u(64 - _LUT_BITS)
    n1 = x >> u(62)
    at2 = n1 + u(3)
    n2 = (x << u(2)) >> (u(63) - n1)
    at3 = at2 + n2 + one
    n3 = (x << at2) >> (u(63) - n2)
    bit = [((x << at) >> u(63)) == 1 for at in (u(0), u(2), at2, np.minimum(at3, u(63)))]
    invalid = bit[0] & bit[1] & bit[2] & (at3 < _LUT_BITS) & (n3 > _MAX_GROUP_BITS - 1) & bit[3]
    unresolved = ((length == 0) | (length > _LUT_BITS)) & ~invalid
    length[unresolved | invalid] = 0
    value[length == 0] = 0
    length[unresolved] = _UNRESOLVED
    return length.astype(np.uint8), value.astype(np.uint16)


def _window16(body: np.ndarray, total: int) -> np.ndarray:
    """The 16 bits starting at every bit position < total (zeros past the end), uint16."""
    n = len(body)
    buf = np.zeros(n + 8, dtype=np.uint8)
    buf[:n] = body
    w32 = np.empty(n, dtype=np.uint32)
    for r in range(4):
        view = np.frombuffer(buf.data, dtype=">u4", offset=r, count=(len(buf) - r) // 4)
        w32[r::4] = view[: len(w32[r::4])]
    out = np.empty((n, 8), dtype=np.uint16)
    for r in range(8):  # bit r of byte j: shift by 16 - r, keep the low 16 bits
        np.right_shift(w32, np.uint32(16 - r), out=out[:, r], casting="unsafe")
    return out.ravel()[:total]


def _codeword_lengths(w64: np.ndarray, win: np.ndarray, total: int):
    """Omega codeword length at every bit position < total (0: none ends in the stream),
    followed by 64 zeros; and the positions read the long way, with their values."""
    lut_len, _ = _omega_table()
    length = np.zeros(total + 64, dtype=np.uint8)  # zeros past the end: no clipping later
    np.take(lut_len, win, out=length[:total])
    slow = np.flatnonzero(length[:total] == _UNRESOLVED)
    slow_len, slow_val = _omega_at(w64, slow)
    length[slow] = slow_len  # <= 55 bits: fits uint8
    tail = np.arange(max(total - 64, 0), total)  # windows read zeros past the end
    length[tail[tail + length[tail] > total]] = 0
    return length, (slow, slow_val)


def _codeword_values(win: np.ndarray, at: np.ndarray, slow) -> np.ndarray:
    """Values of the (valid) codewords at ``at``: from the table, or from the long reads."""
    _, lut_val = _omega_table()
    value = np.take(lut_val, np.take(win, at)).astype(np.int64)
    miss = np.flatnonzero(value == 0)  # exactly the positions read the long way
    if len(miss):
        value[miss] = slow[1][np.searchsorted(slow[0], at[miss])]
    return value


def _jumps(length: np.ndarray, total: int, idx_t: type) -> np.ndarray:
    """J(p) = p + L(p) + 1 + L(p + L(p) + 1): where a record starting at p ends.

    ``length`` is L with 64 zeros past the end, so the inner index needs no clipping.

    Where no record can start (a length is 0) J still moves forward, so walkers pass
    over such positions; the chain found is checked for them afterwards, and for a
    last record cut short by the end (J is capped at total, the one sink).
    """
    jump = np.empty(total + 1, dtype=idx_t)
    z_at = np.arange(1, total + 1, dtype=idx_t)
    z_at += length[:total]
    np.add(z_at, np.take(length, z_at), out=jump[:total])
    tail = jump[max(total - 128, 0) : total]  # only the last records can overrun
    np.minimum(tail, total, out=tail)
    jump[total] = total
    return jump


def _chain(jump: np.ndarray, limit: int) -> np.ndarray:
    """J^0(0), J^1(0), ... up to and including the first node >= limit (a sink), by
    pointer doubling: each step doubles the known prefix and squares the jump table."""
    chain = np.zeros(1, dtype=jump.dtype)
    while chain[-1] < limit:
        chain = np.concatenate([chain, jump[chain]])
        jump = jump[jump]
    return chain[: np.argmax(chain >= limit) + 1]


def _record_starts(jump: np.ndarray, total: int, nnz: int) -> np.ndarray:
    """The chain 0, J(0), ... through ``jump`` (sink ``total``), ending with ``total``.

    Walker i starts at bit 256 i and takes enough steps to pass well into walker i+1's
    stretch. Walker 0 is on the chain; once walker i is, its last position that walker
    i+1 also reached lies on walker i+1's path, which is on the chain from there. So the
    chain is walker 0's path to that hand-over point, then walker 1's to the next, and
    so on. The result is checked against J; if a walker failed to resynchronize, pointer
    doubling over all positions gives the chain, as it does for any stream of at most
    ``_DOUBLING_MAX_BITS`` (an allreduce chunk's, typically).
    """
    if total <= _DOUBLING_MAX_BITS:  # a short stream: a few doubling steps beat the walk
        return _chain(jump, total)
    steps = min(int(_WALK_SLACK * _WALK_EVERY * nnz / total) + _WALK_MARGIN, nnz)
    paths = np.empty((steps + 1, -(-total // _WALK_EVERY)), dtype=jump.dtype)
    paths[0] = np.arange(0, total, _WALK_EVERY)
    for _ in range(3):  # a walker slow to resynchronize: walk twice as far
        for i in range(len(paths) - steps - 1, len(paths) - 1):  # lockstep walk
            np.take(jump, paths[i], out=paths[i + 1])
        chain = _stitch(paths, jump, total)
        if chain is not None or steps >= nnz:
            break
        paths = np.concatenate([paths, np.empty((len(paths), paths.shape[1]), paths.dtype)])
        steps = len(paths) // 2
    return chain if chain is not None else _chain(jump, total)


def _stitch(paths: np.ndarray, jump: np.ndarray, total: int) -> np.ndarray | None:
    """The chain from the walkers' paths (see _record_starts), or None if they miss it."""
    n, k = paths.shape
    # Each path increases: offset walker i by i * (total + 1) to search all at once.
    # Walker i hands over at its last position not beyond walker i+1's last one.
    offset = np.arange(k, dtype=np.int64) * (total + 1)
    keys = (paths.T + offset[:, None]).ravel()
    row = np.arange(k, dtype=np.int64) * n
    last = np.full(k, n - 1, dtype=np.int64)
    last[:-1] = np.searchsorted(keys, paths[-1, 1:] + offset[:-1], side="right") - 1 - row[:-1]
    target = keys[row[:-1] + last[:-1]] + (total + 1)
    hit = np.minimum(np.searchsorted(keys, target), len(keys) - 1)
    if not np.array_equal(keys[hit], target) or paths[-1, -1] != total:
        return None
    first = np.concatenate([[0], hit - row[1:] + 1])
    at = np.arange(n)[None, :]
    chain = paths.T[(at >= first[:, None]) & (at <= last[:, None])]
    chain = chain[: np.searchsorted(chain, total) + 1]
    if chain[0] != 0 or not np.array_equal(jump[chain[:-1]], chain[1:]):
        return None
    return chain


def _decode_elias(body: np.ndarray, d: int, levels: int, nnz: int, pad: int) -> np.ndarray:
    total = 8 * len(body) - pad
    if nnz == 0:
        if len(body) or pad:
            raise CodecError("bytes after an empty elias stream")
        return np.zeros(d, dtype=_level_dtype(levels))
    # each record holds 3 to 2 * 55 + 1 bits: checked before allocating per bit
    if nnz > d or total < 3 * nnz or total > 111 * nnz:
        raise CodecError(f"stream length {total} bits does not fit {nnz} nonzeros in d={d}")
    if pad and body[-1] & ((1 << pad) - 1):
        raise CodecError("nonzero padding bits")
    idx_t = np.int32 if total + 64 < 2**31 else np.int64
    w64 = _windows64(body)
    win = _window16(body, total)
    length, slow = _codeword_lengths(w64, win, total)
    chain = _record_starts(_jumps(length, total, idx_t), total, nnz)
    starts = chain[:-1].astype(np.int64)
    sign_at = starts + length[starts]
    z_at = sign_at + 1
    if (
        chain[-1] != total
        or len(starts) != nnz
        or not length[starts].all()
        or z_at[-1] >= total
        or not length[z_at].all()
    ):
        raise CodecError("elias stream is corrupt or does not hold nnz records")
    gaps = _codeword_values(win, starts, slow)
    neg = (w64[sign_at >> 3] << (sign_at & 7).astype(np.uint64)) >> np.uint64(63)
    z = _codeword_values(win, z_at, slow)
    where = np.cumsum(gaps) - 1
    if where[-1] >= d:
        raise CodecError(f"a nonzero lies past d={d}")
    if z.max() > levels:
        raise CodecError(f"a level exceeds s={levels}")
    out = np.zeros(d, dtype=_level_dtype(levels))
    signed = z.astype(out.dtype)
    np.negative(signed, out=signed, where=neg.astype(bool))
    out[where] = signed
    return out


# ---------------------------------------------------------------- payloads


def encode(q: Quantized, coding: str = "elias") -> bytes:
    """Self-describing payload: header, float32 norms, bit stream (see module docstring)."""
    return encode_many([q], coding)[0]


def encode_many(qs: Sequence[Quantized], coding: str = "elias") -> list[bytes]:
    """``[encode(q, coding) for q in qs]``, vectors of one shape (d and levels) packed
    together for the fixed coding: a chunked allreduce encodes M - 1 small parts a round,
    where the codec's per-call cost is most of the work."""
    code = _check_coding(coding)
    streams: list[tuple[np.ndarray, int, int] | None] = [None] * len(qs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, q in enumerate(qs):
        if coding == "elias":
            streams[i] = _encode_elias(q)
        else:
            groups.setdefault((q.d, q.levels), []).append(i)
    for (_, levels), idx in groups.items():
        lv = (qs[idx[0]].signed_levels[None] if len(idx) == 1
              else np.stack([qs[i].signed_levels for i in idx]))
        rows, pad = _encode_fixed(lv, levels)
        for i, row in zip(idx, rows, strict=True):
            streams[i] = (row, pad, 0)
    out = []
    for q, (stream, pad, nnz) in zip(qs, streams, strict=True):
        header = _HEADER.pack(MAGIC, VERSION, code, pad, 0, q.d, q.levels, q.bucket_size, nnz)
        out.append(b"".join([header, q.norms.astype("<f4").tobytes(), stream.tobytes()]))
    return out


def decode(payload: bytes | bytearray | memoryview, max_d: int = MAX_D) -> Quantized:
    """Inverse of ``encode``. Raises CodecError (a ValueError) on any malformed payload.

    ``max_d`` lets a receiver that knows the dimension refuse a larger one before any
    length-d array is allocated (an all-zero vector of any d has a tiny payload).
    """
    return decode_many([payload], max_d)[0]


def decode_many(payloads: Sequence[bytes | bytearray | memoryview],
                max_d: int = MAX_D) -> list[Quantized]:
    """``[decode(p, max_d) for p in payloads]``; raises CodecError if any is malformed.
    Fixed-width payloads of one shape (d, levels, buckets and length) are unpacked together
    in one pass: a chunked allreduce decodes M - 1 small parts a round, where the codec's
    per-call cost is most of the work."""
    heads = [_parse(p, max_d) for p in payloads]
    signed: list[np.ndarray | None] = [None] * len(heads)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, h in enumerate(heads):
        if h.fixed:
            groups.setdefault((h.d, h.levels, h.pad, len(h.body)), []).append(i)
        else:
            signed[i] = _decode_elias(h.body, h.d, h.levels, h.nnz, h.pad)
    for (d, levels, pad, _), idx in groups.items():
        bodies = (heads[idx[0]].body[None] if len(idx) == 1
                  else np.stack([heads[i].body for i in idx]))
        rows = _decode_fixed(bodies, d, levels, pad)
        for i, row in zip(idx, rows, strict=True):
            signed[i] = row
    return [Quantized._trusted(h.d, h.levels, h.bucket_size, h.norms, lv)
            for h, lv in zip(heads, signed, strict=True)]


@dataclass(frozen=True)
class _Head:
    fixed: bool
    pad: int
    d: int
    levels: int
    bucket_size: int
    nnz: int
    norms: np.ndarray
    body: np.ndarray


def _parse(payload: bytes | bytearray | memoryview, max_d: int) -> _Head:
    """A payload's header checked, its norms, and its stream's bytes."""
    buf = memoryview(payload).cast("B")
    if len(buf) < HEADER_BYTES:
        raise CodecError(f"payload of {len(buf)} bytes is shorter than the header")
    magic, version, code, pad, reserved, d, levels, bucket_size, nnz = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError("not a QSGD payload (bad magic)")
    if version != VERSION:
        raise CodecError(f"unsupported QSGD format version {version} (this is {VERSION})")
    if code not in _CODING_NAMES or reserved != 0 or pad > 7:
        raise CodecError("bad coding, pad or reserved byte in header")
    if not 1 <= d <= min(MAX_D, max_d):
        raise CodecError(f"d={d} out of range 1..{min(MAX_D, max_d)}")
    if not 1 <= levels <= MAX_LEVELS:
        raise CodecError(f"levels={levels} out of range")
    if not (bucket_size == 0 or bucket_size < d):
        raise CodecError(f"bucket_size={bucket_size} not in 0..d-1")
    nb = _n_buckets(d, bucket_size)
    if len(buf) < HEADER_BYTES + 4 * nb:
        raise CodecError(f"payload too short for {nb} bucket norms")
    norms = np.frombuffer(buf, dtype="<f4", count=nb, offset=HEADER_BYTES).astype(np.float32)
    if not (np.isfinite(norms).all() and (norms >= 0).all()):
        raise CodecError("a bucket norm is negative, NaN or inf")
    body = np.frombuffer(buf, dtype=np.uint8, offset=HEADER_BYTES + 4 * nb)
    fixed = _CODING_NAMES[code] == "fixed"
    if fixed and nnz != 0:
        raise CodecError("nnz must be 0 in a fixed-width payload")
    return _Head(fixed, pad, d, levels, bucket_size, nnz, norms, body)
