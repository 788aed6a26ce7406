"""One rank of the MPI float32 baseline (started by benchmarks/mpi_baseline.py under mpirun).

Float32 mini-batch SGD on relufit's planted ReLU problem, written as a user of the paper's
era would: every rank holds a replica of w (float64), computes its mini-batch gradient
exactly as ``worker.node.WorkerNode.gradient`` does (same shard, batch generator and online
batches for this rank), and the float32 gradients are summed with ``Allreduce``; every rank
divides by the number of ranks and takes the same step. All replicas are equal, so each
rank evaluates the stopping rule (rel_error <= target) itself, with no extra message.

Per round each rank records its compute time (the gradient), its Allreduce time, the end of
the round and its eth0 transmit counter (/proc/net/dev of its own network namespace). At the
end each rank writes them, as JSON, to ``--out``.<rank> (the hosts share the file system;
nothing is pickled), with the inode of its network namespace so that the launcher can check
that rank r really ran in worker host r + 1's namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from mpi4py import MPI

from worker import relu


def tx_bytes(iface: str = "eth0") -> int:
    """Bytes sent so far by ``iface`` of this process's network namespace (0 if absent)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                return int(rest.split()[8])  # rx: 8 fields, then tx bytes
    return 0


def allreduce(comm: MPI.Comm, buf: np.ndarray, wait: str) -> None:
    """Sum ``buf`` over all ranks in place.

    ``block``: the plain blocking call, whose waiting rank polls the network on its CPU;
    ``sleep``: the nonblocking call, tested every 0.2 ms with the CPU given up in between
    (emulated hosts share two cores, so a spinning rank slows the ranks still computing).
    """
    if wait == "block":
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return
    req = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    while not req.Test():
        time.sleep(2e-4)


def train(args: argparse.Namespace, comm: MPI.Comm) -> dict:
    rank, size = comm.Get_rank(), comm.Get_size()
    d, n, batch, seed = args.d, args.n, args.batch, args.seed
    w_star = relu.planted_weights(d, seed)
    rng = relu.batch_rng(seed, rank)
    if n > 0:
        X, y = relu.shard(d, n, seed, rank, size)
    w = np.zeros(d)
    buf = np.empty(d, dtype=np.float32)
    rec: dict[str, list] = {"compute_s": [], "allreduce_s": [], "end_s": [], "tx": []}
    comm.Barrier()  # every rank has built its shard: the rounds start together
    tx0, start = tx_bytes(), time.perf_counter()
    err = relu.rel_error(w, w_star)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        if n == 0:
            Xb, yb = relu.online_batch(d, seed, rank, r, batch, w_star)
        else:
            Xb, yb = relu.minibatch(X, y, batch, rng)
        g = relu.gradient(w, Xb, yb)
        buf[:] = g
        t1 = time.perf_counter()
        allreduce(comm, buf, args.wait)
        t2 = time.perf_counter()
        w -= args.lr * (buf.astype(np.float64) / size)
        err = relu.rel_error(w, w_star)
        rec["compute_s"].append(t1 - t0)
        rec["allreduce_s"].append(t2 - t1)
        rec["end_s"].append(time.perf_counter() - start)
        rec["tx"].append(tx_bytes() - tx0)
        if not np.isfinite(err) or err <= args.target:
            break
    rec["rel_error"] = err
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, kind in (("d", int), ("n", int), ("batch", int), ("lr", float), ("rounds", int),
                       ("target", float), ("seed", int)):
        p.add_argument(f"--{name}", type=kind, required=True)
    p.add_argument("--wait", choices=("block", "sleep"), default="block")
    p.add_argument("--out", required=True, help="prefix of the JSON file each rank writes")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rec = train(args, comm)
    rec.update(rank=comm.Get_rank(), size=comm.Get_size(),
               netns_inode=os.stat("/proc/self/ns/net").st_ino,
               library=MPI.Get_library_version().strip().splitlines()[0])
    with open(f"{args.out}.{comm.Get_rank()}", "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
