"""A PART's header built and parsed: protocol 6's binary header against protocol 5's JSON.

Run (in a git checkout): python benchmarks/peer_header.py [--repeats 15] [--n 20000]
    [--baseline-rev a95e8f3]

The baseline is protocol 5's own code: ``worker/protocol.py`` as it was at
``--baseline-rev`` (the last commit with JSON PART and MEAN headers), loaded from git into a
module of its own, building a PART padded to 96 bytes and parsing it. The new path is this
tree's ``protocol.build`` and ``protocol.parse_peer``. The two alternate, repeat after
repeat, in one process; the figure is the median of the repeats' means (us a message,
build + parse).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import protocol  # noqa: E402

FIELDS = {"trial": 3, "round": 12345, "epoch": 0, "rank": 5}
PAYLOAD = b"\0" * 820  # a chunk of s15b128fixed at d = 1e4, M = 8


ROOT = Path(__file__).resolve().parents[1]


def old_protocol(rev: str, root: Path = ROOT) -> types.ModuleType:
    """worker/protocol.py at ``rev`` of the git repository ``root``, as a module of its own."""
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:worker/protocol.py"],
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"protocol_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"{rev}:worker/protocol.py", "exec"), module.__dict__)  # noqa: S102
    if module.VERSION != 5:
        raise SystemExit(f"{rev} speaks protocol {module.VERSION}, not 5")
    return module


def round_trip(proto: types.ModuleType, parse: str) -> None:
    frames = proto.build(proto.PART, [PAYLOAD], pad=96, **FIELDS)
    if getattr(proto, parse)(frames).get("rank") != FIELDS["rank"]:
        raise AssertionError(frames)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--n", type=int, default=20_000, help="messages a repeat")
    p.add_argument("--baseline-rev", default="a95e8f3")
    p.add_argument("--repo", type=Path, default=ROOT, help="the git repository of the rev")
    args = p.parse_args()
    old = old_protocol(args.baseline_rev, args.repo)
    got: dict[str, list[float]] = {"json (protocol 5)": [], "binary (protocol 6)": []}
    for _ in range(args.repeats):
        for name, proto, parse in zip(got, (old, protocol), ("parse", "parse_peer"),
                                      strict=True):
            t = time.perf_counter()
            for _ in range(args.n):
                round_trip(proto, parse)
            got[name].append((time.perf_counter() - t) / args.n * 1e6)
    med = {k: float(np.median(v)) for k, v in got.items()}
    print("| PART header | us a message, build + parse (median of "
          f"{args.repeats} x {args.n}) | bytes |\n|---|---|---|")
    for (k, v), size in zip(med.items(), (96, protocol.PEER_HEADER), strict=True):
        print(f"| {k} | {v:.2f} | {size} |")
    a, b = med.values()
    print(f"binary / json: {b / a:.2f}x")


if __name__ == "__main__":
    main()
