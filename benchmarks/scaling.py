"""Workers added on slow links: relufit's `broadcast` and `allreduce` against an MPI ring.

Run (Linux, root; needs openmpi-bin and mpi4py for the MPI rows):
    python benchmarks/scaling.py [--links 10mbit,100mbit] [--workers 2,4,8]
        [--topologies broadcast,allreduce] [--settings fp32,s15b128fixed] [--d 10000]
        [--n 100000] [--batch 128] [--lr 0.045] [--rounds 60] [--big-d 1000000]
        [--big-link 100mbit] [--big-rounds 20] [--json OUT] [--sims FILE] [--from-json IN]

Per link rate it brings up ONE netns cluster with the largest worker count (name prefix
``scb<pid>-``), deploys once, and for each M runs, on the first M workers' hosts: every
topology x setting for ``--rounds`` rounds (``relufit run --cluster``, ``cluster.workers=M``;
the other agents idle), and the MPI float32 ``Allreduce`` baseline (benchmarks/mpi_baseline.py)
on the same M hosts. The cluster is removed in ``finally``.

The step size is --lr (0.045, issue 12's) at 4 workers, scaled linearly with M.

Time to 1e-6 = rounds to 1e-6 x the median time per round. The rounds are not measured on
the cluster but taken from ``--backend sim``, run first (before any cluster, so it does not
share the CPUs with the measured rounds): every backend's ``rel_error`` equals sim's bit for
bit, and the script checks that the cluster's first rounds do. MPI's float32 rounds are taken
as relufit's float32 rounds (same problem, same batches; its float32 sums are ordered
differently, and the full runs of benchmarks/bandwidth.py gave it the same count, 1741).
This makes a 10 Mbit/s grid that would take hours of full runs take minutes.

Bytes per round (medians), from the metrics: the master's link (bytes_up + bytes_down), a
worker's link (its share of bytes_up + bytes_peer out, of bytes_down + bytes_peer in; the
larger direction) and the total; MPI's are its ring's payload, 2 (M-1)/M 4d per rank and
direction. The byte floor of a round is the busiest link direction's bytes over the link
rate; the compute floor is benchmarks/floor.py's (run once per M, with no cluster up): the
gradient for float32, and for QSGD the row's own topology's work (``broadcast``: encode one,
decode one; ``allreduce``: a member's scatter, reduce and gather, both quantizations).

Packets the links dropped, per row: every host's two tbf queues (``tc -s qdisc``: its eth0
for what it sends, its bridge-side veth for what it takes in) are read before and after the
row's run (one run per topology and setting), and the difference is divided by the rounds
run: ``drops`` over all hosts, ``master_drops`` on the master's host. A tbf queue holds 50 ms
of the rate; what a host sends at once beyond it is dropped and TCP backs off
(benchmarks/model.py's loss term).

Last, ``--big-d``: at d = 1e6 on ``--big-link`` with 4 workers, a few rounds per row for the
time per round only (online data), MPI included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import (  # noqa: E402
    SETTINGS,
    experiment,
    floor_figures,
    relufit,
    setting_name,
    sweep_toml,
)
from benchmarks.mpi_baseline import ring_bytes  # noqa: E402
from orchestrator.providers import netns  # noqa: E402
from orchestrator.rates import parse_rate  # noqa: E402
from orchestrator.results import load_run  # noqa: E402

WARMUP = 3


def sim_rounds(exp_file: Path, m: int, topologies: list[str], settings: list[str], out: Path,
               rounds: int, target: float, budget: int | None = None
               ) -> dict[tuple[str, str], dict]:
    """Rounds to ``target`` and the first ``rounds`` rel_errors, per (topology, setting), from
    ``--backend sim``. float32 is computed once: broadcast and allreduce float32 are equal."""
    res = {}
    for topo in topologies:
        names = [s for s in settings if not (s == "fp32" and ("broadcast", "fp32") in res)]
        if not names:
            continue
        stdout = relufit("run", str(exp_file), "--backend", "sim", "--out", str(out),
                         "--set", f"cluster.workers={m}", "--set", f"cluster.topology={topo}",
                         "--set", f"sweep.compress={sweep_toml(names)}",
                         "--set", f"train.target_rel_error={target}",
                         *(["--set", f"train.rounds={budget}"] if budget else []))
        for t in load_run(stdout.strip().splitlines()[-1])["trials"]:
            name = setting_name(t["params"])
            reached = t.get("reached_target")
            res[(topo, name)] = {"rounds": int(len(t["metrics"]["round"])),
                                 "reached": bool(reached),
                                 "head": t["metrics"]["rel_error"][:rounds].tolist()}
    if ("broadcast", "fp32") in res:
        res[("allreduce", "fp32")] = res[("broadcast", "fp32")]
    return res


def save_sims(path: Path, sims: dict) -> None:
    path.write_text(json.dumps({str(m): [{"topology": t, "setting": s, **v}
                                         for (t, s), v in res.items()]
                                for m, res in sims.items()}, indent=1))


def load_sims(path: Path) -> dict:
    """``--sims`` FILE: {M: [{topology, setting, rounds, reached, head?}]} (what save_sims
    writes; a hand-made one may leave ``head`` out)."""
    raw = json.loads(path.read_text())
    return {int(m): {(e["topology"], e["setting"]): e for e in entries}
            for m, entries in raw.items()}


def with_heads(saved: dict, exp_file: Path, m: int, out: Path,
               args: argparse.Namespace) -> dict:
    """Saved rounds to the target, with the first ``--rounds`` rel_errors from a short sim
    (what the cluster's rows are checked against) where they are missing."""
    if all("head" in v for v in saved.values()):
        return saved
    topologies = sorted({t for t, _ in saved})
    settings = sorted({s for _, s in saved}, key=lambda s: s != "fp32")
    short = sim_rounds(exp_file, m, topologies, settings, out, args.rounds, 0, args.rounds)
    return {k: {**v, "head": short[k]["head"]} for k, v in saved.items() if k in short}


def link_bytes(m: dict, workers: int) -> dict:
    """Median bytes a round on the master's link, on a worker's (busier direction), in all."""
    sl = slice(WARMUP, None)
    up, down, peer = (np.median(m[k][sl]) for k in ("bytes_up", "bytes_down", "bytes_peer"))
    return {"master_kb": (up + down) / 1e3,
            "worker_kb": max(up + peer, down + peer) / workers / 1e3,
            "busiest_kb": max(up, down, (up + peer) / workers, (down + peer) / workers) / 1e3,
            "total_kb": (up + down + peer) / 1e3}


_DROPPED = re.compile(r"\(dropped (\d+),")


def qdisc_drops(text: str) -> int:
    """Packets dropped, summed over the qdiscs of ``tc -s qdisc show`` output."""
    return sum(int(n) for n in _DROPPED.findall(text))


def link_drops(name: str) -> dict[int, int]:
    """Packets dropped so far on each host's two shaped directions (rank: count; rank 0 is
    the master's host)."""
    out = {}
    for h in netns.load_state(name).hosts:
        sent = subprocess.run(["ip", "netns", "exec", h.namespace, "tc", "-s", "qdisc", "show",
                               "dev", "eth0"], capture_output=True, text=True).stdout
        taken = subprocess.run(["tc", "-s", "qdisc", "show", "dev", h.veth],
                               capture_output=True, text=True).stdout
        out[h.rank] = qdisc_drops(sent) + qdisc_drops(taken)
    return out


def drop_figures(before: dict[int, int], after: dict[int, int], rounds: int) -> dict:
    """Drops a round over all hosts and on the master's (rank 0)."""
    diff = {r: after[r] - before.get(r, 0) for r in after}
    return {"drops": sum(diff.values()) / max(rounds, 1),
            "master_drops": diff.get(0, 0) / max(rounds, 1)}


def cluster_rows(name: str, link: str, m: int, exp_file: Path, topologies: list[str],
                 settings: list[str], sims: dict, out: Path, d: int, bps: int,
                 n: int, batch: int) -> list[dict]:
    rows = []
    for topo, one in ((t, s) for t in topologies for s in settings):
        before = link_drops(name)
        stdout = relufit("run", str(exp_file), "--cluster", name, "--out", str(out),
                         "--set", f"cluster.workers={m}", "--set", f"cluster.topology={topo}",
                         "--set", f"cluster.link={link}",
                         "--set", f"sweep.compress={sweep_toml([one])}")
        after = link_drops(name)
        for t in load_run(stdout.strip().splitlines()[-1])["trials"]:
            mt, setting = t["metrics"], setting_name(t["params"])
            sl = slice(WARMUP, None)
            row = {"link": link, "d": d, "n": n, "batch": batch, "M": m, "topology": topo,
                   "setting": setting, "codec": "batched",  # one pass per chunk shape
                   "round_ms": 1e3 * float(np.median(np.diff(mt["elapsed_s"])[WARMUP - 1:])),
                   "compute_ms": 1e3 * float(np.median(mt["t_compute"][sl])),
                   "coding_ms": 1e3 * float(np.median((mt["t_encode"] + mt["t_decode"])[sl])),
                   "network_ms": 1e3 * float(np.median(mt["t_network"][sl])),
                   **link_bytes(mt, m),
                   **drop_figures(before, after, len(mt["rel_error"]))}
            row["bytes_floor_ms"] = 8e3 * row["busiest_kb"] * 1e3 / bps
            sim = sims.get((topo, setting))
            if sim is not None:
                n = min(len(sim["head"]), len(mt["rel_error"]))
                row["equals_sim"] = bool(np.array_equal(mt["rel_error"][:n], sim["head"][:n]))
                row["rounds"] = sim["rounds"] if sim["reached"] else None
                row["t_target"] = (row["rounds"] * row["round_ms"] / 1e3
                                   if row["rounds"] else None)
            rows.append(row)
            print(fmt(row), flush=True)
    return rows


def mpi_row(name: str, link: str, m: int, d: int, n: int, batch: int, lr: float, rounds: int,
            fp32_rounds: int | None, bps: int) -> dict:
    from benchmarks.mpi_baseline import run_mpi

    before = link_drops(name)
    res = run_mpi(name, d=d, n=n, batch=batch, lr=lr, rounds=rounds, target=0, seed=0,
                  ranks=m)
    drops = drop_figures(before, link_drops(name), rounds)
    ring = ring_bytes(d, m)
    row = {"link": link, "d": d, "n": n, "batch": batch, "M": m, "topology": "mpi-allreduce",
           "setting": "fp32",
           "round_ms": res["round_ms"], "compute_ms": res["compute_ms"], "coding_ms": 0.0,
           "network_ms": res["network_ms"], "master_kb": 0.0, "worker_kb": ring / 1e3,
           "busiest_kb": ring / 1e3, "total_kb": m * ring / 1e3,
           "bytes_floor_ms": 8e3 * ring / bps, "rounds": fp32_rounds, **drops,
           "t_target": fp32_rounds * res["round_ms"] / 1e3 if fp32_rounds else None}
    print(fmt(row), flush=True)
    return row


def lr_at(args: argparse.Namespace, m: int) -> float:
    """The step size at M workers: --lr at 4, scaled with the global batch (at M = 2 the
    4-worker step is near the 2B/d limit and converges too slowly to compare)."""
    return args.lr * m / 4


def floor_ms(args: argparse.Namespace, m: int, tmp: Path) -> dict:
    """benchmarks/floor.py at M workers (no cluster up): ms a round per kind of work."""
    figures = floor_figures(args, m, "s15b128fixed", tmp / f"floor{m}.json", "--rounds", "150",
                            "--repeats", "3", quiet=True)
    return {k: 1e3 * v for k, v in figures["all_s"].items()}


def run_link(link: str, args: argparse.Namespace, tmp: Path, sims: dict,
             floors: dict) -> list[dict]:
    name = f"scb{os.getpid()}-{link}".replace(".", "")
    ms = [int(x) for x in args.workers.split(",")]
    topologies, settings = args.topologies.split(","), args.settings.split(",")
    bps = parse_rate(link)
    rows = []
    try:
        relufit("cluster", "up", "--provider", "netns", "--name", name, "--workers",
                str(max(ms)), "--bandwidth", link)
        relufit("deploy", name)
        exp_file = tmp / "scaling.toml"
        for m in [] if args.big_only else ms:
            exp_file.write_text(experiment(args.d, args.n, args.batch, lr_at(args, m),
                                           args.rounds, 0, max(ms)))
            rows += cluster_rows(name, link, m, exp_file, topologies, settings, sims[m],
                                 Path("results"), args.d, bps, args.n, args.batch)
            if args.mpi:
                fp32 = sims[m].get(("broadcast", "fp32"))
                rows.append(mpi_row(name, link, m, args.d, args.n, args.batch, lr_at(args, m),
                                    args.rounds, fp32["rounds"] if fp32 else None, bps))
            for r in rows:
                if r["M"] == m and r["link"] == link and m in floors:
                    f = floors[m]
                    # a QSGD row's floor is its own topology's coding (floor.py's modes)
                    compute = (f["gradient"] if r["setting"] == "fp32" else
                               f.get(r["topology"], f["broadcast"]))
                    r["floor_ms"] = max(compute, r["bytes_floor_ms"])
                    r["vs_floor"] = r["round_ms"] / r["floor_ms"]
        if args.big_d and link == args.big_link:
            big = tmp / "scaling-big.toml"
            big.write_text(experiment(args.big_d, 0, 16, 1e-4, args.big_rounds, 0, max(ms)))
            rows += cluster_rows(name, link, 4, big, topologies, settings, {}, Path("results"),
                                 args.big_d, bps, 0, 16)
            if args.mpi:
                rows.append(mpi_row(name, link, 4, args.big_d, 0, 16, 1e-4, args.big_rounds,
                                    None, bps))
    finally:
        subprocess.run(["relufit", "cluster", "down", name], capture_output=True)
    return rows


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def fmt(r: dict) -> str:
    return (f"| {r['link']} | {r['d']:.0e} | {r['M']} | {r['topology']} | {r['setting']} | "
            f"{r['round_ms']:.1f} | {r['compute_ms']:.1f} | {r['coding_ms']:.1f} | "
            f"{r['network_ms']:.1f} | {_f(r.get('rounds'), 'd')} | {_f(r.get('t_target'))} | "
            f"{r['master_kb']:.1f} | {r['worker_kb']:.1f} | {r['total_kb']:.1f} | "
            f"{_f(r.get('floor_ms'))} | {_f(r.get('vs_floor'), '.2f')} | "
            f"{_f(r.get('vs_mpi'), '.2f')} | {_f(r.get('vs_broadcast'), '.2f')} | "
            f"{_f(r.get('drops'))} | "
            f"{ {True: 'yes', False: 'NO'}.get(r.get('equals_sim'), '-') } |")


HEADER = ("| link | d | M | topology | setting | round ms | compute ms | coding ms | network ms "
          "| rounds to 1e-6 | time to 1e-6 s | master kB | worker kB | total kB | floor ms "
          "| round / floor | vs MPI | vs broadcast | drops a round | first rounds = sim |\n"
          + "|---" * 20 + "|")


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        same = [b for b in rows if (b["link"], b["d"], b["M"]) == (r["link"], r["d"], r["M"])]
        mpi = next((b for b in same if b["topology"] == "mpi-allreduce"), None)
        bc = next((b for b in same if b["topology"] == "broadcast"
                   and b["setting"] == r["setting"]), None)
        key = "t_target" if r.get("t_target") else "round_ms"
        if mpi and mpi.get(key) and r.get(key):
            r["vs_mpi"] = mpi[key] / r[key]
        if bc and bc.get(key) and r.get(key) and r["topology"] == "allreduce":
            r["vs_broadcast"] = bc[key] / r[key]


def report(rows: list[dict]) -> None:
    add_ratios(rows)
    print(HEADER)
    for r in rows:
        print(fmt(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", default="10mbit,100mbit")
    p.add_argument("--workers", default="2,4,8")
    p.add_argument("--topologies", default="broadcast,allreduce")
    p.add_argument("--settings", default="fp32,s15b128fixed", help=f"of {','.join(SETTINGS)}")
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=128, help="per worker")
    p.add_argument("--lr", type=float, default=0.045,
                   help="at 4 workers; scaled linearly with M (the global batch)")
    p.add_argument("--rounds", type=int, default=60, help="measured rounds per row")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--max-rounds", type=int, default=5000, help="sim's budget to the target")
    p.add_argument("--big-d", type=int, default=1_000_000, help="0: skip")
    p.add_argument("--big-link", default="100mbit")
    p.add_argument("--big-rounds", type=int, default=20,
                   help="rounds per --big-d row (8 gave 2.13x and 2.57x in two runs)")
    p.add_argument("--big-only", action="store_true",
                   help="only the --big-d rows (no sim, floor or d = --d rows)")
    p.add_argument("--mpi", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path)
    p.add_argument("--sims", type=Path, help="rounds to the target per M: read when it "
                   "exists (only the first rounds are simulated again), written otherwise")
    p.add_argument("--from-json", type=Path, help="run nothing: report saved rows")
    args = p.parse_args()
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return
    if os.geteuid() != 0:
        sys.exit("scaling.py needs root (netns clusters)")
    ms = [int(x) for x in args.workers.split(",")]
    topologies, settings = args.topologies.split(","), args.settings.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        sims, floors = {}, {}
        saved = load_sims(args.sims) if args.sims and args.sims.exists() else {}
        # before any cluster: sim and the floor have the CPUs to themselves
        for m in [] if args.big_only else ms:
            exp_file = tmp / "sim.toml"
            exp_file.write_text(experiment(args.d, args.n, args.batch, lr_at(args, m),
                                           args.max_rounds, args.target, m))
            if m in saved:  # rounds to the target from an earlier run; the first rounds anew
                sims[m] = with_heads(saved[m], exp_file, m, tmp / "sim", args)
            else:
                sims[m] = sim_rounds(exp_file, m, topologies, settings, tmp / "sim",
                                     args.rounds, args.target)
            if args.sims:
                save_sims(args.sims, {**saved, **sims})
            print(f"sim M={m}: " + ", ".join(f"{t} {s}: {v['rounds']}"
                                             + ("" if v["reached"] else " (not reached)")
                                             for (t, s), v in sims[m].items()), flush=True)
            if args.floor:
                floors[m] = floor_ms(args, m, tmp)
                print(f"floor M={m}: " + ", ".join(f"{k} {v:.2f} ms"
                                                   for k, v in floors[m].items()), flush=True)
        print(HEADER, flush=True)
        for link in args.links.split(","):
            rows += run_link(link, args, tmp, sims, floors)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print()
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
