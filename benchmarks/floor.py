"""The compute floor of a round: what M workers' own work costs on this machine, no network.

Run: python benchmarks/floor.py [--d 10000] [--n 100000] [--batch 128] [--workers 4]
    [--rounds 300] [--repeats 5] [--setting s15b128fixed] [--json OUT]

M worker processes (fork), each holding its shard exactly as a relufit worker does, meet
at a barrier once per round (one byte to the parent through a pipe and one byte back: the
least a synchronous round can cost); between barriers each does only its own work of the round:

- ``gradient``: draw the mini-batch from the shard and take the gradient (what every
  scheme, MPI's Allreduce included, must do);
- ``+ qsgd encode``: that, plus quantizing and encoding its gradient (the least a worker
  of any QSGD scheme does: a ``ps`` worker; the master's decoding is left out);
- ``+ qsgd, decode 1``: the same, and decoding one payload (a ``broadcast`` replica's
  coding: the master's mean; the master's own decoding and encoding are left out);
- ``+ qsgd, decode M``: the same, decoding the round's M payloads (an ``allgather``
  replica's coding);
- ``allreduce``: an ``allreduce`` member's own work, its node's three phases as an agent runs
  them: the gradient cut into M chunks, quantized and encoded (``scatter``); M - 1 parts of
  its chunk decoded, averaged with its own, quantized once more and encoded (``reduce``);
  M - 1 mean chunks decoded into the step (``gather``). The parts and means it decodes are
  made once, up front, with the round's sizes: no peer's bytes move.

No bytes move and no master runs, so the median round is a lower bound on any scheme's
round on this machine at this size: with more workers than cores, it is the cores, not the
links, that set it. The baseline, in the same run and the same processes: rounds where
rank 0 alone works (the others only answer the barrier). Blocks of every kind are
interleaved, so that a noisy spell of the machine hits them alike; each block's median
drops its first 10 rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

# One BLAS thread per process, as the agents run; set before numpy loads OpenBLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import SETTINGS  # noqa: E402
from worker import node, qsgd, relu  # noqa: E402
from worker.node import TrialSpec, WorkerNode  # noqa: E402

WARMUP = 10


def spec_for(args: argparse.Namespace, setting: str) -> TrialSpec:
    params = {"scheme": "none", "levels": 1, "coding": "elias", "bucket_size": 0}
    params.update(SETTINGS[setting])
    return TrialSpec(trial=0, d=args.d, n=args.n, seed=0, workers=args.workers,
                     batch_size=args.batch, lr=0.0, rounds=args.rounds, target_rel_error=0.0,
                     topology="ps", **params)


MODES = {"gradient": "gradient", "encode": "+ qsgd encode", "broadcast": "+ qsgd, decode 1",
         "allgather": "+ qsgd, decode M", "allreduce": "allreduce: scatter, reduce, gather"}
DECODES = {"gradient": 0, "encode": 0, "broadcast": 1}  # allgather: M
QUIT = 255


def work(rank: int, args: argparse.Namespace, up: int, down: int) -> None:
    """One worker: a relufit ``WorkerNode`` (its shard, generators and encoding), then one
    round per command byte from the parent (``2 * mode + alone``; in an ``alone`` round
    only rank 0 works, the others just answer)."""
    nd = WorkerNode(spec_for(args, args.setting), rank)
    w = relu.planted_weights(args.d, 1) * 0.1
    modes, r = list(MODES), 0
    members, parts, means = allreduce_stand_ins(nd, w)
    os.write(up, b"r")  # shard built
    while (cmd := os.read(down, 1)[0]) != QUIT:
        mode, alone = modes[cmd // 2], cmd % 2
        if rank == 0 or not alone:
            if mode == "gradient":
                nd.gradient(w, r)
            elif mode == "allreduce":
                w0 = nd.w
                nd.scatter(w, r, members)
                nd.reduce(r, members, parts)
                nd.gather(means)
                nd.w = w0  # every round steps from the same weights, as the other modes
            else:
                own = nd.step(w, r).payload  # the gradient, quantized and encoded
                for _ in range(DECODES.get(mode, nd.spec.workers)):
                    node.decode_gradient(own, nd.spec)
            r += 1
        os.write(up, b"r")


def allreduce_stand_ins(nd: WorkerNode, w: np.ndarray) -> tuple[list[int], list, list]:
    """What an ``allreduce`` member receives in a round, at the round's sizes: the M - 1
    other parts of its chunk (PART) and the M - 1 other mean chunks (MEAN), each the bytes
    of a gradient quantized as the real ones are (``None`` in its own place)."""
    spec, rank = nd.spec, nd.rank
    members = list(range(spec.workers))
    bounds = node.chunk_bounds(spec, spec.workers)
    g = nd.gradient(w, 0)
    chunks = node.quantize_chunks(g, spec, np.random.default_rng(1), bounds)
    payloads = node.chunk_payloads(chunks, spec)
    means = [None if m == rank else payloads[m] for m in members]
    # another member's part of our chunk: the same chunk quantized from other draws
    (part,) = node.chunk_payloads(
        [node.quantize_chunks(g, spec, np.random.default_rng(2), bounds)[rank]], spec)
    parts = [None if m == rank else part for m in members]
    return members, parts, means


class Barrier:
    """The parent's side: wait for a byte from every worker, then send each a command."""

    def __init__(self, args: argparse.Namespace):
        self.workers = args.workers
        self.up_r, self.up_w = os.pipe()
        self.downs = [os.pipe() for _ in range(self.workers)]
        ctx = mp.get_context("fork")
        self.procs = [ctx.Process(target=work, args=(r, args, self.up_w, self.downs[r][0]))
                      for r in range(self.workers)]
        for p in self.procs:
            p.start()
        self.wait()

    def wait(self) -> float:
        got = 0
        while got < self.workers:
            chunk = os.read(self.up_r, self.workers - got)
            if not chunk:
                raise RuntimeError("a worker process died")
            got += len(chunk)
        return time.perf_counter()

    def send(self, cmd: int) -> None:
        for _, wr in self.downs:
            os.write(wr, bytes([cmd]))

    def block(self, cmd: int, rounds: int) -> float:
        """Median round (s) over ``rounds`` rounds of ``cmd``, the first WARMUP dropped."""
        ends = [time.perf_counter()]
        for _ in range(rounds):
            self.send(cmd)
            ends.append(self.wait())
        return float(np.median(np.diff(ends)[WARMUP:]))

    def close(self) -> None:
        self.send(QUIT)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for fd in (self.up_r, self.up_w, *[f for pair in self.downs for f in pair]):
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=128, help="per worker")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=300, help="per block")
    p.add_argument("--repeats", type=int, default=5, help="blocks of every kind, interleaved")
    p.add_argument("--setting", default="s15b128fixed", choices=sorted(SETTINGS))
    p.add_argument("--json", type=Path, help="also write the medians (s) here, per kind of work")
    args = p.parse_args()
    print(f"d = {args.d}, n = {args.n}, batch {args.batch} per worker, {args.workers} workers, "
          f"{os.cpu_count()} CPUs; ms per round: median over {args.repeats} interleaved blocks "
          f"of {args.rounds} rounds (each block's median; range in brackets)")
    bar = Barrier(args)
    got: dict[int, list[float]] = {}
    try:
        for _ in range(args.repeats):
            for cmd in range(2 * len(MODES)):
                got.setdefault(cmd, []).append(bar.block(cmd, args.rounds))
    finally:
        bar.close()

    def cell(v: list[float]) -> str:
        return f"{np.median(v) * 1e3:.2f} [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]"

    print(f"| work per worker | rank 0 alone | all {args.workers}, barrier per round | ratio |")
    print("|---|---|---|---|")
    for i, label in enumerate(MODES.values()):
        alone, everyone = got[2 * i + 1], got[2 * i]
        print(f"| {label} | {cell(alone)} | {cell(everyone)} | "
              f"{np.median(everyone) / np.median(alone):.2f}x |")
    bits = 8 * qsgd.fixed_payload_bytes(args.d, SETTINGS[args.setting]["levels"],
                                        SETTINGS[args.setting]["bucket_size"]) / args.d
    print(f"(qsgd: {args.setting}, {bits:.2f} bits per coordinate on the wire)")
    if args.json:
        args.json.write_text(json.dumps({
            "d": args.d, "n": args.n, "batch": args.batch, "workers": args.workers,
            "setting": args.setting, "cpus": os.cpu_count(),
            "alone_s": {m: float(np.median(got[2 * i + 1])) for i, m in enumerate(MODES)},
            "all_s": {m: float(np.median(got[2 * i])) for i, m in enumerate(MODES)},
        }, indent=1))


if __name__ == "__main__":
    main()
