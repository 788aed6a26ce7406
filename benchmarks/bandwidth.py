"""When does QSGD win on the clock? float32 against QSGD on emulated shaped links (netns).

Run (Linux, root): python benchmarks/bandwidth.py [--links 100mbit,1gbit]
    [--topologies ps,allgather] [--settings fp32,s16b512,...] [--rounds 900] [--d 10000]
    [--batch 256] [--lr 0.08]

For every link rate it brings up one netns cluster (4 workers, name prefix ``bwb<pid>-``),
deploys once, runs every setting x topology with ``relufit run --cluster`` and tears the
cluster down in ``finally``. Per combination it prints the medians over rounds (first two
dropped as warm-up) of the time per round split into compute, coding (encode + decode) and
network, the time to the target rel_error (elapsed_s at the first round reaching it), the
bytes sent up to then, and the speed-up over float32 in the same topology and link. The
float32 trial of each (link, topology) is the baseline, measured in the same run.

The crossover bandwidth (above which float32 wins) is bracketed between the measured rates:
for each topology, the best QSGD speed-up at each rate; the crossover lies between the last
rate where it is > 1 and the first where it is <= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from orchestrator.results import load_run

SETTINGS = {
    "fp32": {"scheme": "none"},
    "s4b512": {"scheme": "qsgd", "levels": 4, "coding": "elias", "bucket_size": 512},
    "s4b512fixed": {"scheme": "qsgd", "levels": 4, "coding": "fixed", "bucket_size": 512},
    "s16b512": {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 512},
    "s16b512fixed": {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 512},
    "s16": {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 0},
}
DEFAULT_SETTINGS = "fp32,s16b512,s16b512fixed"  # s4b512 diverges at lr 0.08; ~10 min in all
WARMUP = 2


def toml_value(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def sweep_toml(names: list[str]) -> str:
    """The --set value of sweep.compress: one inline table per setting."""
    rows = []
    for n in names:
        rows.append("{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in SETTINGS[n].items()) + "}")
    return "[" + ", ".join(rows) + "]"


def experiment(args: argparse.Namespace) -> str:
    return f"""name = "bwbench"
[problem]
d = {args.d}
n = 0
seed = 0
[train]
rounds = {args.rounds}
batch_size = {args.batch}
lr = {args.lr}
target_rel_error = {args.target}
[compress]
scheme = "none"
[cluster]
workers = {args.workers}
topology = "ps"
"""


def relufit(*argv: str) -> str:
    out = subprocess.run(["relufit", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stdout[-2000:] + out.stderr[-2000:]
        raise SystemExit(f"relufit {' '.join(argv)} failed:\n{tail}")
    return out.stdout


def setting_name(params: dict) -> str:
    comp = {k: v for k, v in params.get("compress", {}).items()}
    for name, s in SETTINGS.items():
        full = {"coding": "elias", "bucket_size": 0, **s}
        if all(comp.get(k, full[k]) == full[k] for k in full) and comp.get("scheme") == s["scheme"]:
            return name
    return json.dumps(comp)


def summarize(trial: dict, target: float) -> dict:
    m = trial["metrics"]
    sl = slice(WARMUP, None)
    round_t = np.diff(np.concatenate([[0.0], m["elapsed_s"]]))
    hit = np.nonzero(m["rel_error"] <= target)[0]
    i = int(hit[0]) if len(hit) else None
    last = i if i is not None else len(m["round"]) - 1
    return {
        "round_ms": 1e3 * float(np.median(round_t[sl])),
        "compute_ms": 1e3 * float(np.median(m["t_compute"][sl])),
        "coding_ms": 1e3 * float(np.median((m["t_encode"] + m["t_decode"])[sl])),
        "network_ms": 1e3 * float(np.median(m["t_network"][sl])),
        "rounds": last + 1,
        "t_target": float(m["elapsed_s"][i]) if i is not None else None,
        "mb": float((m["bytes_up"][: last + 1].sum() + m["bytes_down"][: last + 1].sum()) / 1e6),
        "final": float(m["rel_error"][last]),
    }


def run_link(link: str, args: argparse.Namespace, exp_file: Path, out: Path) -> list[dict]:
    name = f"bwb{os.getpid()}-{link}".replace(".", "")
    rows = []
    try:
        relufit("cluster", "up", "--provider", "netns", "--name", name,
                "--workers", str(args.workers), "--bandwidth", link)
        relufit("deploy", name)
        for topo in args.topologies.split(","):
            stdout = relufit("run", str(exp_file), "--cluster", name, "--out", str(out),
                             "--set", f"cluster.topology={topo}", "--set", f"cluster.link={link}",
                             "--set", f"sweep.compress={sweep_toml(args.settings.split(','))}")
            run_dir = stdout.strip().splitlines()[-1].strip()
            for t in load_run(run_dir)["trials"]:
                row = {"link": link, "topology": topo, "setting": setting_name(t["params"]),
                       "run": run_dir, **summarize(t, args.target)}
                rows.append(row)
                print(fmt(row), flush=True)
    finally:
        subprocess.run(["relufit", "cluster", "down", name], capture_output=True)
    return rows


def add_speedups(rows: list[dict]) -> None:
    for r in rows:
        base = next((b for b in rows if b["link"] == r["link"] and b["topology"] == r["topology"]
                     and b["setting"] == "fp32"), None)
        ok = base and base["t_target"] and r["t_target"]
        r["speedup"] = base["t_target"] / r["t_target"] if ok else None


def fmt(r: dict) -> str:
    t = f"{r['t_target']:.2f}" if r["t_target"] is not None else f"not reached ({r['final']:.1e})"
    sp = r.get("speedup")
    sp = f"{sp:.2f}x" if sp is not None else "-"
    return (f"| {r['link']} | {r['topology']} | {r['setting']} | {r['round_ms']:.1f} | "
            f"{r['compute_ms']:.1f} | {r['coding_ms']:.1f} | {r['network_ms']:.1f} | "
            f"{r['rounds']} | {t} | {r['mb']:.1f} | {sp} |")


def crossover(rows: list[dict], links: list[str]) -> list[str]:
    out = []
    for topo in sorted({r["topology"] for r in rows}):
        best = []
        for link in links:
            sps = [r["speedup"] for r in rows if r["link"] == link and r["topology"] == topo
                   and r["setting"] != "fp32" and r["speedup"] is not None]
            best.append((link, max(sps) if sps else None))
        desc = ", ".join(f"{lk}: {b:.2f}x" if b else f"{lk}: -" for lk, b in best)
        wins = [lk for lk, b in best if b and b > 1]
        loses = [lk for lk, b in best if b is not None and b <= 1]
        if wins and loses:
            verdict = f"crossover between {wins[-1]} and {loses[0]}"
        elif wins:
            verdict = f"QSGD still wins at {wins[-1]}: crossover above it"
        elif loses:
            verdict = f"float32 already wins at {loses[0]}: crossover below it"
        else:
            verdict = "undetermined"
        out.append(f"{topo}: best QSGD speed-up {desc} -> {verdict}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", default="100mbit,1gbit")
    p.add_argument("--topologies", default="ps,allgather")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"of {','.join(SETTINGS)}")
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="per worker")
    p.add_argument("--lr", type=float, default=0.08)
    p.add_argument("--rounds", type=int, default=900)
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bandwidth.py needs root (netns clusters)")
    links = args.links.split(",")
    header = ("| link | topology | setting | round ms | compute ms | coding ms | network ms | "
              "rounds | time to target s | MB sent | speed-up vs fp32 |\n" + "|---" * 11 + "|")
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exp_file = Path(tmp) / "bwbench.toml"
        exp_file.write_text(experiment(args))
        for link in links:
            rows += run_link(link, args, exp_file, Path("results"))
    add_speedups(rows)
    print("\n" + header)
    for r in rows:
        print(fmt(r))
    print()
    for line in crossover(rows, links):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
