"""A cost model of one round per topology, fitted to measured rows, then extrapolated to EC2.

Run: python benchmarks/model.py ROWS.json [ROWS.json ...] [--cores 2] [--exclude TEXT]
    [--plot PNG] [--json OUT]
    (ROWS.json: the --json of benchmarks/scaling.py; several are fitted together)
     python benchmarks/model.py --measure
    (times the per-coordinate constants alone, the defaults of --enc-ns, --dec-ns, --draw-ns)

Per topology and row, a round is a time on the links, a time on the CPUs, and what is
paid either way, each a known count times a constant:

    round = fixed + alpha * hops + max(link, cpu) + beta * min(link, cpu)
    link  = kappa * bytes on the critical path of the busiest link / rate
            + resend * packets the links dropped * 1514 bytes / rate
    cpu   = crowd * worker's + crowd_master * master's
              (delta * d * batch [+ draw * d * batch, online data] + enc * coordinates
               quantized and encoded + dec * coordinates decoded and dequantized
               + c_call * codec calls + mu * messages)

- Measured alone, not fitted (the defaults; ``--measure`` times them on this machine):
  delta, the gradient per coordinate and sample (0.77 ns: benchmarks/floor.py's one worker
  alone, 0.99 ms at d = 1e4, batch 128); draw, an online sample's Gaussian draw per
  coordinate (10.6 ns); enc, QSGD s = 15, bucket 128 quantize + fixed-width encode per
  coordinate (12.7 ns), and dec, decode + dequantize (4.6 ns), both at d = 1e6 where the
  per-call cost is nothing. Fitted, the noisy rows traded them against each other (an
  encode that cost nothing, a decode at 53 ns); measured, they are what one core spends,
  which is what the prediction below assumes.
- Fitted: fixed, alpha, kappa, c_call, mu, resend, by non-negative least squares on
  relative error (every row weighs alike, whatever its size), alternating with which of
  link and CPU each row is bound by until that stops changing; beta on a grid (0, 0.1,
  ..., 1), the one with the most rows within 20%. The error on each row is reported.
- link: bytes over the busiest direction of the busiest link, at its nominal rate; kappa
  is how far the link really runs from nominal. For a compressed payload P of the whole
  vector and F = 4d: the master's link carries all M workers' traffic (a cluster's master
  has node 0 to itself: ``remote.placement``): ps up M P and down M F, broadcast M P each
  way. A star's two directions overlap when its master's M messages each fit the link's
  queue (they go out whole, one after another, and a worker served early uploads while the
  later ones download: the longer direction only); much larger ones share the link, end
  together and the uploads follow (both directions): of the shorter direction a fraction
  1 - min(1, queue / message) is added, queue being the netns tbf's 50 ms at the rate plus
  its bucket (``star_bytes``). allgather M (M - 1) P out of the master; allreduce
  (2M - 1)/M P out of a worker (its parts to M - 1 owners, then its mean chunk to M - 1
  peers and the master); MPI ring 2 (M - 1)/M F.
- resend: what a packet the link's queue dropped costs, in full frames at the link's rate
  (TCP sends it again; 1 if that were all, more for its back-off). The count is measured
  per row (benchmarks/scaling.py reads every host's tbf queues), and is 0 in the
  predictions: `allreduce` sends 1/M of the vector to each peer, never M copies at once,
  and dropped nothing at d = 1e4.
- cpu: the workers' counts are stretched by crowd and the master's by crowd_master
  (``crowding``): with a core for each worker (M <= cores) 1 and 1; with fewer, the
  workers' time is shared out over the cores (M / cores), a star's master works while
  every worker waits for it (1), an `allreduce` master takes in mean chunks beside the
  workers' work (1 / cores). Coordinates coded on the critical path, worker (master):
  ps enc d (dec M d); broadcast enc d and dec d (enc d, dec M d); allgather enc d, dec
  (M - 1) d (dec M d); allreduce enc d + d/M (its chunks, then its mean chunk) and dec
  2 (M - 1)/M d (the parts it owns, the others' means) (dec d). An allreduce worker's
  calls are batched (``"codec": "batched"`` in scaling.py's rows): one quantize of its
  chunks, one encode pass per chunk shape for the parts it sends, one decode pass for the
  parts it receives, a quantize and an encode of its mean, one decode pass per shape for
  the means (chunks come in at most 3 shapes: k = min(M - 1, 3)), so 4 + 2k calls, and
  the master min(M, 3); rows without that field were measured with the code before, one
  call per chunk: 3M - 1 and M. float32 codes nothing. Messages a process sends or takes in
  a round: a star's worker 2 and its master 2M; an allreduce worker 2 + 4 (M - 1) (its
  parts and means both ways, the ROUND and its GRADIENT); an MPI rank none (C, no Python).
- An MPI rank starts its ring when its gradient is done and computes nothing during it:
  its link time is paid after its CPU time, not beside it (both in the first term). A
  ring step longer than Open MPI's TCP eager limit (64 kB) goes by rendezvous, in 128 kB
  fragments each pushed from the rank's own progress loop, so it moves only while its
  ranks run: with more ranks than cores its link time stretches by crowd (M / cores).
  Measured at d = 1e6 (1 MB steps), M = 4, 100 Mbit/s on 2 cores: the ring took 880-915
  ms against 480 ms of bytes, with the bytes on the wire equal to the ring's (298 MB
  against 288 MB in 12 rounds, headers included); with ranks that test the ring every
  0.2 ms instead of spinning in it, 1596 ms. At d = 1e4 (10 kB steps) the kernel carries
  a step without the rank and the rows sit at their byte time.
- hops: messages one after another on the critical path, each paying a fixed latency
  (alpha): a star 2, allreduce 3 (a part, a mean, the master's ROUND), an MPI ring
  2 (M - 1) steps.
- beta: how much of the shorter of link and CPU time the round does not hide behind the
  longer: 0, all of it is hidden (workers at different phases of a round); 1, none.

The prediction then sets cores = M + 1 (one core per worker and one for the master, as on
EC2), no dropped packets, and the nominal rates of the netns backend's dated EC2 presets.
c_call and mu are this machine's crowded figures (9 processes on 2 cores at M = 8), so the
predictions are pessimistic for relufit where calls and messages dominate (large M, fast
links); a second table puts them at what they cost alone (``--measure``: a codec call on
one bucket ~50 us, a message in a burst of 14 ~9 us a side; ``--alone-call-us``,
``--alone-mu-us``), which is optimistic. The two bracket a core per process.

Rounds to 1e-6 for the predictions: the measured (sim) rounds at the largest measured M are
used for every larger M (more workers, a larger global batch, no more rounds: a conservative
choice); at d = 1e6 the d = 1e4 rounds are scaled by 100, as the step size that converges
scales as 1/d (docs/reference.md, Step size): an assumption, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.providers import netns  # noqa: E402
from orchestrator.rates import PRESETS as LINKS  # noqa: E402
from orchestrator.rates import parse_rate  # noqa: E402
from worker import qsgd  # noqa: E402

PARAMS = ("fixed_ms", "alpha_ms", "kappa", "enc_ns", "dec_ns", "call_us", "delta_ns",
          "draw_ns", "mu_us", "resend")
SETTING_BYTES = {"fp32": lambda d: 4 * d,
                 "s15b128fixed": lambda d: qsgd.fixed_payload_bytes(d, 15, 128)}
PRESETS = ("c5.large-baseline", "c5n.large-baseline", "c5n.18xlarge")
TOPOLOGIES = ("broadcast", "allreduce", "mpi-allreduce")
BETAS = tuple(i / 10 for i in range(11))
# Open MPI's TCP eager limit (``ompi_info --param btl tcp --level 9``: btl_tcp_eager_limit):
# a longer message goes by rendezvous, in fragments of 128 kB each sent from the rank's own
# progress loop
MPI_EAGER = 65_536
BURST = 14  # messages an M = 8 allreduce worker sends in a round (7 parts, 7 means)
PACKET = 1514  # bytes of a full Ethernet frame: what a dropped packet costs to send again


def features(topology: str, setting: str, m: int, d: int, batch: int, bps: float,
             cores: float, online: bool = False, batched: bool = True,
             drops: float = 0.0) -> np.ndarray:
    """The counts of one round (see the module doc) as three rows in PARAMS' order and
    units: what is paid either way (1 for the fixed cost, hops), the link's (seconds of
    bytes at nominal rate, x1e3: ms; likewise a full frame per packet dropped) and the CPUs'
    (coordinates x1e-6: ns -> ms; calls and messages x1e-3: us -> ms; d * batch x1e-6, and
    the same again for online data, n = 0, whose samples are drawn every round), each
    worker's count times ``crowd`` and the master's times ``crowd_master``."""
    f = 4 * d
    p = SETTING_BYTES[setting](d)
    wmsg, mmsg = 2, 2 * m
    # coordinates quantized and encoded (enc) or decoded and dequantized (dec), and codec
    # calls, on a worker (w) and at the master (m)
    if topology == "mpi-allreduce":
        hops, busy = 2 * (m - 1), 2 * (m - 1) / m * f
        wenc, wdec, wcalls, menc, mdec, mcalls = 0, 0, 0, 0, 0, 0
        wmsg, mmsg = 0, 0
    elif topology == "ps":  # the master's link: all M workers (node 0 is the master's)
        hops, busy = 2, star_bytes(m * p, m * f, f, bps)
        wenc, wdec, wcalls, menc, mdec, mcalls = d, 0, 1, 0, m * d, m
    elif topology == "broadcast":
        hops, busy = 2, star_bytes(m * p, m * p, p, bps)
        wenc, wdec, wcalls, menc, mdec, mcalls = d, d, 2, d, m * d, m + 1
    elif topology == "allgather":
        hops, busy = 2, m * (m - 1) * p
        wenc, wdec, wcalls, menc, mdec, mcalls = d, (m - 1) * d, m, 0, m * d, m
    elif topology == "allreduce":
        hops, busy = 3, (2 * m - 1) / m * p
        # its gradient's chunks and its mean chunk; the parts it owns and the others' means
        wenc, wdec, menc, mdec = d + d / m, 2 * (m - 1) / m * d, 0, d
        k = min(m - 1, 3)  # chunk shapes a worker codes: one pass each
        wcalls, mcalls = ((4 + 2 * k), min(m, 3)) if batched else (3 * m - 1, m)
        wmsg = 2 + 4 * (m - 1)
    else:
        raise ValueError(topology)
    if setting == "fp32":
        wenc = wdec = wcalls = menc = mdec = mcalls = 0
    crowd, crowd_master = crowding(topology, m, cores)
    work = d * batch * crowd * 1e-6
    both = np.zeros(len(PARAMS))
    both[[0, 1]] = 1.0, hops
    link = np.zeros(len(PARAMS))
    link[[2, 9]] = 8e3 * busy / bps, 8e3 * drops * PACKET / bps
    cpu = np.array([0, 0, 0, (wenc * crowd + menc * crowd_master) * 1e-6,
                    (wdec * crowd + mdec * crowd_master) * 1e-6,
                    (wcalls * crowd + mcalls * crowd_master) * 1e-3, work,
                    work if online else 0.0, (wmsg * crowd + mmsg * crowd_master) * 1e-3, 0])
    if topology == "mpi-allreduce":  # the ring starts when the gradient is done: no overlap
        if f / m > MPI_EAGER:  # long steps move only while their ranks run (module doc)
            link = link * crowd
        both, link = both + link, np.zeros_like(link)
    return np.array([both, link, cpu])


def queue_bytes(bps: float) -> float:
    """What a shaped link holds before it drops: the netns backend's tbf queue (its
    latency at the rate) and its bucket (``netns.tbf_args``)."""
    tbf = netns.tbf_args(int(bps))
    latency_s = float(tbf[tbf.index("latency") + 1].removesuffix("ms")) / 1e3
    return bps / 8 * latency_s + int(tbf[tbf.index("burst") + 1])


def star_bytes(up: float, down: float, message: float, bps: float) -> float:
    """The bytes a star's master link carries on the round's critical path: the longer
    direction, and of the shorter the part that cannot run beside it. The master sends its
    M messages at once; one that fits the link's queue goes out whole, one after another,
    so a worker served early uploads while later ones download and the directions overlap;
    much larger ones share the link and all end together, and the uploads follow."""
    overlap = min(1.0, queue_bytes(bps) / message)
    return max(up, down) + (1 - overlap) * min(up, down)


def crowding(topology: str, m: int, cores: float) -> tuple[float, float]:
    """How many times a worker's and the master's CPU time a round waits for. With a core
    for each worker (M <= cores) the workers run side by side and the master's part follows
    (1, 1). With fewer, the workers' time is shared out over the cores (M / cores); a star's
    master works while every worker waits for it, so its time counts whole (1), while an
    ``allreduce`` master only takes in mean chunks beside the workers' work (1 / cores). An
    MPI ring has no master."""
    if m <= cores:
        return 1.0, 1.0
    if topology == "mpi-allreduce":
        return m / cores, 0.0
    return m / cores, 1.0 / cores if topology == "allreduce" else 1.0


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
        for m in MS:
            ms = float(round_ms(x, features(topo, setting, m, d, batch,
                                            LINKS[preset].bits_per_s, m + 1), beta))
            # (held data, as at d = 1e4; one core per worker and one for the master)
            rounds = rounds_for(rows, topo, setting, m, d)
            out.append({"preset": preset, "d": d, "M": m, "topology": topo, "setting": setting,
                        "round_ms": ms, "rounds": rounds,
                        "t_target_s": rounds * ms / 1e3 if rounds else None})
    return out


MS = (2, 4, 8, 16, 32, 64, 128, 256)


def verdicts(pred: list[dict]) -> list[str]:
    """A markdown table: per preset and d, MPI float32's time to 1e-6 (its round, when the
    rows give no rounds) over `allreduce` QSGD's at each M (above 1: `allreduce` is
    ahead), and where it is ahead."""
    key = "t_target_s" if all(p["t_target_s"] for p in pred) else "round_ms"
    what = "time to 1e-6" if key == "t_target_s" else "time per round"
    lines = [f"MPI float32's {what} over allreduce s15b128fixed's:", "",
             "| preset | d | " + " | ".join(f"M = {m}" for m in MS) + " | ahead at |",
             "|---" * (len(MS) + 3) + "|"]
    for preset, d in itertools.product(PRESETS, (10_000, 1_000_000)):
        def at(topo: str, setting: str, m: int, preset: str = preset, d: int = d) -> dict:
            return next(p for p in pred if (p["preset"], p["d"], p["topology"], p["setting"],
                                            p["M"]) == (preset, d, topo, setting, m))
        ratios = [at("mpi-allreduce", "fp32", m)[key] / at("allreduce", "s15b128fixed", m)[key]
                  for m in MS]
        wins = [m for m, r in zip(MS, ratios, strict=True) if r > 1]
        where = f"M = {wins[0]}-{wins[-1]}" if wins else "nowhere"
        lines.append(f"| {preset} | {d:.0e} | " + " | ".join(f"{r:.2f}x" for r in ratios)
                     + f" | {where} |")
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
    p.add_argument("rows", type=Path, nargs="*", help="benchmarks/scaling.py --json output")
    p.add_argument("--measure", action="store_true",
                   help="time the per-coordinate constants alone on this machine, and stop")
    p.add_argument("--cores", type=float, default=2.0, help="CPUs of the measuring machine")
    p.add_argument("--delta-ns", type=float, default=0.77,
                   help="the gradient's cost per coordinate and sample (floor.py, alone)")
    p.add_argument("--draw-ns", type=float, default=10.6,
                   help="an online sample's draw per coordinate (--measure; nan: fitted)")
    p.add_argument("--enc-ns", type=float, default=12.7,
                   help="quantize + encode per coordinate (--measure; nan: fitted)")
    p.add_argument("--dec-ns", type=float, default=4.6,
                   help="decode + dequantize per coordinate (--measure; nan: fitted)")
    p.add_argument("--alone-call-us", type=float, default=50.0,
                   help="a codec call alone, for the second prediction (--measure)")
    p.add_argument("--alone-mu-us", type=float, default=8.9,
                   help="a message alone, for the second prediction (--measure)")
    p.add_argument("--batch", type=int, default=128, help="per worker, at d = 1e4")
    p.add_argument("--big-batch", type=int, default=16, help="per worker, at d = 1e6")
    p.add_argument("--check", type=Path, nargs="+", default=[],
                   help="rows of other runs: the fitted model's error on them (not fitted)")
    p.add_argument("--exclude", help="leave out rows whose \"run\" label contains this")
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.measure:
        got = {**measure_alone(), **measure_calls_alone()}
        print(", ".join(f"{k} = {v:.3g}" for k, v in got.items()))
        return
    if not args.rows:
        p.error("give the rows to fit (benchmarks/scaling.py --json files), or --measure")
    rows, others = ([r for path in paths for r in json.loads(path.read_text())
                     if not (args.exclude and args.exclude in r.get("run", ""))]
                    for paths in (args.rows, args.check))
    for r in rows + others:  # scaling.py's --big-d rows: online data, a smaller batch
        r.setdefault("batch", args.batch if r["d"] <= 10_000 else args.big_batch)
        r.setdefault("n", 1 if r["d"] <= 10_000 else 0)
    pinned = {PARAMS.index("delta_ns"): args.delta_ns}
    for name in ("draw_ns", "enc_ns", "dec_ns"):
        if not math.isnan(getattr(args, name)):  # nan: fitted
            pinned[PARAMS.index(name)] = getattr(args, name)
    x, beta, errs = fit_rows(rows, args.cores, pinned)
    print("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in zip(PARAMS, x, strict=True))
          + f", beta = {beta:g}")
    print("| link | d | M | topology | setting | measured ms | model ms | error |\n"
          + "|---" * 8 + "|")
    for e in errs:
        print(f"| {e['link']} | {e['d']:.0e} | {e['M']} | {e['topology']} | {e['setting']} | "
              f"{e['measured_ms']:.1f} | {e['model_ms']:.1f} | {100 * e['error']:+.0f}% |")
    print(error_line(errs, "rows"))
    if others:
        checked = row_errors(x, beta, checkable(rows, others), args.cores)
        print("\nNot fitted (--check): " + ", ".join(
            f"{e['link']} M={e['M']} {e['topology']} {e['setting']} {100 * e['error']:+.0f}%"
            for e in checked))
        print(error_line(checked, "rows of other runs"))
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
    # the same with a codec call and a message at what they cost alone: the fitted figures
    # are this machine's crowded ones, so the two tables bracket a core per process
    alone = x.copy()
    alone[[PARAMS.index("call_us"), PARAMS.index("mu_us")]] = args.alone_call_us, args.alone_mu_us
    pred_alone = predict(alone, beta, rows, args.batch)
    print(f"\nWith a codec call at {args.alone_call_us:g} us and a message at "
          f"{args.alone_mu_us:g} us, as alone (--measure), instead of the fitted "
          f"{x[PARAMS.index('call_us')]:.0f} and {x[PARAMS.index('mu_us')]:.0f}:\n")
    for line in verdicts(pred_alone):
        print(line)
    if args.plot:
        plot(pred, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"params": {**dict(zip(PARAMS, x.tolist(), strict=True)),
                                                    "beta": beta},
                                         "errors": errs, "predictions": pred,
                                         "predictions_alone": pred_alone}, indent=1))


def measure_calls_alone(repeats: int = 15, n: int = 2000) -> dict[str, float]:
    """Medians, us, of a codec call and of a message, each alone in this process: a call is
    the mean of the four an `allreduce` round makes (quantize, encode, decode, dequantize)
    on one bucket of 128 coordinates, where the per-coordinate work is nothing; a message
    is a PART of 820 bytes through a real DEALER -> ROUTER pair over loopback TCP, sent in
    bursts of 14 (an M = 8 worker's parts and means) and then received: half of its send +
    receive + parse (the model counts a message once for each side)."""
    import time

    import zmq

    from worker import protocol

    rng = np.random.default_rng(0)
    g = rng.standard_normal(128)
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        frames = protocol.build(protocol.PART, [b"\0" * 820], trial=0, round=0, epoch=0,
                                rank=1)
        dealer.send_multipart(frames)
        router.recv_multipart()  # connected
        calls, msgs = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n // 4):
                q = qsgd.quantize(g, 15, np.random.default_rng(i), 128)
                qsgd.dequantize(qsgd.decode(qsgd.encode(q, "fixed")))
            t1 = time.perf_counter()
            for _ in range(n // BURST):  # as a round sends them: a burst, then its answers
                for _ in range(BURST):
                    dealer.send_multipart(protocol.build(
                        protocol.PART, [b"\0" * 820], trial=0, round=i, epoch=0, rank=1))
                for _ in range(BURST):
                    protocol.parse_peer(router.recv_multipart(copy=False)[1:])
            t2 = time.perf_counter()
            calls.append((t1 - t0) / n * 1e6)  # n // 4 rounds of four calls
            msgs.append((t2 - t1) / (n // BURST * BURST) / 2 * 1e6)
    finally:
        router.close()
        dealer.close()
        ctx.term()
    return {"call_us": float(np.median(calls)), "mu_us": float(np.median(msgs))}


def error_line(errs: list[dict], what: str) -> str:
    worst = max((abs(e["error"]) for e in errs), default=0.0)
    return (f"largest error {100 * worst:.0f}% over {len(errs)} {what} "
            f"({sum(abs(e['error']) <= 0.2 for e in errs)} within 20%)")


def measure_alone(d: int = 1_000_000, batch: int = 16, repeats: int = 15) -> dict[str, float]:
    """Medians, ns per coordinate (per coordinate and sample for draw and gradient), of the
    model's pinned constants, timed in this process: a QSGD s = 15, bucket 128 quantize +
    fixed-width encode and decode + dequantize of a d-vector, an online batch's draw."""
    import time

    from worker import relu

    rng = np.random.default_rng(0)
    g, w_star, w = rng.standard_normal(d), relu.planted_weights(d, 0), np.zeros(d)
    times: dict[str, list[float]] = {"enc_ns": [], "dec_ns": [], "draw_ns": [],
                                     "delta_ns": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        payload = qsgd.encode(qsgd.quantize(g, 15, np.random.default_rng(i), 128), "fixed")
        t1 = time.perf_counter()
        qsgd.dequantize(qsgd.decode(payload))
        t2 = time.perf_counter()
        x, y = relu.online_batch(d, 0, 0, i, batch, w_star)
        t3 = time.perf_counter()
        relu.gradient(w, x, y)
        t4 = time.perf_counter()
        for k, dt, n in (("enc_ns", t1 - t0, d), ("dec_ns", t2 - t1, d),
                         ("draw_ns", t3 - t2, d * batch), ("delta_ns", t4 - t3, d * batch)):
            times[k].append(dt / n * 1e9)
    return {k: float(np.median(v)) for k, v in times.items()}


def fit_rows(rows: list[dict], cores: float, pinned: dict[int, float] | None = None,
             betas: tuple[float, ...] = BETAS) -> tuple[np.ndarray, float, list[dict]]:
    """The constants and beta (see the module doc), ``pinned`` constants (column -> value)
    held as measured, and each row's error. Per beta: NNLS on relative error with each row
    taking the features of what it is bound by (link or CPU; at first, whichever has the
    more bytes a millisecond), again until no row changes sides; the beta with the most rows
    within 20% (then the smallest largest error) wins."""
    usable, f, t = row_features(rows, cores)
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
    _, x, beta, _ = best
    return x, beta, row_errors(x, beta, usable, cores)


def row_features(rows: list[dict], cores: float) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The rows the model covers, their ``features`` and their measured rounds (ms)."""
    usable = [r for r in rows if r["setting"] in SETTING_BYTES and r["round_ms"] > 0]
    f = np.array([features(r["topology"], r["setting"], r["M"], r["d"], r["batch"],
                           rate_of(r["link"]), cores, r.get("n", 1) == 0,
                           r.get("codec") == "batched", r.get("drops", 0.0))
                  for r in usable]).reshape(len(usable), 3, len(PARAMS))
    return usable, f, np.array([r["round_ms"] for r in usable])


def row_errors(x: np.ndarray, beta: float, rows: list[dict], cores: float) -> list[dict]:
    """The model's round against each measured one (error = model / measured - 1)."""
    usable, f, t = row_features(rows, cores)
    err = round_ms(x, f, beta) / t - 1 if usable else []
    return [{**{k: r[k] for k in ("link", "d", "M", "topology", "setting")},
             "measured_ms": float(ti), "model_ms": float(ti * (1 + e)), "error": float(e)}
            for r, ti, e in zip(usable, t, err, strict=True)]


def checkable(fitted: list[dict], other: list[dict]) -> list[dict]:
    """Rows of other runs the fitted model can be checked on: those with their packet drops
    counted, and those without whose row in the fitted runs dropped none (the same link, d,
    M, topology and setting)."""
    key = ("link", "d", "M", "topology", "setting")
    dropped = {tuple(r[k] for k in key) for r in fitted if r.get("drops", 0) > 0}
    return [r for r in other if "drops" in r or tuple(r[k] for k in key) not in dropped]


if __name__ == "__main__":
    main()
