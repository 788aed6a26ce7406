"""A cost model of one round per topology, fitted to measured rows, then extrapolated to EC2.

Run: python benchmarks/model.py ROWS.json [ROWS.json ...] [--cores 2] [--exclude TEXT]
    [--plot PNG] [--json OUT]
    (ROWS.json: the --json of benchmarks/scaling.py; several are fitted together)

Per topology and row, a round is a time on the links, a time on the CPUs, and what is
paid either way, each a known count times a fitted constant:

    round = fixed + alpha * hops + max(link, cpu) + beta * min(link, cpu)
    link  = kappa * busiest link direction's bytes / rate
    cpu   = crowding * worker (delta * d * batch + gamma * coded coordinates
                               + c_call * codec calls + mu * messages)
            + master (gamma * coded coordinates + c_call * codec calls + mu * messages)

- link: a round's bytes over the busiest direction of the busiest link, at its nominal
  rate; kappa is how far the link really runs from nominal (TCP, framing; tbf's bucket of
  32 kB lets short bursts through above the rate). For a compressed payload P of the whole
  vector and F = 4d, the master's link carrying all M workers' traffic (a cluster's master
  has node 0 to itself: ``remote.placement``): ps M F (weights out; M P in), broadcast M P
  (in, then out: the two directions overlap across workers), allgather M (M - 1) P out,
  allreduce (2M - 1)/M P out of a worker (its parts to M - 1 owners, then its mean chunk to
  M - 1 peers and the master), MPI ring 2 (M - 1)/M F.
- cpu: what the processes of a round spend, the workers' share stretched by crowding =
  max(1, (M + 1)/cores) (M workers and a master on ``cores`` CPUs: on the 2-core machine
  the rows come from, the round waits for the sum of everyone's CPU; on EC2, one core each,
  for the slowest worker and the master). Coded coordinates and codec calls as coded on the
  critical path: ps d (M d and M calls at the master); broadcast 2d (+ (M + 1) d);
  allgather M d (+ M d); allreduce d + 2 (M - 1)/M d + d/M on a worker and d at the
  master. An allreduce worker's calls are batched (the code since 2026-12-03; scaling.py's
  rows say ``"codec": "batched"``): one quantize of its chunks, one encode pass per chunk
  shape for the parts it sends, one decode pass for the parts it receives, a quantize and
  an encode of its mean, one decode pass per shape for the means (chunks come in at most 3
  shapes: k = min(M - 1, 3)), so 4 + 2k calls, and the master min(M, 3); rows without that
  field were measured with the code before, one call per chunk: 3M - 1 and M. float32 codes
  nothing. Messages a process sends or takes in a round: a star's worker 2 and its master
  2M; an allreduce worker 2 + 4 (M - 1) (its parts and means both ways, the ROUND and its
  GRADIENT); an MPI rank none (C, no Python). delta, the gradient per coordinate and
  sample, is not fitted but measured (``--delta-ns``, default 0.77 ns: benchmarks/floor.py's
  one worker alone, 0.99 ms at d = 1e4 and batch 128); fitted, the noisy rows gave it 0
  and the other terms its time, which left the gradient out of every prediction.
- hops: messages one after another on the critical path, each paying a fixed latency
  (alpha): a star 2, allreduce 3 (a part, a mean, the master's ROUND), an MPI ring
  2 (M - 1) steps.
- beta: how much of the shorter of link and CPU time the round does not hide behind the
  longer. 0: all of it is hidden (small rounds, which run ahead and overlap); 1: none
  (long phases one after another, as at d = 1e6). One value for every row, chosen on a
  grid (0, 0.1, ..., 1) for the most rows within 20%.

For a given beta the constants are fitted by non-negative least squares on relative error
(every row weighs alike, whatever its size), alternating with which of link and CPU each
row is bound by until that stops changing; the error on each row is reported. The
prediction then sets cores = M + 1 (one core per worker and one for the master, as on EC2)
and the nominal rates of the netns backend's dated EC2 presets.

Rounds to 1e-6 for the predictions: the measured (sim) rounds at the largest measured M are
used for every larger M (more workers, a larger global batch, no more rounds: a conservative
choice); at d = 1e6 the d = 1e4 rounds are scaled by 100, as the step size that converges
scales as 1/d (docs/reference.md, Step size): an assumption, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.rates import PRESETS as LINKS  # noqa: E402
from orchestrator.rates import parse_rate  # noqa: E402
from worker import qsgd  # noqa: E402

PARAMS = ("fixed_ms", "alpha_ms", "kappa", "gamma_ns", "call_us", "delta_ns", "draw_ns",
          "mu_us")
SETTING_BYTES = {"fp32": lambda d: 4 * d,
                 "s15b128fixed": lambda d: qsgd.fixed_payload_bytes(d, 15, 128)}
PRESETS = ("c5.large-baseline", "c5n.large-baseline", "c5n.18xlarge")
TOPOLOGIES = ("broadcast", "allreduce", "mpi-allreduce")
BETAS = tuple(i / 10 for i in range(11))


def features(topology: str, setting: str, m: int, d: int, batch: int, bps: float,
             cores: float, online: bool = False, batched: bool = True) -> np.ndarray:
    """The counts of one round (see the module doc) as three rows in PARAMS' order and
    units: what is paid either way (1 for the fixed cost, hops), the link's (seconds of
    bytes at nominal rate, x1e3: ms) and the CPUs' (coordinates x1e-6: ns -> ms; calls and
    messages x1e-3: us -> ms; d * batch * crowding x1e-6, and the same again for online
    data, n = 0, whose samples are drawn every round)."""
    f = 4 * d
    p = SETTING_BYTES[setting](d)
    crowd = max(1.0, (m + 1) / cores)  # the workers and the master (or mpirun) share them
    wmsg, mmsg = 2, 2 * m
    if topology == "mpi-allreduce":
        hops, busy, wc, wcalls, mc, mcalls = 2 * (m - 1), 2 * (m - 1) / m * f, 0, 0, 0, 0
        wmsg, mmsg = 0, 0
    elif topology == "ps":  # the master's link: all M workers (node 0 is the master's)
        hops, busy, wc, wcalls, mc, mcalls = 2, m * f, d, 1, m * d, m
    elif topology == "broadcast":
        hops, busy, wc, wcalls, mc, mcalls = 2, m * p, 2 * d, 2, (m + 1) * d, m + 1
    elif topology == "allgather":
        hops, busy, wc, wcalls, mc, mcalls = 2, m * (m - 1) * p, m * d, m, m * d, m
    elif topology == "allreduce":
        hops, busy = 3, (2 * m - 1) / m * p
        wc, mc = d + 2 * (m - 1) / m * d + d / m, d
        k = min(m - 1, 3)  # chunk shapes a worker codes: one pass each
        wcalls, mcalls = ((4 + 2 * k), min(m, 3)) if batched else (3 * m - 1, m)
        wmsg = 2 + 4 * (m - 1)
    else:
        raise ValueError(topology)
    if setting == "fp32":
        wc = wcalls = mc = mcalls = 0
    work = d * batch * crowd * 1e-6
    both = np.array([1.0, hops, 0, 0, 0, 0, 0, 0])
    link = np.array([0, 0, 8e3 * busy / bps, 0, 0, 0, 0, 0])
    cpu = np.array([0, 0, 0, (wc * crowd + mc) * 1e-6, (wcalls * crowd + mcalls) * 1e-3, work,
                    work if online else 0.0, (wmsg * crowd + mmsg) * 1e-3])
    return np.array([both, link, cpu])


def round_ms(x: np.ndarray, feats: np.ndarray, beta: float) -> np.ndarray:
    """The model's round (ms) of rows of ``features`` (shape (..., 3, len(PARAMS)))."""
    both, link, cpu = (feats[..., i, :] @ x for i in range(3))
    return both + np.maximum(link, cpu) + beta * np.minimum(link, cpu)


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0, by trying every set of free columns (2^k - 1 tries for k)."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(b ** 2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x_sub = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (x_sub < 0).any():
                continue
            x = np.zeros(a.shape[1])
            x[list(cols)] = x_sub
            err = float(np.sum((a @ x - b) ** 2))
            if err < best_err:
                best, best_err = x, err
    return best


def rate_of(link: str) -> float:
    return float(parse_rate(link))


def rounds_for(rows: list[dict], topology: str, setting: str, m: int, d: int) -> float | None:
    """Rounds to 1e-6 (see the module doc): measured at d = 1e4 up to the largest M, held
    beyond it; x d / 1e4 at other d."""
    topo = "broadcast" if topology == "mpi-allreduce" else topology
    got = {r["M"]: r["rounds"] for r in rows if r["topology"] == topo and r["setting"] == setting
           and r.get("rounds") and r["d"] == 10_000}
    if not got:
        return None
    known = [k for k in sorted(got) if k <= m] or [min(got)]
    return got[known[-1]] * d / 10_000


def predict(x: np.ndarray, beta: float, rows: list[dict], batch: int) -> list[dict]:
    out = []
    for preset, d, topo, setting in itertools.product(
            PRESETS, (10_000, 1_000_000), TOPOLOGIES, ("fp32", "s15b128fixed")):
        if topo == "mpi-allreduce" and setting != "fp32":
            continue
        for m in (2, 4, 8, 16, 32, 64, 128, 256):
            ms = float(round_ms(x, features(topo, setting, m, d, batch,
                                            LINKS[preset].bits_per_s, m + 1), beta))
            # (held data, as at d = 1e4; one core per worker and one for the master)
            rounds = rounds_for(rows, topo, setting, m, d)
            out.append({"preset": preset, "d": d, "M": m, "topology": topo, "setting": setting,
                        "round_ms": ms, "rounds": rounds,
                        "t_target_s": rounds * ms / 1e3 if rounds else None})
    return out


def verdicts(pred: list[dict]) -> list[str]:
    lines = []
    for preset, d in itertools.product(PRESETS, (10_000, 1_000_000)):
        def at(topo: str, setting: str, m: int, preset: str = preset, d: int = d) -> dict:
            return next(p for p in pred if (p["preset"], p["d"], p["topology"], p["setting"],
                                            p["M"]) == (preset, d, topo, setting, m))
        ratios = [(m, at("mpi-allreduce", "fp32", m)["round_ms"]
                   / at("allreduce", "s15b128fixed", m)["round_ms"])
                  for m in (2, 4, 8, 16, 32, 64, 128, 256)]
        wins = [m for m, r in ratios if r > 1]
        desc = ", ".join(f"M={m}: {r:.2f}x" for m, r in ratios)
        where = (f"wins at M in {wins[0]}..{wins[-1]}" if wins else "never wins")
        lines.append(f"{preset}, d = {d:.0e}: allreduce s15b128fixed vs MPI float32 per round "
                     f"{where} ({desc})")
    return lines


def plot(pred: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PRESETS), 2, figsize=(11, 3.2 * len(PRESETS)), squeeze=False)
    for (i, preset), (j, d) in itertools.product(enumerate(PRESETS),
                                                 enumerate((10_000, 1_000_000))):
        ax = axes[i][j]
        for topo, setting in (("broadcast", "s15b128fixed"), ("allreduce", "s15b128fixed"),
                              ("allreduce", "fp32"), ("mpi-allreduce", "fp32")):
            pts = [p for p in pred if (p["preset"], p["d"], p["topology"], p["setting"])
                   == (preset, d, topo, setting)]
            ax.plot([p["M"] for p in pts], [p["round_ms"] for p in pts], marker="o", ms=3,
                    ls="--" if topo == "mpi-allreduce" else "-", label=f"{topo} {setting}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{preset}, d = {d:.0e}", fontsize=9)
        ax.set_xlabel("workers M")
        ax.set_ylabel("model: ms per round")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Predicted time per round, one core per worker (fitted on netns rows)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", type=Path, nargs="+", help="benchmarks/scaling.py --json output")
    p.add_argument("--cores", type=float, default=2.0, help="CPUs of the measuring machine")
    p.add_argument("--delta-ns", type=float, default=0.77,
                   help="the gradient's cost per coordinate and sample (floor.py, alone)")
    p.add_argument("--batch", type=int, default=128, help="per worker, at d = 1e4")
    p.add_argument("--big-batch", type=int, default=16, help="per worker, at d = 1e6")
    p.add_argument("--exclude", help="leave out rows whose \"run\" label contains this")
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [r for path in args.rows for r in json.loads(path.read_text())
            if not (args.exclude and args.exclude in r.get("run", ""))]
    for r in rows:  # scaling.py's --big-d rows: online data, a smaller batch
        r.setdefault("batch", args.batch if r["d"] <= 10_000 else args.big_batch)
        r.setdefault("n", 1 if r["d"] <= 10_000 else 0)
    x, beta, errs = fit_rows(rows, args.cores, {PARAMS.index("delta_ns"): args.delta_ns})
    print("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in zip(PARAMS, x, strict=True))
          + f", beta = {beta:g}")
    print("| link | d | M | topology | setting | measured ms | model ms | error |\n"
          + "|---" * 8 + "|")
    for e in errs:
        print(f"| {e['link']} | {e['d']:.0e} | {e['M']} | {e['topology']} | {e['setting']} | "
              f"{e['measured_ms']:.1f} | {e['model_ms']:.1f} | {100 * e['error']:+.0f}% |")
    worst = max(abs(e["error"]) for e in errs)
    print(f"largest error {100 * worst:.0f}% over {len(errs)} rows "
          f"({sum(abs(e['error']) <= 0.2 for e in errs)} within 20%)")
    pred = predict(x, beta, rows, args.batch)
    print()
    print("| preset | d | M | topology | setting | ms per round | rounds | time to 1e-6 s |\n"
          + "|---" * 8 + "|")
    for q in pred:
        if q["M"] in (8, 64, 256):
            t = f"{q['t_target_s']:.1f}" if q["t_target_s"] else "-"
            rounds = f"{q['rounds']:.0f}" if q["rounds"] else "-"
            print(f"| {q['preset']} | {q['d']:.0e} | {q['M']} | {q['topology']} | "
                  f"{q['setting']} | {q['round_ms']:.2f} | {rounds} | {t} |")
    print()
    for line in verdicts(pred):
        print(line)
    if args.plot:
        plot(pred, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"params": {**dict(zip(PARAMS, x.tolist(), strict=True)),
                                                    "beta": beta},
                                         "errors": errs, "predictions": pred}, indent=1))


def fit_rows(rows: list[dict], cores: float, pinned: dict[int, float] | None = None,
             betas: tuple[float, ...] = BETAS) -> tuple[np.ndarray, float, list[dict]]:
    """The constants and beta (see the module doc), ``pinned`` constants (column -> value)
    held as measured, and each row's error. Per beta: NNLS on relative error with each row
    taking the features of what it is bound by (link or CPU; at first, whichever has the
    more bytes a millisecond), again until no row changes sides; the beta with the most rows
    within 20% (then the smallest largest error) wins."""
    usable = [r for r in rows if r["setting"] in SETTING_BYTES and r["round_ms"] > 0]
    f = np.array([features(r["topology"], r["setting"], r["M"], r["d"], r["batch"],
                           rate_of(r["link"]), cores, r.get("n", 1) == 0,
                           r.get("codec") == "batched") for r in usable])
    t = np.array([r["round_ms"] for r in usable])
    pinned = pinned or {}
    free = [j for j in range(len(PARAMS)) if j not in pinned]
    best: tuple | None = None
    for beta in betas:
        linked = f[:, 1, PARAMS.index("kappa")] > t / 2
        for _ in range(50):
            a = f[:, 0] + np.where(linked[:, None], f[:, 1] + beta * f[:, 2],
                                   f[:, 2] + beta * f[:, 1])
            held = sum((a[:, j] * v for j, v in pinned.items()), np.zeros(len(t)))
            x = np.zeros(len(PARAMS))
            x[free] = nnls(a[:, free] / t[:, None], 1 - held / t)
            for j, v in pinned.items():
                x[j] = v
            now = f[:, 1] @ x > f[:, 2] @ x
            if (now == linked).all():
                break
            linked = now
        err = round_ms(x, f, beta) / t - 1
        score = (int(np.sum(np.abs(err) <= 0.2)), -float(np.max(np.abs(err))))
        if best is None or score > best[0]:
            best = (score, x, beta, err)
    _, x, beta, err = best
    errs = [{**{k: r[k] for k in ("link", "d", "M", "topology", "setting")},
             "measured_ms": float(ti), "model_ms": float(ti * (1 + e)), "error": float(e)}
            for r, ti, e in zip(usable, t, err, strict=True)]
    return x, beta, errs


if __name__ == "__main__":
    main()
