"""Link rates: the bandwidth of a cluster's links, as text (``100mbit``, ``2.5gbit``) or as
the name of a dated instance-type preset (``c5.large-baseline``).

Part of the cluster model, not of one provider: ``netns`` shapes its links with them,
``report`` reads a run's ``cluster.link`` with them, and the benchmarks' cost model predicts
EC2 presets with them. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class LinkPreset:
    """The network bandwidth of a real instance type, usable as --bandwidth NAME."""

    name: str
    bits_per_s: int
    aws_label: str
    note: str


# Compiled 2026-11-26 from AWS's own documentation (figures change; re-check before quoting):
# - "Amazon EC2: Instance Types" guide (2024 edition, docs.aws.amazon.com/ec2/latest/
#   instancetypes/), "Network specifications" tables, column "Baseline / Burst bandwidth (Gbps)":
#   compute optimized c5.large 0.75 / 10.0, c5n.large 3.0 / 25.0, c5n.18xlarge "100 Gigabit";
#   general purpose m5.large 0.75 / 10.0, t3.large 0.512 / 5.0;
# - `aws ec2 describe-instance-types` NetworkInfo.NetworkPerformance: "Up to 10 Gigabit" (c5.large);
# - EC2 User Guide, "Amazon EC2 instance network bandwidth": "up to" sizes have a BASELINE and
#   burst above it on network I/O credits for a limited time (typically 5 to 60 minutes); one
#   flow is capped at 5 Gbit/s outside a cluster placement group (10 Gbit/s inside one).
# The plain name is the "up to" (burst) figure; NAME-baseline is the sustained figure, which is
# what a long experiment on that instance sees.
PRESETS: dict[str, LinkPreset] = {
    p.name: p
    for p in (
        LinkPreset("t3.large", 5_000_000_000, "Up to 5 Gigabit", "burst"),
        LinkPreset("t3.large-baseline", 512_000_000, "Up to 5 Gigabit", "baseline 0.512 Gbit/s"),
        LinkPreset("c5.large", 10_000_000_000, "Up to 10 Gigabit", "burst"),
        LinkPreset("c5.large-baseline", 750_000_000, "Up to 10 Gigabit", "baseline 0.75 Gbit/s"),
        LinkPreset("m5.large", 10_000_000_000, "Up to 10 Gigabit", "burst"),
        LinkPreset("m5.large-baseline", 750_000_000, "Up to 10 Gigabit", "baseline 0.75 Gbit/s"),
        LinkPreset("c5n.large", 25_000_000_000, "Up to 25 Gigabit", "burst"),
        LinkPreset("c5n.large-baseline", 3_000_000_000, "Up to 25 Gigabit", "baseline 3.0 Gbit/s"),
        LinkPreset("c5n.18xlarge", 100_000_000_000, "100 Gigabit", "sustained"),
    )
}

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?bit)(?:/s)?\s*$", re.IGNORECASE)


def parse_rate(text: str, key: str = "--bandwidth") -> int:
    """Bits per second of ``100mbit``, ``1gbit``, ``2.5gbit``... or of a preset name."""
    if text in PRESETS:
        return PRESETS[text].bits_per_s
    m = _RATE_RE.match(text)
    if not m:
        names = ", ".join(PRESETS)
        raise ConfigError(key, f"{text!r} is not a rate like 100mbit, 1gbit, 10gbit or a preset "
                               f"({names})")
    bps = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if bps < 8_000:
        raise ConfigError(key, f"{text!r} is below 8kbit, too slow to be useful")
    return bps


def format_rate(bps: int | None) -> str:
    """``100mbit``-style text of a rate; ``unshaped`` for None."""
    if bps is None:
        return "unshaped"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bps % _UNITS[unit] == 0:
            return f"{bps // _UNITS[unit]}{unit}"
    return f"{bps}bit"
