"""A dated table of EC2 on-demand prices, for the estimate `cluster up` shows before launching.

Prices are AWS's published on-demand list prices for Linux in us-east-1 (N. Virginia),
USD per instance-hour, as recorded on ``PRICES_AS_OF``; they were not fetched online
(relufit asks no pricing API). Other regions are typically 0-30% dearer, spot is usually
far cheaper; the estimate says so. A missing type gives no estimate rather than a guess.
"""

from __future__ import annotations

PRICES_AS_OF = "2024-06-01"
PRICES_REGION = "us-east-1"
GP3_USD_PER_GB_MONTH = 0.08
HOURS_PER_MONTH = 730

ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "t3.large": 0.0832,
    "t3.xlarge": 0.1664, "t3.2xlarge": 0.3328,
    "c5.large": 0.085, "c5.xlarge": 0.17, "c5.2xlarge": 0.34, "c5.4xlarge": 0.68,
    "c5.9xlarge": 1.53, "c5.12xlarge": 2.04, "c5.18xlarge": 3.06, "c5.24xlarge": 4.08,
    "c5n.large": 0.108, "c5n.xlarge": 0.216, "c5n.2xlarge": 0.432, "c5n.4xlarge": 0.864,
    "c5n.9xlarge": 1.944, "c5n.18xlarge": 3.888,
    "c6i.large": 0.085, "c6i.xlarge": 0.17, "c6i.2xlarge": 0.34, "c6i.4xlarge": 0.68,
    "m5.large": 0.096, "m5.xlarge": 0.192, "m5.2xlarge": 0.384, "m5.4xlarge": 0.768,
    "m5.8xlarge": 1.536, "m5.12xlarge": 2.304, "m5.16xlarge": 3.072, "m5.24xlarge": 4.608,
    "m6i.large": 0.096, "m6i.xlarge": 0.192, "m6i.2xlarge": 0.384,
}


def hourly(instance_type: str, volume_gb: int = 0) -> float | None:
    """On-demand USD per hour of one instance with a gp3 root volume; None if unknown."""
    price = ON_DEMAND_USD_PER_HOUR.get(instance_type)
    if price is None:
        return None
    return price + volume_gb * GP3_USD_PER_GB_MONTH / HOURS_PER_MONTH


def estimate(instance_types: list[str], volume_gb: int = 0) -> tuple[float, list[str]]:
    """Total USD per hour of the known types, and the types with no price on record."""
    prices = {t: hourly(t, volume_gb) for t in set(instance_types)}
    unknown = sorted(t for t, p in prices.items() if p is None)
    total = sum(prices[t] or 0.0 for t in instance_types)
    return total, unknown


def describe(instance_types: list[str], volume_gb: int = 0, spot: bool = False) -> str:
    """One line for the user: the estimate and where it comes from."""
    total, unknown = estimate(instance_types, volume_gb)
    source = (f"on-demand list prices for {PRICES_REGION} as of {PRICES_AS_OF}; "
              "other regions differ")
    if spot:
        source += "; spot is usually much cheaper"
    line = f"Estimated cost: ${total:.3f}/hour for {len(instance_types)} instances ({source})"
    if unknown:
        line += f"; no price on record for {', '.join(unknown)} (not included)"
    return line
