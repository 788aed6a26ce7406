"""When does QSGD win on the clock? float32 against QSGD on emulated shaped links (netns).

Run (Linux, root): python benchmarks/bandwidth.py [--links 100mbit,1gbit,10gbit]
    [--topologies ps,allgather,broadcast] [--settings fp32,s16b512fixed,...] [--d 10000]
    [--n 100000] [--batch 128] [--lr 0.045] [--rounds 4000] [--no-mpi] [--per-round-d 1000000]
    [--no-floor] [--json OUT] [--plot PNG] [--from-json IN ...]

For every link rate it brings up one netns cluster (4 workers + the master's host, name
prefix ``bwb<pid>-``), deploys once, runs every setting x topology with ``relufit run
--cluster``, runs the MPI float32 baseline (benchmarks/mpi_baseline.py: mpi4py Allreduce,
one rank in each worker's namespace) on the same cluster, then, at ``--per-round-d``
(default 1e6; 0 skips it), a few rounds of each topology for the time per round only,
and tears the cluster down in ``finally``.

Per combination it prints the medians over rounds (first two dropped as warm-up) of the
time per round split into compute, coding (encode + decode) and network; the time to the
target rel_error, counted from the end of round 0 to the end of the round that reaches it
(so that trial start-up, which builds each worker's shard, is left out of every row alike);
the bytes sent up to then; and speed-ups: against float32 in the same topology, against
relufit's best float32 on that link, and against the MPI baseline. Every baseline is
measured in the same run, on the same cluster.

The crossover bandwidth (above which float32 wins) is bracketed between the measured rates:
for each topology, the best QSGD speed-up at each rate; the crossover lies between the last
rate where it is > 1 and the first where it is <= 1.

Last, with no cluster up, benchmarks/floor.py measures the compute floor of a round at
--d (the workers' own work, no network; ``--no-floor`` skips it), and the report says, per
link, the time per round that the 4x target and beating MPI would need over the best QSGD
row's rounds, against that floor: whether the target is within this machine's reach.
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

from orchestrator.rates import parse_rate
from orchestrator.results import load_run

SETTINGS = {
    "fp32": {"scheme": "none"},
    "s4b512": {"scheme": "qsgd", "levels": 4, "coding": "elias", "bucket_size": 512},
    "s8b512": {"scheme": "qsgd", "levels": 8, "coding": "elias", "bucket_size": 512},
    "s16b512": {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 512},
    "s16b512fixed": {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 512},
    "s16b128": {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 128},
    "s16b128fixed": {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 128},
    # s = 15: sign + 4 level bits (s = 16 needs 5); s = 7 (4.25 bits) did not reach 1e-6
    "s15b128fixed": {"scheme": "qsgd", "levels": 15, "coding": "fixed", "bucket_size": 128},
    "s7b128fixed": {"scheme": "qsgd", "levels": 7, "coding": "fixed", "bucket_size": 128},
    "s64b512": {"scheme": "qsgd", "levels": 64, "coding": "elias", "bucket_size": 512},
    "s16": {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 0},
}
DEFAULT_SETTINGS = "fp32,s15b128fixed,s16b128,s16b512fixed"
WARMUP = 2
PER_ROUND_LR = 1e-4  # time per round does not depend on lr; a small one never diverges


def toml_value(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def sweep_toml(names: list[str]) -> str:
    """The --set value of sweep.compress: one inline table per setting."""
    rows = []
    for n in names:
        rows.append("{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in SETTINGS[n].items()) + "}")
    return "[" + ", ".join(rows) + "]"


def set_options(topology: str, setting: str) -> list[str]:
    """``relufit run --set`` options that give ``experiment``'s file a topology and one
    setting of SETTINGS."""
    sets = [f"cluster.topology={topology}",
            *(f"compress.{k}={v}" for k, v in SETTINGS[setting].items())]
    return [a for s in sets for a in ("--set", s)]


def experiment(d: int, n: int, batch: int, lr: float, rounds: int, target: float,
               workers: int) -> str:
    return f"""name = "bwbench"
[problem]
d = {d}
n = {n}
seed = 0
[train]
rounds = {rounds}
batch_size = {batch}
lr = {lr}
target_rel_error = {target}
[compress]
scheme = "none"
[cluster]
workers = {workers}
topology = "ps"
"""


def relufit(*argv: str) -> str:
    out = subprocess.run(["relufit", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stdout[-2000:] + out.stderr[-2000:]
        raise SystemExit(f"relufit {' '.join(argv)} failed:\n{tail}")
    return out.stdout


def setting_name(params: dict) -> str:
    comp = dict(params.get("compress", {}))
    for name, s in SETTINGS.items():
        full = {"coding": "elias", "bucket_size": 0, **s}
        if all(comp.get(k, full[k]) == full[k] for k in full) and comp.get("scheme") == s["scheme"]:
            return name
    return json.dumps(comp)


def summarize(trial: dict, target: float) -> dict:
    m = trial["metrics"]
    sl = slice(WARMUP, None)
    round_t = np.diff(m["elapsed_s"])
    hit = np.nonzero(m["rel_error"] <= target)[0] if target > 0 else np.array([], int)
    i = int(hit[0]) if len(hit) else None
    last = i if i is not None else len(m["round"]) - 1
    return {
        "round_ms": 1e3 * float(np.median(round_t[WARMUP - 1:])),
        "compute_ms": 1e3 * float(np.median(m["t_compute"][sl])),
        "coding_ms": 1e3 * float(np.median((m["t_encode"] + m["t_decode"])[sl])),
        "network_ms": 1e3 * float(np.median(m["t_network"][sl])),
        "rounds": last + 1,
        "t_target": float(m["elapsed_s"][i] - m["elapsed_s"][0]) if i is not None else None,
        "mb": float((m["bytes_up"][: last + 1].sum() + m["bytes_down"][: last + 1].sum()) / 1e6),
        "final": float(m["rel_error"][last]),
    }


def run_grid(name: str, link: str, exp_file: Path, topologies: list[str], settings: list[str],
             target: float, out: Path, d: int) -> list[dict]:
    rows = []
    for topo in topologies:
        stdout = relufit("run", str(exp_file), "--cluster", name, "--out", str(out),
                         "--set", f"cluster.topology={topo}", "--set", f"cluster.link={link}",
                         "--set", f"sweep.compress={sweep_toml(settings)}")
        run_dir = stdout.strip().splitlines()[-1].strip()
        for t in load_run(run_dir)["trials"]:
            if len(t["metrics"]["round"]) <= WARMUP:
                print(f"skipped {link} {topo} {setting_name(t['params'])}: only "
                      f"{len(t['metrics']['round'])} round(s) ({t.get('reason', '')})", flush=True)
                continue
            row = {"link": link, "d": d, "topology": topo, "setting": setting_name(t["params"]),
                   "run": run_dir, "per_round": target == 0, **summarize(t, target)}
            rows.append(row)
            print(fmt(row), flush=True)
    return rows


def run_mpi_row(name: str, link: str, d: int, n: int, batch: int, lr: float, rounds: int,
                target: float) -> dict:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from mpi_baseline import run_mpi  # noqa: PLC0415 (optional: needs openmpi and mpi4py)

    res = run_mpi(name, d=d, n=n, batch=batch, lr=lr, rounds=rounds, target=target, seed=0)
    keys = ("round_ms", "compute_ms", "network_ms", "rounds", "t_target", "mb", "final")
    row = {"link": link, "d": d, "topology": "mpi-allreduce", "setting": "fp32", "run": "",
           "per_round": target == 0, "coding_ms": 0.0, **{k: res[k] for k in keys}}
    print(fmt(row), flush=True)
    return row


def run_link(link: str, args: argparse.Namespace, tmp: Path, out: Path) -> list[dict]:
    name = f"bwb{os.getpid()}-{link}".replace(".", "")
    rows = []
    settings = args.settings.split(",")
    topologies = args.topologies.split(",")
    try:
        relufit("cluster", "up", "--provider", "netns", "--name", name,
                "--workers", str(args.workers), "--bandwidth", link)
        relufit("deploy", name)
        exp_file = tmp / "bwbench.toml"
        exp_file.write_text(experiment(args.d, args.n, args.batch, args.lr, args.rounds,
                                       args.target, args.workers))
        if args.grid:
            rows += run_grid(name, link, exp_file, topologies, settings, args.target, out,
                             args.d)
        if args.mpi and args.grid:
            rows.append(run_mpi_row(name, link, args.d, args.n, args.batch, args.lr,
                                    args.rounds, args.target))
        if args.per_round_d:
            big = tmp / "bwbench-big.toml"  # online data: no d x n matrix at d = 1e6
            big.write_text(experiment(args.per_round_d, 0, args.per_round_batch, PER_ROUND_LR,
                                      args.per_round_rounds, 0, args.workers))
            rows += run_grid(name, link, big, topologies, args.per_round_settings.split(","),
                             0, out, args.per_round_d)
            if args.mpi:
                rows.append(run_mpi_row(name, link, args.per_round_d, 0, args.per_round_batch,
                                        PER_ROUND_LR, args.per_round_rounds, 0))
    finally:
        subprocess.run(["relufit", "cluster", "down", name], capture_output=True)
    return rows


def add_speedups(rows: list[dict]) -> None:
    def t(r: dict | None) -> float | None:
        return r["t_target"] if r else None

    for r in rows:
        same = [b for b in rows if b["link"] == r["link"] and b["d"] == r["d"]]
        base = next((b for b in same if b["topology"] == r["topology"] and b["setting"] == "fp32"),
                    None)
        fp32 = [b["t_target"] for b in same
                if b["setting"] == "fp32" and b["topology"] != "mpi-allreduce" and b["t_target"]]
        mpi = next((b for b in same if b["topology"] == "mpi-allreduce"), None)
        mine = r["t_target"]
        r["speedup"] = t(base) / mine if mine and t(base) else None
        r["vs_best_fp32"] = min(fp32) / mine if mine and fp32 else None
        r["vs_mpi"] = t(mpi) / mine if mine and t(mpi) else None


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def fmt(r: dict) -> str:
    if r["per_round"]:
        t = "-"  # time per round only
    elif r["t_target"] is None:
        t = f"not reached ({r['final']:.1e})"
    else:
        t = f"{r['t_target']:.2f}"
    return (f"| {r['link']} | {r['d']:.0e} | {r['topology']} | {r['setting']} | "
            f"{r['round_ms']:.1f} | {r['compute_ms']:.1f} | {r['coding_ms']:.1f} | "
            f"{r['network_ms']:.1f} | {r['rounds']} | {t} | {r['mb']:.1f} | "
            f"{_x(r.get('speedup'))} | {_x(r.get('vs_best_fp32'))} | {_x(r.get('vs_mpi'))} |")


HEADER = ("| link | d | topology | setting | round ms | compute ms | coding ms | network ms | "
          "rounds | time to target s | MB sent | vs fp32 same topology | vs best relufit fp32 | "
          "vs MPI |\n" + "|---" * 14 + "|")


def crossover(rows: list[dict], links: list[str]) -> list[str]:
    out = []
    topos = sorted({r["topology"] for r in rows if r["topology"] != "mpi-allreduce"})
    for topo in topos:
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


def plot(rows: list[dict], d: int, path: Path) -> None:
    """Time to target against link rate: one line per topology x setting, MPI dashed."""
    import matplotlib  # noqa: PLC0415 (the report extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r["d"] == d and r["t_target"]:
            series.setdefault((r["topology"], r["setting"]), []).append(
                (parse_rate(r["link"]), r["t_target"]))
    colors = {"ps": "tab:blue", "allgather": "tab:orange", "broadcast": "tab:green",
              "mpi-allreduce": "black"}
    marks = ["o", "s", "^", "v", "D"]
    settings = sorted({s for _, s in series})
    for (topo, setting), pts in sorted(series.items()):
        x, y = zip(*sorted(pts), strict=True)
        ax.plot(x, y, marker=marks[settings.index(setting) % len(marks)],
                color=colors.get(topo, "gray"),
                linestyle="--" if topo == "mpi-allreduce" else "-", label=f"{topo} {setting}")
    ax.set_xscale("log")
    ax.set_xlabel("link rate (bit/s), every host")
    ax.set_ylabel("time to rel_error 1e-6 (s)")
    ax.set_title(f"d = {d:g}, 4 workers: float32 vs QSGD vs MPI Allreduce")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", default="100mbit,1gbit,10gbit")
    p.add_argument("--topologies", default="ps,allgather,broadcast")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"of {','.join(SETTINGS)}")
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--n", type=int, default=100_000, help="0: online data (costly to draw)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=128, help="per worker")
    p.add_argument("--lr", type=float, default=0.045)
    p.add_argument("--rounds", type=int, default=4000)
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--mpi", action=argparse.BooleanOptionalAction, default=True,
                   help="the mpi4py Allreduce baseline (needs openmpi-bin and mpi4py)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="the time-to-target grid at --d (--no-grid: only the per-round rows)")
    p.add_argument("--per-round-d", type=int, default=1_000_000, help="0: skip")
    p.add_argument("--per-round-rounds", type=int, default=8)
    p.add_argument("--per-round-batch", type=int, default=16)
    p.add_argument("--per-round-settings", default="fp32,s15b128fixed")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="the compute floor at --d (benchmarks/floor.py) and the verdict")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--plot", type=Path, help="time to target against link rate, as PNG")
    p.add_argument("--from-json", type=Path, nargs="+",
                   help="run nothing: merge the rows of earlier --json files (first wins)")
    args = p.parse_args()
    if args.from_json:
        report_saved(args)
        return
    if os.geteuid() != 0:
        sys.exit("bandwidth.py needs root (netns clusters)")
    for name in args.settings.split(",") + args.per_round_settings.split(","):
        if name not in SETTINGS:
            sys.exit(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    links = args.links.split(",")
    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for link in links:
            rows += run_link(link, args, Path(tmp), Path("results"))
            if args.json:  # keep what is measured so far
                args.json.write_text(json.dumps(rows, indent=1))
        if args.floor and args.grid:
            rows.append(run_floor(args, Path(tmp)))
    print()
    report(rows, args)  # adds the speed-ups, which the final --json keeps
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def report_saved(args: argparse.Namespace) -> None:
    rows, seen = [], set()
    for f in args.from_json:
        for r in json.loads(f.read_text()):
            key = (r["link"], r["d"], r["topology"], r["setting"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    report(rows, args)


def floor_figures(args: argparse.Namespace, workers: int, setting: str, out: Path,
                  *extra: str, quiet: bool = False) -> dict:
    """benchmarks/floor.py at --d, --n and --batch with ``workers`` and ``setting``: its JSON
    (``all_s``: the medians in seconds per kind of work)."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("floor.py")), "--d", str(args.d),
                    "--n", str(args.n), "--batch", str(args.batch), "--workers", str(workers),
                    "--setting", setting, "--json", str(out), *extra], check=True,
                   capture_output=quiet)
    return json.loads(out.read_text())


def run_floor(args: argparse.Namespace, tmp: Path) -> dict:
    """benchmarks/floor.py at the grid's size, with its first QSGD setting: one row."""
    qsgd = next((s for s in args.settings.split(",") if s != "fp32"), "s15b128fixed")
    return {"link": "-", "d": args.d, "topology": "floor", "setting": qsgd,
            **floor_figures(args, args.workers, qsgd, tmp / "floor.json")}


def floor_verdict(rows: list[dict], floor: dict) -> list[str]:
    """Per link at the floor's d: the time per round that 4x relufit's fastest float32, and
    beating MPI, would need over the best QSGD row's rounds, against the compute floor of a
    QSGD round (the gradients and their encoding, the least a QSGD worker does; no decoding,
    no master, no network)."""
    grad, least = floor["all_s"]["gradient"], floor["all_s"]["encode"]
    out = [f"compute floor (benchmarks/floor.py, {floor['workers']} workers on "
           f"{floor['cpus']} CPUs, no network): gradients {grad * 1e3:.2f} ms a round, and "
           f"encoding them ({floor['setting']}) {least * 1e3:.2f} ms"]
    for link in dict.fromkeys(r["link"] for r in rows if r["d"] == floor["d"]):
        same = [r for r in rows if r["link"] == link and r["d"] == floor["d"] and r["t_target"]]
        fp32 = [r["t_target"] for r in same
                if r["setting"] == "fp32" and r["topology"] != "mpi-allreduce"]
        qsgd = [r for r in same if r["setting"] != "fp32"]
        mpi = [r["t_target"] for r in same if r["topology"] == "mpi-allreduce"]
        if not fp32 or not qsgd:
            continue
        best = min(qsgd, key=lambda r: r["t_target"])
        goals = [("4x relufit's fastest float32", min(fp32) / 4)]
        if mpi:
            goals.append(("beating MPI", mpi[0]))
        for goal, seconds in goals:
            need = seconds / best["rounds"]
            if need < least:
                verdict = "out of reach on this machine"
            elif need < 1.25 * least:
                verdict = (f"at the floor: {100 * (need / least - 1):.0f}% left for the master "
                           f"and the messages")
            else:
                verdict = "above the floor: within reach of a cheaper round"
            out.append(f"{link}: {goal} needs <= {need * 1e3:.2f} ms a round over the best QSGD "
                       f"row's {best['rounds']} rounds ({best['topology']} {best['setting']}); "
                       f"the floor is {least * 1e3:.2f} ms -> {verdict}")
    return out


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """The table with every speed-up, the crossover per topology, the verdict against the
    compute floor, and the plot."""
    floors = [r for r in rows if r["topology"] == "floor"]
    rows = [r for r in rows if r["topology"] != "floor"]
    add_speedups(rows)
    print(HEADER)
    for r in rows:
        print(fmt(r))
    print()
    links = list(dict.fromkeys(r["link"] for r in rows))
    for line in crossover([r for r in rows if r["d"] == args.d], links):
        print(line)
    for floor in floors:
        print()
        for line in floor_verdict(rows, floor):
            print(line)
    if args.plot:
        plot(rows, args.d, args.plot)


if __name__ == "__main__":
    main()
