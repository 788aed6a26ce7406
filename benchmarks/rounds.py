"""Round engine speed: rounds/s and the per-round time split of the local backend, beside a
transport floor measured in the same run.

Run: python benchmarks/rounds.py [--workers 1,2,4,8] [--dims 1000,100000,1000000]
                                 [--rounds-scale 1.0]

For every M (workers), d, coding (fp32, QSGD s=16 elias) and topology (ps, allgather, broadcast) it
runs one trial on ``--backend local`` (real agent processes on 127.0.0.1) and prints the
medians over rounds (the first two are dropped as warm-up) of: the round time, the
workers' compute and encode (slowest worker), network wait, the master's decode and
update, and the bytes per round.

The transport floor is a ZeroMQ exchange of the same byte counts (per worker: the round's
median bytes down, then its median bytes up) between one ROUTER in this process and M
echo processes that do no compute. ``ratio`` = round / (floor + compute + encode).
Target: at d=1e6, M=4, fp32 ps, ratio <= 1.5.

Data: n = M * batch_size (batch 8: each worker holds 8 rows, so d=1e6 fits in memory);
lr is tiny so no trial diverges (the speed of a round does not depend on lr).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import zmq

from orchestrator.config import from_dict
from orchestrator.providers import open_pool
from orchestrator.trial import RoundRow, run_trial

CODINGS = {"fp32": {"scheme": "none"},
           "qsgd16": {"scheme": "qsgd", "levels": 16, "coding": "elias"}}
TOPOLOGIES = ("ps", "allgather", "broadcast")
BATCH = 8
WARMUP = 2


def rounds_for(d: int, m: int, scale: float) -> int:
    base = 40 if d <= 1000 else 15 if d <= 100_000 else 8
    return max(WARMUP + 3, int(base * scale / (2 if m >= 8 and d >= 1_000_000 else 1)))


def measure(m: int, d: int, scale: float) -> list[dict]:
    """One local pool for the M agents, one trial per coding x topology."""
    rounds = rounds_for(d, m, scale)
    data = {
        "problem": {"d": d, "n": m * BATCH, "seed": 0},
        "train": {"rounds": rounds, "batch_size": BATCH, "lr": 1e-6, "target_rel_error": 0},
        "cluster": {"workers": m, "heartbeat_interval": 1.0, "connect_timeout": 60},
        "sweep": {"compress": list(CODINGS.values()), "cluster.topology": list(TOPOLOGIES)},
    }
    exp = from_dict(data, "bench")
    names = {tuple(sorted(v.items())): k for k, v in CODINGS.items()}
    out = []
    with open_pool("local", exp) as pool:
        for trial in exp.trials():
            rows: list[RoundRow] = []
            run_trial(trial.spec, pool, rows.append)
            rows = rows[WARMUP:]
            ela = np.diff([r.elapsed_s for r in rows]) if len(rows) > 1 else [rows[0].elapsed_s]

            def med(key: str, rows: list[RoundRow] = rows) -> float:
                return float(np.median([getattr(r, key) for r in rows]))

            coding = names[tuple(sorted(trial.params["compress"].items()))]
            out.append({
                "M": m, "d": d, "coding": coding, "topology": trial.spec.topology,
                "round": float(np.median(ela)), "compute": med("t_compute"),
                "encode": med("t_encode"), "network": med("t_network"),
                "decode": med("t_decode"), "update": med("t_update"),
                "up": int(np.median([r.bytes_up for r in rows])) // m,
                "down": int(np.median([r.bytes_down for r in rows])) // m,
            })
    return out


# ---------------------------------------------------------------- transport floor

ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1]); s.send(b"hi")
cache = {}
while True:
    frames = s.recv_multipart(copy=False)
    size = int(frames[0].bytes)
    if size < 0:
        break
    buf = cache.setdefault(size, bytes(size))
    s.send_multipart([b"h" * 160, buf], copy=size < 65536)
s.close(); ctx.term()
"""


class Floor:
    """M echo processes doing no compute, and a ROUTER that exchanges fixed byte counts."""

    def __init__(self, m: int):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.procs = [subprocess.Popen([sys.executable, "-c", ECHO, f"tcp://127.0.0.1:{port}"])
                      for _ in range(m)]
        self.peers = [self.sock.recv_multipart()[0] for _ in range(m)]

    def exchange(self, down: int, up: int, rounds: int) -> float:
        payload = bytes(max(0, down - 96))
        times = []
        for _ in range(rounds + WARMUP):
            t0 = time.perf_counter()
            for p in self.peers:
                self.sock.send_multipart([p, str(up - 160).encode(), payload],
                                         copy=len(payload) < 65536)
            for _ in self.peers:
                self.sock.recv_multipart(copy=False)
            times.append(time.perf_counter() - t0)
        return float(np.median(times[WARMUP:]))

    def close(self) -> None:
        for p in self.peers:
            self.sock.send_multipart([p, b"-1"])
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.sock.close(linger=0)
        self.ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--dims", default="1000,100000,1000000")
    ap.add_argument("--rounds-scale", type=float, default=1.0)
    args = ap.parse_args()
    ms = [int(x) for x in args.workers.split(",")]
    ds = [int(float(x)) for x in args.dims.split(",")]
    head = (f"{'M':>2} {'d':>8} {'coding':>7} {'topo':>9} {'rounds/s':>8} {'round':>8} "
            f"{'compute':>8} {'encode':>7} {'network':>8} {'decode':>7} {'update':>7} "
            f"{'KB up/w':>8} {'KB dn/w':>8} {'floor':>7} {'ratio':>5}")
    print("times in ms (medians over rounds); KB per worker per round")
    print(head)
    t_start = time.monotonic()
    for m in ms:
        floor = Floor(m)
        try:
            for d in ds:
                for r in measure(m, d, args.rounds_scale):
                    r["floor"] = floor.exchange(r["down"], r["up"], rounds_for(d, m, 1.0))
                    busy = r["floor"] + r["compute"] + r["encode"]
                    r["ratio"] = r["round"] / busy
                    print(f"{m:>2} {d:>8.0e} {r['coding']:>7} {r['topology']:>9} "
                          f"{1 / r['round']:>8.1f} {1e3 * r['round']:>8.2f} "
                          f"{1e3 * r['compute']:>8.2f} {1e3 * r['encode']:>7.2f} "
                          f"{1e3 * r['network']:>8.2f} {1e3 * r['decode']:>7.2f} "
                          f"{1e3 * r['update']:>7.2f} {r['up'] / 1e3:>8.1f} "
                          f"{r['down'] / 1e3:>8.1f} {1e3 * r['floor']:>7.2f} "
                          f"{r['ratio']:>5.2f}", flush=True)
        finally:
            floor.close()
    print(f"total {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
