"""QSGD codec speed: encode/decode times against a copy of the same float32 vector.

Run: python benchmarks/codec.py [--repeats N] [--dims 10000,100000,1000000] [--clock cpu|wall]
                                [--aggregate-workers 4,16]

For each d and s it prints median times (ms) of quantize, encode and decode for both
codings, bits per coordinate (payload bytes * 8 / d, header included), and each time as a
ratio to ``v.copy()`` of the float32 gradient, measured in the same run just before.
The input is a Gaussian vector (a mini-batch gradient of the planted ReLU is one too).
Times are this process's CPU time by default (``time.process_time``, nanosecond clock):
on a shared machine the wall clock mostly measures the other processes' load.

Then, for d >= 1e5, the master's ``node.aggregate`` of M payloads (bucket 128, s = 16 Elias
and s = 15 fixed), wall clock: decoded in turn (the baseline) against decoded on one thread
per CPU (``node.PARALLEL_DECODE_MIN_BYTES`` set for each), alternated, same payloads, same
run: the evidence for the thresholds in ``node.PARALLEL_DECODE_MIN_BYTES``.

Then an allreduce worker's scatter coding per round (quantize + encode of its M chunks), CPU
time, at each d in --scatter-dims and M in --scatter-workers: chunk by chunk (the per-call
path, the baseline) against ``node.quantize_chunks`` (one quantize pass), alternated, same
gradient, same run; the bytes are checked equal. ``--json PATH`` stores those rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from worker import node, qsgd

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def bench_one(d: int, s: int, repeats: int, rng: np.random.Generator) -> list[str]:
    v = rng.standard_normal(d)
    v32 = v.astype(np.float32)
    t_copy = median_time(v32.copy, max(repeats, 20))
    t_quant = median_time(lambda: qsgd.quantize(v, s, rng), repeats)
    q = qsgd.quantize(v, s, rng)
    rows = []
    for coding in ("elias", "fixed"):
        payload = qsgd.encode(q, coding)
        assert qsgd.decode(payload) == q
        t_enc = median_time(lambda c=coding: qsgd.encode(q, c), repeats)
        t_dec = median_time(lambda p=payload: qsgd.decode(p), repeats)
        bits = 8 * len(payload) / d
        rows.append(
            f"| {d:>9,} | {s:>5} | {coding:5} | {bits:6.3f} | {t_copy * 1e3:7.3f} "
            f"| {t_quant * 1e3:8.2f} | {t_enc * 1e3:8.2f} | {t_dec * 1e3:8.2f} "
            f"| {t_quant / t_copy:6.1f} | {t_enc / t_copy:6.1f} | {t_dec / t_copy:6.1f} "
            f"| {(t_enc + t_dec) / t_copy:7.1f} |"
        )
    return rows


def bench_aggregate(d: int, m: int, repeats: int) -> list[str]:
    """node.aggregate of m payloads at d: in turn against on threads (wall clock, ms)."""
    rows, threshold_before = [], node.PARALLEL_DECODE_MIN_BYTES
    for levels, coding in ((16, "elias"), (15, "fixed")):
        spec = node.TrialSpec(d=d, n=0, workers=m, scheme="qsgd", levels=levels, coding=coding,
                              bucket_size=128)
        rng = np.random.default_rng(d + m)
        payloads = [node.encode_gradient(rng.standard_normal(d), spec, rng) for _ in range(m)]
        times: dict[str, list[float]] = {"serial": [], "threads": []}
        for _ in range(repeats):  # alternated, so that a busy spell hits both alike
            for label, threshold in (("serial", 1 << 62), ("threads", 0)):
                node.PARALLEL_DECODE_MIN_BYTES = {"elias": threshold, "fixed": threshold}
                t0 = time.perf_counter()
                node.aggregate(payloads, spec)
                times[label].append(time.perf_counter() - t0)
        node.PARALLEL_DECODE_MIN_BYTES = threshold_before
        serial, threaded = (float(np.median(times[k])) for k in ("serial", "threads"))
        _, threads = node._decoder()  # noqa: SLF001 (the thread count, for the table)
        rows.append(f"| {d:>9,} | {m:>3} | {coding:5} | {threads} | {serial * 1e3:8.1f} "
                    f"| {threaded * 1e3:8.1f} | {serial / threaded:5.2f}x |")
    return rows


def _scatter_per_call(g, spec, rng, bounds) -> list[bytes]:
    return [node.encode_gradient(g[lo:hi], node.chunk_spec(spec, lo, hi), rng) if hi > lo
            else b"" for lo, hi in bounds]


def _scatter_one_pass(g, spec, rng, bounds) -> list[bytes]:
    chunks = node.quantize_chunks(g, spec, rng, bounds)
    coded = iter(node.chunk_payloads([c for c in chunks if c is not None], spec))
    return [b"" if c is None else next(coded) for c in chunks]


def _round_per_call(g, spec, m: int, parts, means) -> None:
    """Worker 0's coding in one allreduce round, one codec call per chunk (the baseline):
    encode its M - 1 parts, decode the M - 1 parts of its chunk one by one, average and
    re-quantize, decode the M - 1 other mean chunks one by one."""
    bounds = node.chunk_bounds(spec, m)
    rng = np.random.default_rng(2)
    for lo, hi in bounds[1:]:
        qsgd.encode(qsgd.quantize(g[lo:hi], spec.levels, rng, spec.bucket_size), spec.coding)
    lo, hi = bounds[0]
    total = qsgd.dequantize(qsgd.quantize(g[lo:hi], spec.levels, rng, spec.bucket_size))
    for p in parts:
        total += qsgd.dequantize(qsgd.decode(p))
    qsgd.encode(qsgd.quantize(total / m, spec.levels, rng, spec.bucket_size), spec.coding)
    for p in means:
        qsgd.dequantize(qsgd.decode(p))


def _round_batched(g, spec, m: int, parts, means) -> None:
    """The same round as relufit's worker codes it: one-pass quantize of its chunks, the
    parts it sends encoded together, the parts and the means it receives decoded together."""
    bounds = node.chunk_bounds(spec, m)
    rng = np.random.default_rng(2)
    chunks = node.quantize_chunks(g, spec, rng, bounds)
    node.chunk_payloads(chunks[1:], spec)
    cs = node.chunk_spec(spec, *bounds[0])
    mean = node.aggregate([node.chunk_vector(chunks[0]), *parts], cs)
    node.encode_exact(mean, cs, rng)
    node.assemble([np.zeros(bounds[0][1] - bounds[0][0]), *means], spec)


def bench_round(d: int, workers: str, repeats: int) -> list[dict]:
    """A worker's coding per allreduce round at each M (CPU ms, medians), per call against
    batched, alternated."""
    rows = []
    for m in (int(x) for x in workers.split(",")):
        spec = node.TrialSpec(d=d, n=0, workers=m, scheme="qsgd", levels=15, coding="fixed",
                              bucket_size=128)
        g = np.random.default_rng(m).standard_normal(d)
        bounds = node.chunk_bounds(spec, m)
        payloads = [_scatter_one_pass(g * (1 + r), spec, np.random.default_rng(r), bounds)
                    for r in range(m)]
        parts = [payloads[r][0] for r in range(1, m)]  # worker 0's chunk, from the others
        means = [payloads[0][j] for j in range(1, m)]  # stand-ins of the others' mean chunks
        times: dict[str, list[float]] = {"per_call": [], "batched": []}
        for _ in range(repeats):
            for label, fn in (("per_call", _round_per_call), ("batched", _round_batched)):
                t0 = clock()
                fn(g, spec, m, parts, means)
                times[label].append(clock() - t0)
        per_call, batched = (float(np.median(times[k])) * 1e3 for k in times)
        rows.append({"d": d, "M": m, "setting": "s15b128fixed", "per_call_ms": per_call,
                     "batched_ms": batched, "ratio": per_call / batched})
    return rows


def _assemble_times(g, spec, m: int, repeats: int) -> tuple[float, float]:
    """``node.assemble`` of the M mean chunks (CPU ms, medians): Elias streams walked as
    before (the baseline) against the doubling now used for short ones, alternated."""
    means = _scatter_one_pass(g, spec, np.random.default_rng(3), node.chunk_bounds(spec, m))
    before = qsgd._DOUBLING_MAX_BITS  # noqa: SLF001
    times: dict[int, list[float]] = {0: [], before: []}
    for _ in range(repeats):
        for limit in times:
            qsgd._DOUBLING_MAX_BITS = limit  # noqa: SLF001
            t0 = clock()
            node.assemble(means, spec)
            times[limit].append(clock() - t0)
    qsgd._DOUBLING_MAX_BITS = before  # noqa: SLF001
    return float(np.median(times[0])) * 1e3, float(np.median(times[before])) * 1e3


def bench_scatter(d: int, m: int, repeats: int) -> list[dict]:
    """A worker's scatter coding per round, per call against one pass (CPU ms, medians)."""
    rows = []
    for levels, coding in ((15, "fixed"), (16, "elias")):
        spec = node.TrialSpec(d=d, n=0, workers=m, scheme="qsgd", levels=levels, coding=coding,
                              bucket_size=128)
        g, bounds = np.random.default_rng(d + m).standard_normal(d), node.chunk_bounds(spec, m)
        assert (_scatter_per_call(g, spec, np.random.default_rng(1), bounds)
                == _scatter_one_pass(g, spec, np.random.default_rng(1), bounds))
        times: dict[str, list[float]] = {"per_call": [], "one_pass": []}
        for _ in range(repeats):  # alternated, so that a busy spell hits both alike
            for label, fn in (("per_call", _scatter_per_call), ("one_pass", _scatter_one_pass)):
                rng = np.random.default_rng(2)
                t0 = clock()
                fn(g, spec, rng, bounds)
                times[label].append(clock() - t0)
        per_call, one_pass = (float(np.median(times[k])) * 1e3 for k in times)
        walk, doubling = _assemble_times(g, spec, m, repeats)
        rows.append({"d": d, "M": m, "setting": f"s{levels}b128{coding}",
                     "per_call_ms": per_call, "one_pass_ms": one_pass,
                     "ratio": per_call / one_pass,
                     "assemble_walk_ms": walk, "assemble_ms": doubling})
    return rows


def print_scatter(dims: str, workers: str, repeats: int) -> list[dict]:
    print("\n| d | M | setting | scatter per call ms | one pass ms | ratio "
          "| assemble walk ms | assemble ms |")
    print("|" + "---|" * 8)
    rows = []
    for d in (int(x) for x in dims.split(",")):
        for m in (int(x) for x in workers.split(",")):
            for r in bench_scatter(d, m, repeats):
                rows.append(r)
                print(f"| {r['d']:>9,} | {r['M']:>2} | {r['setting']} | {r['per_call_ms']:7.2f} "
                      f"| {r['one_pass_ms']:7.2f} | {r['ratio']:5.2f}x "
                      f"| {r['assemble_walk_ms']:7.2f} | {r['assemble_ms']:7.2f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dims", default="10000,100000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aggregate-workers", default="4,16", help="M for the aggregate table")
    ap.add_argument("--scatter-dims", default="10000,1000000")
    ap.add_argument("--scatter-workers", default="2,4,8,16", help="M for the scatter table")
    ap.add_argument("--round-dims", default="10000", help="d for the allreduce round table")
    ap.add_argument("--round-workers", default="2,4,8,16,32", help="M for that table")
    ap.add_argument("--json", help="store the scatter and round rows here")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (steady on a shared machine); wall: elapsed",
    )
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    rng = np.random.default_rng(args.seed)
    print(
        "| d | s | coding | bits/coord | copy ms | quantize ms | encode ms | decode ms "
        "| quant/copy | enc/copy | dec/copy | (enc+dec)/copy |"
    )
    print("|" + "---|" * 12)
    for d in (int(x) for x in args.dims.split(",")):
        for s in sorted({1, 4, 16, math.isqrt(d)}):
            for row in bench_one(d, s, args.repeats, rng):
                print(row, flush=True)
    big = [d for d in (int(x) for x in args.dims.split(",")) if d >= 100_000]
    if big:
        print("\n| d | M | coding | threads | in turn ms | on threads ms | speed-up |")
        print("|" + "---|" * 7)
        for d in big:
            for m in (int(x) for x in args.aggregate_workers.split(",")):
                for row in bench_aggregate(d, m, args.repeats):
                    print(row, flush=True)
    out: dict = {"clock": clock.__name__, "repeats": args.repeats}
    if args.scatter_dims:
        out["scatter"] = print_scatter(args.scatter_dims, args.scatter_workers, args.repeats)
    if args.round_dims:
        print("\n| d | M | setting | worker coding per round, per call ms | batched ms "
              "| ratio |")
        print("|" + "---|" * 6)
        out["round"] = []
        for d in (int(x) for x in args.round_dims.split(",")):
            for r in bench_round(d, args.round_workers, args.repeats):
                out["round"].append(r)
                print(f"| {r['d']:>9,} | {r['M']:>2} | {r['setting']} | {r['per_call_ms']:7.2f} "
                      f"| {r['batched_ms']:7.2f} | {r['ratio']:5.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
