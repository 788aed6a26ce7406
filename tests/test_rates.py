"""Link rates (orchestrator/rates.py): text and presets to bits per second and back."""

from __future__ import annotations

import pytest

from orchestrator import rates
from orchestrator.errors import ConfigError


@pytest.mark.parametrize("text, bps", [
    ("100mbit", 100_000_000), ("1gbit", 10**9), ("10gbit", 10**10), ("2.5gbit", 2_500_000_000),
    ("500kbit", 500_000), ("20Mbit/s", 20_000_000), ("c5.large", 10**10),
    ("c5n.large", 25 * 10**9), ("c5.large-baseline", 750_000_000),
])
def test_parse_rate(text, bps):
    assert rates.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "100", "100mb", "100mbps", "-1gbit", "1bit", "c9.huge"])
def test_parse_rate_rejects_with_the_key(text):
    with pytest.raises(ConfigError, match="--bandwidth"):
        rates.parse_rate(text)


def test_format_rate_round_trips():
    for text in ("100mbit", "1gbit", "10gbit", "750mbit", "512mbit"):
        assert rates.format_rate(rates.parse_rate(text)) == text
    assert rates.format_rate(None) == "unshaped"


def test_every_preset_is_documented():
    for p in rates.PRESETS.values():
        assert p.bits_per_s >= 100_000_000 and p.aws_label and p.note
        assert rates.parse_rate(p.name) == p.bits_per_s
