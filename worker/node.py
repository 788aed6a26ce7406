"""One worker's share of a trial, with no I/O: the same code serves ``sim`` and every agent.

A ``TrialSpec`` says everything a worker needs (it crosses the wire as JSON and is
validated here, since it may come from the network). A ``WorkerNode`` holds the
worker's shard and generators and turns weights into an encoded gradient. The
aggregation (decode, average in rank order) lives here too, because in the
``allgather`` topology every worker applies it to its own replica and must get the
bit-identical result the master gets. ``encode_exact`` returns the bytes and the vector
that anyone decodes from them (the codec is exact), so whoever sent a payload never
decodes it: in ``broadcast`` the master steps with its mean's vector, and in ``allgather``
a worker adds its own gradient's vector to the ones it decodes from the others.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from worker import qsgd, relu

SCHEMES = ("none", "qsgd")
CODINGS = ("elias", "fixed")
TOPOLOGIES = ("ps", "allgather", "broadcast", "allreduce")
MAX_D = 1 << 28


class SpecError(ValueError):
    """A trial spec that cannot be run (bad value, or a malformed one from the wire)."""


@dataclass(frozen=True)
class TrialSpec:
    """What one trial computes; identical on the master and on every worker."""

    trial: int = 0
    d: int = 100
    n: int = 4000
    seed: int = 0
    rounds: int = 300
    batch_size: int = 32
    lr: float = 0.5
    target_rel_error: float = 1e-6
    scheme: str = "qsgd"
    levels: int = 4
    coding: str = "elias"
    bucket_size: int = 0
    workers: int = 4
    topology: str = "ps"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> TrialSpec:
        """Build and validate a spec from untrusted JSON; raises SpecError."""
        if not isinstance(raw, dict):
            raise SpecError("trial spec must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise SpecError(f"unknown trial spec keys: {', '.join(unknown)}")
        values = {}
        for name, f in known.items():
            if name not in raw:
                continue
            v = raw[name]
            want = {"int": int, "float": float, "str": str}[f.type]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or isinstance(v, bool):
                raise SpecError(f"trial spec {name} must be {f.type}, got {v!r}")
            values[name] = v
        spec = cls(**values)
        spec.validate()
        return spec

    def validate(self) -> None:
        checks = [
            (1 <= self.d <= MAX_D, "d", f"must be in 1..{MAX_D}"),
            (self.n >= 0, "n", "must be >= 0 (0: fresh samples every round)"),
            (self.rounds >= 1, "rounds", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (np.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number"),
            (self.target_rel_error >= 0, "target_rel_error", "must be >= 0 (0: never stop early)"),
            (self.scheme in SCHEMES, "scheme", f"must be one of {SCHEMES}"),
            (self.levels >= 1, "levels", "must be >= 1"),
            (self.coding in CODINGS, "coding", f"must be one of {CODINGS}"),
            (self.bucket_size >= 0, "bucket_size", "must be >= 0 (0: one bucket)"),
            (self.workers >= 1, "workers", "must be >= 1"),
            (self.topology in TOPOLOGIES, "topology", f"must be one of {TOPOLOGIES}"),
            (self.n == 0 or self.n >= self.workers, "n", "must be 0 or at least the worker count"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SpecError(f"{name} {why}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------- payloads


def encode_weights(w: np.ndarray) -> bytes:
    """Weights go down as little-endian float32."""
    return np.asarray(w, dtype="<f4").tobytes()


def decode_weights(payload: bytes | memoryview, d: int) -> np.ndarray:
    if len(payload) != 4 * d:
        raise SpecError(f"weights payload has {len(payload)} bytes, expected {4 * d}")
    return np.frombuffer(payload, dtype="<f4").astype(np.float64)


def encode_weights64(w: np.ndarray) -> bytes:
    """The master's weights exactly (little-endian float64): how replicas are re-synced."""
    return np.asarray(w, dtype="<f8").tobytes()


def decode_weights64(payload: bytes | memoryview, d: int) -> np.ndarray:
    if len(payload) != 8 * d:
        raise SpecError(f"float64 weights payload has {len(payload)} bytes, expected {8 * d}")
    return np.frombuffer(payload, dtype="<f8").copy()


def encode_gradient(g: np.ndarray, spec: TrialSpec, rng: np.random.Generator) -> bytes:
    """float32 for scheme 'none'; QSGD's self-describing payload for 'qsgd'."""
    if spec.scheme == "none":
        return np.asarray(g, dtype="<f4").tobytes()
    return qsgd.encode(_quantize(g, spec, rng), coding=spec.coding)


def encode_exact(g: np.ndarray, spec: TrialSpec,
                 rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """``encode_gradient``'s bytes, and the vector ``decode_gradient`` gives back from them
    (the codec is exact), so the sender need not decode its own bytes."""
    if spec.scheme == "none":
        g32 = np.asarray(g, dtype="<f4")
        return g32.tobytes(), g32.astype(np.float64)
    q = _quantize(g, spec, rng)
    return qsgd.encode(q, coding=spec.coding), qsgd.dequantize(q)


def quantize_chunks(g: np.ndarray, spec: TrialSpec, rng: np.random.Generator,
                    bounds: Sequence[tuple[int, int]]) -> list[qsgd.Quantized | np.ndarray | None]:
    """Each chunk of ``g`` as ``encode_gradient`` would quantize it with ``chunk_spec`` (same
    draws, in chunk order), in one pass: float32 vectors for 'none'; None for an empty chunk."""
    if spec.scheme == "none":
        return [np.asarray(g[lo:hi], dtype="<f4") if hi > lo else None for lo, hi in bounds]
    return qsgd.quantize_chunks(g, spec.levels, rng, list(bounds), spec.bucket_size)


def chunk_payloads(cs: Sequence[qsgd.Quantized | np.ndarray],
                   spec: TrialSpec) -> list[bytes]:
    """The wire bytes of some of ``quantize_chunks``' chunks, encoded together
    (``qsgd.encode_many``: one pass per chunk shape)."""
    if spec.scheme == "none":
        return [c.tobytes() for c in cs]
    return qsgd.encode_many(cs, coding=spec.coding)


def chunk_vector(c: qsgd.Quantized | np.ndarray) -> np.ndarray:
    """The vector a receiver decodes from ``chunk_payloads``' bytes of ``c`` (the codec is
    exact)."""
    return c.astype(np.float64) if isinstance(c, np.ndarray) else qsgd.dequantize(c)


def _quantize(g: np.ndarray, spec: TrialSpec, rng: np.random.Generator) -> qsgd.Quantized:
    return qsgd.quantize(g, spec.levels, rng, bucket_size=spec.bucket_size or None)


def decode_gradient(payload: bytes | memoryview, spec: TrialSpec) -> np.ndarray:
    """Raises ValueError (qsgd.CodecError or SpecError) on a payload that does not fit."""
    return decode_gradients([payload], [spec])[0]


def decode_gradients(payloads: Sequence[bytes | memoryview],
                     specs: Sequence[TrialSpec]) -> list[np.ndarray]:
    """``decode_gradient`` of each payload with its spec (all of one trial; an allreduce's
    chunks differ in d), the QSGD ones decoded together (``qsgd.decode_many``: one pass
    for a round's small fixed-width parts). Keep the batch small: its vectors are all
    in memory at once."""
    if not payloads or specs[0].scheme == "none":
        return [decode_weights(p, s.d) for p, s in zip(payloads, specs, strict=True)]
    # a hostile header cannot make us allocate more than the largest d we expect
    qs = qsgd.decode_many(payloads, max_d=max(s.d for s in specs))
    for q, s in zip(qs, specs, strict=True):
        if q.d != s.d or q.levels != s.levels:
            raise SpecError(f"gradient payload is for d={q.d}, s={q.levels}; "
                            f"trial has d={s.d}, s={s.levels}")
    return [qsgd.dequantize(q) for q in qs]


# From payloads of this size on, decoding the M payloads of a round on one thread per CPU
# pays (benchmarks/codec.py, 2 CPUs; a decode's cost follows its stream's length): Elias
# at d = 1e6, bucket 128 (~440 kB, ~74 ms a payload, numpy releasing the GIL for most of
# it) 1.77x, at d = 1e5 (~44 kB) 1.08x, unbucketed at d = 1e6 (~22 kB, ~1.5 ms) no gain;
# fixed at d = 1e6 (~660 kB) 1.08-1.10x, at d = 1e5 (~66 kB) slower, 0.62-0.79x.
# float32 is never threaded.
PARALLEL_DECODE_MIN_BYTES = {"elias": 100_000, "fixed": 500_000}


# Up to this d, a round's payloads are decoded together (their vectors all in memory at
# once); beyond it one at a time, where the per-call cost is a small part anyway.
BATCH_DECODE_MAX_D = qsgd.ONE_PASS_MAX_D


@functools.cache
def _decoder() -> tuple[ThreadPoolExecutor | None, int]:
    """The process's decoding threads and their number, one per CPU it may run on (no
    threads on one CPU); made on first use."""
    cpus = usable_cpus()
    return (ThreadPoolExecutor(cpus, thread_name_prefix="relufit-decode") if cpus > 1 else None,
            cpus)


if hasattr(os, "register_at_fork"):  # a forked child has none of our threads: it makes its own
    os.register_at_fork(after_in_child=_decoder.cache_clear)


def aggregate(payloads: list[bytes | memoryview | np.ndarray], spec: TrialSpec) -> np.ndarray:
    """Mean of the decoded gradients, summed in the order given (rank order). An entry may
    be a vector already decoded (``encode_exact``'s): it adds exactly as its bytes would.

    Large QSGD payloads (``PARALLEL_DECODE_MIN_BYTES``) are decoded on threads, as many
    at once as there are threads (so memory stays at that many vectors), and still added
    in order: the result is bit for bit the serial one."""
    pool, step = None, 1
    if spec.scheme == "qsgd":
        coded = [memoryview(p).nbytes for p in payloads if not isinstance(p, np.ndarray)]
        if len(coded) > 1 and max(coded) >= PARALLEL_DECODE_MIN_BYTES[spec.coding]:
            pool, step = _decoder()

    def vector(p: bytes | memoryview | np.ndarray) -> np.ndarray:
        return p if isinstance(p, np.ndarray) else decode_gradient(p, spec)

    total = np.zeros(spec.d)
    if pool is None and spec.d <= BATCH_DECODE_MAX_D:  # small: decode all in one pass
        coded = [p for p in payloads if not isinstance(p, np.ndarray)]
        it = iter(decode_gradients(coded, [spec] * len(coded)))
        for p in payloads:
            total += p if isinstance(p, np.ndarray) else next(it)
        return total / len(payloads)
    for i in range(0, len(payloads), step):
        chunk = payloads[i : i + step]
        for v in (pool.map(vector, chunk) if pool and len(chunk) > 1 else map(vector, chunk)):
            total += v
    return total / len(payloads)


# ---------------------------------------------------------------- allreduce


def chunk_bounds(spec: TrialSpec, members: int) -> list[tuple[int, int]]:
    """``allreduce``: the contiguous coordinate range ``[lo, hi)`` of each of ``members``
    chunks. With QSGD buckets (``0 < bucket_size < d``) the cuts fall on bucket boundaries,
    so quantizing chunk by chunk is quantizing the whole vector bucket by bucket; otherwise
    (float32, or one bucket) the cuts are even and each chunk is its own bucket. A chunk is
    empty when there are fewer buckets than members."""
    b = spec.bucket_size if spec.scheme == "qsgd" and 0 < spec.bucket_size < spec.d else 1
    units = -(-spec.d // b)
    cuts = [min(spec.d, (j * units // members) * b) for j in range(members + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@functools.lru_cache(maxsize=256)
def chunk_spec(spec: TrialSpec, lo: int, hi: int) -> TrialSpec:
    """The spec a chunk's payloads are encoded and checked with: the trial's, at d = hi - lo
    (kept: the master and every replica ask for the same few each round, and ``replace``
    validates the spec anew, ~30 us)."""
    return replace(spec, d=hi - lo)


def assemble(means: Sequence[bytes | memoryview | np.ndarray], spec: TrialSpec) -> np.ndarray:
    """``allreduce``: the round's mean gradient from its mean chunks, one per member in rank
    order (b"" for an empty chunk; a vector where it is already decoded). Raises ValueError on
    a payload that does not fit its chunk."""
    g = np.empty(spec.d)
    coded: list[tuple[int, int, bytes | memoryview]] = []
    for (lo, hi), p in zip(chunk_bounds(spec, len(means)), means, strict=True):
        if hi == lo:
            if len(p):
                raise SpecError("a payload for an empty chunk")
        elif isinstance(p, np.ndarray):
            g[lo:hi] = p
        else:
            coded.append((lo, hi, p))
    # the chunks add up to one d-vector: decode them together (one pass per chunk shape)
    vecs = decode_gradients([p for _, _, p in coded],
                            [chunk_spec(spec, lo, hi) for lo, hi, _ in coded])
    for (lo, hi, _), v in zip(coded, vecs, strict=True):
        g[lo:hi] = v
    return g


# ---------------------------------------------------------------- the worker


def check_states(states: Any) -> dict[str, dict[str, Any]]:
    """A worker's generator states (``WorkerNode.generator_states``) from a checkpoint or
    the wire, checked and rebuilt from what was checked. Raises SpecError."""
    if not isinstance(states, dict) or set(states) != {"batch", "quant"}:
        raise SpecError("generator states must be an object with 'batch' and 'quant'")
    return {name: _pcg64_state(states[name], name) for name in ("batch", "quant")}


def _pcg64_state(st: Any, name: str) -> dict[str, Any]:
    """One PCG64 state: two unsigned 128-bit integers and the cached 32-bit half."""
    inner = st.get("state") if isinstance(st, dict) else None

    def u(v: Any, bits: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << bits

    if not (isinstance(inner, dict) and st.get("bit_generator") == "PCG64"
            and u(inner.get("state"), 128) and u(inner.get("inc"), 128)
            and st.get("has_uint32") in (0, 1) and u(st.get("uinteger"), 32)):
        raise SpecError(f"generator state {name!r} is not a PCG64 state")
    return {"bit_generator": "PCG64", "state": {"state": inner["state"], "inc": inner["inc"]},
            "has_uint32": st["has_uint32"], "uinteger": st["uinteger"]}


@dataclass
class StepResult:
    payload: bytes
    compute_s: float
    encode_s: float


# Online batches of this many samples x coordinates are drawn a round ahead when the node
# is asked to (``WorkerNode(draw_ahead=True)``): at d = 1e6, batch 16 a draw is ~190 ms
# alone; below ~1 ms it is not worth a thread, and above 256 MB a second batch in memory is
# not worth the round it saves.
DRAW_AHEAD_MIN, DRAW_AHEAD_MAX = 1 << 20, 1 << 25


def _lower_priority() -> None:
    """The drawing thread yields to the round's own work: nice 10 for this thread (Linux:
    a thread's id is a PRIO_PROCESS target); where that is not possible, it runs as is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


# "batch": the agent runs its threads under Linux's SCHED_BATCH (``batch_scheduling``); the
# local backend sets it when its agents and master outnumber the cores. Else the default.
SCHED_ENV = "RELUFIT_AGENT_SCHED"


def batch_scheduling() -> bool:
    """Put every thread of this process (a BLAS library's among them) under SCHED_BATCH,
    and so every thread they start after (ZeroMQ's, the compute thread); True when it took.

    Under the default policy a thread that wakes another (a send waking ZeroMQ's I/O
    thread, a frame waking the socket loop) is often preempted by it at once, so with more
    processes than cores a round's dozens of messages cost a context switch each. A batch
    thread is never preempted on wake-up; it runs on as before, and an idle core still
    takes the woken thread at once. Measured on 2 cores, d = 1e4 on ``local``
    (benchmarks/sched.py): with 8 ``allreduce`` agents a round 0.82-0.92x as long and
    0.82-0.93x the CPU, with 4 agents 0.89x; but with 1 agent and cores to spare 1.07-1.08x,
    and on the 10 Mbit/s netns cluster within the runs' spread. So only where processes
    outnumber cores (``SCHED_ENV``). Nothing changes but when threads run."""
    if os.environ.get(SCHED_ENV) != "batch" or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread, and what it starts, is what we can reach
        tids = [0]
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except ProcessLookupError:  # a thread that has just ended
            continue
        except OSError:  # a sandbox that forbids it: the default policy works, only slower
            return False
    return True


class WorkerNode:
    """A worker's shard, generators and (for allgather) its replica of the weights."""

    def __init__(self, spec: TrialSpec, rank: int, draw_ahead: bool = False):
        """``draw_ahead``: with online data (n = 0) of ``DRAW_AHEAD_MIN`` to ``DRAW_AHEAD_MAX``
        samples x coordinates a round, draw round r + 1's batch on a thread of its own, at a
        lower priority, while round r computes, codes and waits for the network (an agent's
        choice: its process has idle CPU then; sim's one process has none)."""
        if not 0 <= rank < spec.workers:
            raise SpecError(f"rank {rank} out of range for {spec.workers} workers")
        self.spec, self.rank = spec, rank
        self.drawer: ThreadPoolExecutor | None = None
        if draw_ahead and spec.n == 0 and (
                DRAW_AHEAD_MIN <= spec.d * spec.batch_size <= DRAW_AHEAD_MAX):
            self.drawer = ThreadPoolExecutor(1, "relufit-draw", initializer=_lower_priority)
        self.ahead: tuple[int, Future] | None = None  # (round, its batch being drawn)
        self.w_star = relu.planted_weights(spec.d, spec.seed)
        self.batch_rng = relu.batch_rng(spec.seed, rank)
        self.quant_rng = relu.quant_rng(spec.seed, rank)
        if spec.n > 0:
            self.X, self.y = relu.shard(spec.d, spec.n, spec.seed, rank, spec.workers)
            self.batch = np.empty((spec.batch_size, spec.d))  # each round's rows, in place
        self.w = np.zeros(spec.d)  # replica, used by the allgather and broadcast topologies
        self.own: np.ndarray | None = None  # allgather: the vector of our last payload
        # allreduce: the vectors of our own chunk of this round's gradient and of its mean
        self.own_part: np.ndarray | None = None
        self.own_mean: np.ndarray | None = None

    def online_batch(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """Round ``round_``'s online batch: drawn ahead when it was (the same samples: a
        batch is keyed by the round, not by a generator's state), and the next one set
        drawing."""
        s = self.spec

        def draw(r: int) -> tuple[np.ndarray, np.ndarray]:
            return relu.online_batch(s.d, s.seed, self.rank, r, s.batch_size, self.w_star)

        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == round_:
            batch = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            batch = draw(round_)
        if self.drawer is not None and round_ + 1 < s.rounds:
            self.ahead = (round_ + 1, self.drawer.submit(draw, round_ + 1))
        return batch

    def close(self) -> None:
        """Stop drawing ahead (a batch being drawn is dropped)."""
        if self.drawer is not None:
            self.drawer.shutdown(wait=False, cancel_futures=True)
            self.drawer, self.ahead = None, None

    def generator_states(self) -> dict[str, Any]:
        """What a checkpoint keeps of this worker: its generators' states (JSON-ready).
        Everything else a worker holds is rebuilt from the spec or sent by the master."""
        return {"batch": self.batch_rng.bit_generator.state,
                "quant": self.quant_rng.bit_generator.state}

    def restore(self, states: Any, replica: np.ndarray | None = None,
                own: bytes | memoryview | None = None) -> None:
        """Take up a trial from a checkpoint: ``states`` as ``generator_states`` gave them,
        the replica's weights (not for ps), and for allgather the payload we sent last
        round, whose vector the next round's update needs. Raises SpecError on anything that
        does not fit (it may come from the network)."""
        states = check_states(states)
        self.batch_rng.bit_generator.state = states["batch"]
        self.quant_rng.bit_generator.state = states["quant"]
        if replica is not None:
            if replica.shape != (self.spec.d,):
                raise SpecError(f"replica of {replica.size} weights for d={self.spec.d}")
            self.w = replica.copy()
        if own is not None:
            self.own = decode_gradient(own, self.spec)

    def gradient(self, w: np.ndarray, round_: int) -> np.ndarray:
        s = self.spec
        if s.n == 0:
            Xb, yb = self.online_batch(round_)
        else:
            Xb, yb = relu.minibatch(self.X, self.y, s.batch_size, self.batch_rng, self.batch)
        return relu.gradient(w, Xb, yb)

    def step(self, w: np.ndarray, round_: int) -> StepResult:
        """Mini-batch gradient at ``w``, encoded for the wire, with its timings."""
        t0 = time.perf_counter()
        g = self.gradient(w, round_)
        t1 = time.perf_counter()
        if self.spec.topology == "allgather":  # our own payload comes back next round
            payload, self.own = encode_exact(g, self.spec, self.quant_rng)
        else:
            payload = encode_gradient(g, self.spec, self.quant_rng)
        return StepResult(payload, t1 - t0, time.perf_counter() - t1)

    def apply(self, payloads: list[bytes | memoryview | None]) -> None:
        """allgather: apply the round's gradients, in rank order, to the replica, as the master
        does. ``None`` stands for our own last gradient, whose vector we kept: one decode less."""
        if not payloads:
            return
        if self.own is None and any(p is None for p in payloads):
            raise SpecError("asked to apply our own gradient before we sent one")
        vecs = [self.own if p is None else p for p in payloads]
        self.w = self.w - self.spec.lr * aggregate(vecs, self.spec)

    def apply_update(self, payload: bytes | memoryview) -> None:
        """broadcast: take the step the master took, from its encoded mean (b"": none yet).
        The master steps with the vector ``encode_exact`` returned for these bytes."""
        if len(payload):
            self.w = self.w - self.spec.lr * decode_gradient(payload, self.spec)

    def scatter(self, w: np.ndarray, round_: int,
                members: Sequence[int]) -> tuple[list[bytes], StepResult]:
        """allreduce, phase 1: the mini-batch gradient at ``w``, cut into one chunk per member
        (``chunk_bounds``), quantized in one pass (``quantize_chunks``: chunk order, our own
        generator) and encoded; part j goes to ``members[j]`` (b"" for an empty chunk). We
        keep our own part's vector instead of its bytes (b"" in its place), so we never
        encode or decode it (nor, when our chunk is empty, wait for a mean of ours). The parts
        we send are encoded together (``chunk_payloads``). The StepResult's payload is unused
        (b"")."""
        t0 = time.perf_counter()
        g = self.gradient(w, round_)
        t1 = time.perf_counter()
        bounds = chunk_bounds(self.spec, len(members))
        parts: list[bytes] = [b""] * len(members)
        sent: list[int] = []  # the chunks we encode: not empty, not ours
        chunks = quantize_chunks(g, self.spec, self.quant_rng, bounds)
        for j, (c, owner) in enumerate(zip(chunks, members, strict=True)):
            if c is None:
                if owner == self.rank:  # nothing to reduce: our mean chunk is empty
                    self.own_mean = np.empty(0)
            elif owner == self.rank:  # kept as a vector, never encoded: nobody receives it
                self.own_part = chunk_vector(c)
            else:
                sent.append(j)
        for j, payload in zip(sent, chunk_payloads([chunks[j] for j in sent], self.spec),
                              strict=True):
            parts[j] = payload
        return parts, StepResult(b"", t1 - t0, time.perf_counter() - t1)

    def reduce(self, round_: int, members: Sequence[int],
               parts: Sequence[bytes | memoryview | None]) -> bytes:
        """allreduce, phase 2: the mean of our chunk over every member's part (rank order;
        ``None`` for our own), quantized once more from ``relu.mean_quant_rng(seed, round,
        chunk)`` and encoded; b"" when our chunk is empty. We keep the mean's vector."""
        j = list(members).index(self.rank)
        lo, hi = chunk_bounds(self.spec, len(members))[j]
        if hi == lo:
            self.own_mean = np.empty(0)
            return b""
        if self.own_part is None:
            raise SpecError("asked to reduce a chunk before scattering our gradient")
        cs = chunk_spec(self.spec, lo, hi)
        mean = aggregate([self.own_part if p is None else p for p in parts], cs)
        payload, self.own_mean = encode_exact(mean, cs,
                                              relu.mean_quant_rng(self.spec.seed, round_, j))
        return payload

    def gather(self, means: Sequence[bytes | memoryview | None]) -> None:
        """allreduce, phase 3: step the replica with the round's mean gradient, rebuilt from
        every member's mean chunk (rank order; ``None`` for our own), as the master does."""
        if not means:
            return
        if self.own_mean is None and any(p is None for p in means):
            raise SpecError("asked to apply our own mean chunk before we made one")
        g = assemble([self.own_mean if p is None else p for p in means], self.spec)
        self.w = self.w - self.spec.lr * g

    def weights_for_round(self, down: bytes | memoryview | None,
                          relayed: list[bytes | memoryview | None]) -> np.ndarray:
        """Where this round's gradient is taken: the master's float32 weights (ps), or the
        replica after the master's encoded mean (broadcast), last round's gradients in rank
        order (allgather; ``None`` in our own rank's place) or last round's mean chunks
        (allreduce, likewise). In allreduce, ``down`` is the master's float64 weights when
        the chunks were re-planned after a lost worker: the replica takes them as they are."""
        topology = self.spec.topology
        if topology == "ps":
            return decode_weights(down, self.spec.d)
        if topology == "broadcast":
            self.apply_update(down)
        elif topology == "allgather":
            self.apply(relayed)
        elif down is not None:
            self.w = decode_weights64(down, self.spec.d)
        else:
            self.gather(relayed)
        return self.w
