"""What crosses the master's link a round in `allreduce`, measured with local agents.

Run: python benchmarks/master_bytes.py [--workers 2,4,8,16] [--d 10000] [--rounds 12]

Per M, one ``relufit run`` on the local backend (`allreduce`, QSGD s = 15, bucket 128,
fixed-width coding, online data, a small step), then the median of bytes_up + bytes_down
over its rounds after the first (round 0's ROUND carries the plan), against one compressed
gradient of d coordinates (``qsgd.fixed_payload_bytes``): issue 12 asks for at most 1.25x.
Bytes are what crossed the master's sockets, headers included, so they do not depend on the
machine's speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import SETTINGS, experiment, relufit, set_options  # noqa: E402
from orchestrator.results import load_run  # noqa: E402
from worker import qsgd  # noqa: E402

SETTING = "s15b128fixed"


def master_bytes(m: int, d: int, rounds: int, tmp: Path) -> float:
    """The median bytes a round on the master's link, rounds 1 on, with ``m`` local agents."""
    exp = tmp / f"m{m}.toml"
    exp.write_text(experiment(d, 0, 16, 1e-4, rounds, 0, m))
    stdout = relufit("run", str(exp), "--out", str(tmp / "results"),
                     *set_options("allreduce", SETTING))
    (trial,) = load_run(stdout.strip().splitlines()[-1])["trials"]
    mt = trial["metrics"]
    return float(np.median((mt["bytes_up"] + mt["bytes_down"])[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="2,4,8,16")
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    s = SETTINGS[SETTING]
    one = qsgd.fixed_payload_bytes(args.d, s["levels"], s["bucket_size"])
    print(f"one compressed gradient ({SETTING}, d = {args.d}): {one} bytes\n")
    print("| M | master's bytes a round | / one compressed gradient |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in (int(x) for x in args.workers.split(",")):
            got = master_bytes(m, args.d, args.rounds, Path(tmp))
            print(f"| {m} | {got:.0f} | {got / one:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
