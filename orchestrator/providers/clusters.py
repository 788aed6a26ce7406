"""The cluster verbs for every provider: one ``up``, ``down``, ``status`` and ``listing``.

``relufit cluster ...`` and ``relufit launch`` both call these, so a cluster flag is checked,
and a cluster made or removed, in one place whatever the command. ``request`` does every
check of the flags and makes nothing: ``launch`` calls it before it spends anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from orchestrator import pricing, rates
from orchestrator.cluster import (
    DEFAULT_IDLE_MINUTES,
    Cluster,
    ClusterSpec,
    check_idle_minutes,
    check_name,
    load_cluster,
    load_spec,
    read_cluster,
)
from orchestrator.errors import ConfigError, RelufitError

Progress = Callable[[str], None]
Confirm = Callable[[str], bool]
DEFAULT_PROVIDER = "ec2"


@dataclass(frozen=True)
class UpRequest:
    """A checked request for a new cluster: ``up(request)`` makes it."""

    provider: str  # "ec2" | "netns" | "hosts"
    name: str
    workers: int  # worker nodes, besides the master
    spec: ClusterSpec | None = None  # ec2
    bandwidth: str | None = None  # netns
    master_bandwidth: str | None = None  # netns
    hosts_file: str | None = None  # hosts
    dry_run: bool = False  # ec2
    idle_minutes: float = DEFAULT_IDLE_MINUTES  # autostop (EC2: also in spec); 0: off

    def instance_types(self) -> list[str]:
        """EC2 instance type of each node, master first; [] for providers that cost nothing."""
        return self.spec.instance_types() if self.spec else []

    def usd_per_hour(self) -> float | None:
        """What the nodes cost per hour by the price table; None where there is no price."""
        if not self.spec:
            return None
        total, unknown = pricing.estimate(self.instance_types(), self.spec.volume_gb)
        return None if unknown else total


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def request(provider: str | None = None, *, spec_file: str | None = None,
            bandwidth: str | None = None, master_bandwidth: str | None = None,
            hosts_file: str | None = None, dry_run: bool = False,
            idle_minutes: float | None = None, **flags: Any) -> UpRequest:
    """Check the flags of ``cluster up`` (``flags``: name, workers and the EC2 flags, None
    where not given); a ConfigError names the first bad one. Nothing is made or asked."""
    provider = provider or DEFAULT_PROVIDER
    if provider == "hosts":
        req = _hosts_request(flags, hosts_file, bandwidth or master_bandwidth)
    elif hosts_file:
        raise ConfigError("--hosts-file", "only with --provider hosts")
    elif provider == "netns":  # --spec and --dry-run are EC2's: refused by name
        req = _netns_request({**flags, "spec": spec_file, "dry_run": dry_run or None},
                             bandwidth, master_bandwidth)
    elif bandwidth or master_bandwidth:
        raise ConfigError("--bandwidth", "shapes emulated links: only with --provider netns")
    else:
        spec = load_spec(spec_file, {**flags, "idle_minutes": idle_minutes})
        return UpRequest("ec2", spec.name, spec.workers, spec=spec, dry_run=dry_run,
                         idle_minutes=spec.idle_minutes)
    return replace(req, idle_minutes=check_idle_minutes(idle_minutes, provider))


def _netns_request(flags: dict[str, Any], bandwidth: str | None,
                   master_bandwidth: str | None) -> UpRequest:
    from orchestrator.providers import netns

    ec2_only = [k for k, v in flags.items() if v is not None and k not in ("name", "workers")]
    if ec2_only:
        raise ConfigError(_flag(ec2_only[0]), "only with --provider ec2")
    if not flags["name"]:
        raise ConfigError("--name", "an emulated cluster needs a name")
    netns.names_for(flags["name"])
    for key, rate in (("--bandwidth", bandwidth), ("--master-bandwidth", master_bandwidth)):
        if rate:
            rates.parse_rate(rate, key)
    return UpRequest("netns", flags["name"], flags["workers"] or 2, bandwidth=bandwidth,
                     master_bandwidth=master_bandwidth)


def _hosts_request(flags: dict[str, Any], hosts_file: str | None,
                   bandwidth: str | None) -> UpRequest:
    from orchestrator.providers import hosts

    others = [k for k, v in flags.items() if v is not None and k != "name"]
    if others or bandwidth:
        flag = _flag(others[0]) if others else "--bandwidth"
        raise ConfigError(flag, "not with --provider hosts: the hosts file lists the machines")
    if not hosts_file:
        raise ConfigError("--hosts-file", "--provider hosts needs --hosts-file hosts.toml")
    if not flags["name"]:
        raise ConfigError("--name", "a hosts cluster needs a name")
    listed = hosts.load_hosts_file(hosts_file, check_name(flags["name"]))
    return UpRequest("hosts", flags["name"], len(listed.nodes) - 1, hosts_file=hosts_file)


def up(req: UpRequest, *, confirm: Confirm, progress: Progress) -> Cluster | None:
    """Make the cluster of ``req`` (None for an EC2 dry run), autostop armed. Each provider
    removes what it made when ``up`` fails or is interrupted, then re-raises."""
    from orchestrator import autostop

    if req.provider == "hosts":
        from orchestrator.providers import hosts

        c = hosts.up(req.name, req.hosts_file, progress)
        return autostop.apply(c, req.idle_minutes, progress)
    if req.provider == "netns":
        from orchestrator.providers import netns

        netns.up(req.name, req.workers, req.bandwidth, req.master_bandwidth, progress=progress)
        return autostop.apply(load_cluster(req.name), req.idle_minutes, progress)
    from orchestrator.providers import ec2

    return ec2.up(req.spec, confirm=confirm, progress=progress, dry_run_only=req.dry_run)


def provider_of(name: str) -> str:
    """Which provider made cluster ``name``: its local record, else a netns leftover, else
    EC2 (whose tags are the truth even with no local state)."""
    from orchestrator.providers import netns

    local = read_cluster(check_name(name, "NAME"))
    return local.provider if local else "netns" if netns.exists(name) else "ec2"


def down(name: str, region: str | None, progress: Progress) -> None:
    """Remove cluster ``name`` and everything it made; safe to run twice."""
    provider = provider_of(name)
    if provider == "netns":  # also an `up` killed before it saved the cluster
        from orchestrator.providers import netns

        netns.down(name, progress=progress)
    elif provider == "hosts":
        from orchestrator.providers import hosts

        hosts.down(name, progress)
    elif provider == "ec2":
        from orchestrator.providers import ec2

        ec2.down(name, region, progress)
    else:
        raise RelufitError(f"`cluster down` for {provider} clusters is not available yet")


def find(name: str) -> Cluster:
    """The cluster ``name`` that is up, with current addresses (EC2: from its tags)."""
    from orchestrator.cluster import load_cluster

    c = read_cluster(check_name(name, "CLUSTER"))
    if c is not None and c.provider == "ec2":
        from orchestrator.providers import ec2

        c = ec2.find_cluster(name, c.region) or c
    return c or load_cluster(name)


def usd_per_hour(c: Cluster) -> float | None:
    """What cluster ``c``'s instances cost per hour by the price table (root volumes left
    out); None where there is no price (not EC2, or a type not in the table)."""
    if c.provider != "ec2":
        return None
    from orchestrator.providers import ec2

    _, rows = ec2.status(c.name, c.region)
    types = [r["type"] for r in rows if r["state"] in ("pending", "running")]
    total, unknown = pricing.estimate(types)
    return None if unknown or not types else total


# ---------------------------------------------------------------- status and list records

NODE_KEYS = ("rank", "role", "address", "private_address", "user", "port", "instance_id",
             "type", "state", "zone", "autostop")


def _local_node(n: Any) -> dict[str, Any]:
    return {"rank": n.rank, "role": n.role, "address": n.address,
            "private_address": n.private_address, "user": n.user, "port": n.port,
            "instance_id": n.instance_id, "type": None, "state": None, "zone": None,
            "autostop": None}


def _with_autostop(nodes: list[dict[str, Any]], states: list[Any]) -> list[dict[str, Any]]:
    """Each node's record with its autostop (state, seconds_left, text; None for a node
    that is not live)."""
    by_rank = {a.rank: {"state": a.state, "seconds_left": a.seconds_left, "text": a.text}
               for a in states}
    return [{**n, "autostop": by_rank.get(n["rank"])} for n in nodes]


def status(name: str, region: str | None) -> dict[str, Any]:
    """Cluster ``name`` as one record: name, provider, region and its ``nodes`` (the keys of
    ``NODE_KEYS``; state, type and zone are EC2's, None elsewhere; autostop is read from
    each node over SSH, see ``autostop.node_states``)."""
    from orchestrator import autostop
    from orchestrator.providers import netns

    local = read_cluster(check_name(name, "NAME"))
    if local is not None and local.provider != "ec2":
        return {"name": name, "provider": local.provider, "region": None,
                "nodes": _with_autostop([_local_node(n) for n in local.nodes],
                                        autostop.node_states(local))}
    if local is None and netns.exists(name):  # down, or an `up` that did not finish
        if netns.leftovers(name):
            raise RelufitError(f"netns cluster {name!r} is half made (an `up` did not finish): "
                               f"`relufit cluster down {name}` removes what is left")
        raise RelufitError(f"netns cluster {name!r} is down: `relufit cluster up --provider "
                           f"netns --name {name}` makes it again")
    from orchestrator.providers import ec2

    c, rows = ec2.status(name, region)
    if not rows:
        raise RelufitError(f"no cluster {name!r} found: `relufit cluster list` shows them")
    users = {n.rank: n.user for n in c.nodes} if c else {}
    nodes = [{"rank": r["rank"], "role": r["role"], "address": _known(r["public_ip"]),
              "private_address": _known(r["private_ip"]), "user": users.get(r["rank"]),
              "port": 22, "instance_id": r["instance_id"], "type": r["type"],
              "state": r["state"], "zone": _known(r["zone"])} for r in rows]
    launched = {r["rank"]: (r["idle_minutes"], r["launch_time"]) for r in rows}
    states = autostop.node_states(c, launched) if c else []  # c: its live nodes
    return {"name": name, "provider": "ec2", "region": c.region if c else region,
            "nodes": _with_autostop(nodes, states)}


def _known(value: str) -> str | None:
    """None for the "-" that ec2.status writes where a value is missing."""
    return None if value in ("-", "") else value


def listing(region: str | None, all_regions: bool, progress: Progress) -> list[dict[str, Any]]:
    """Every cluster: the netns and hosts clusters recorded here, then EC2 clusters with live
    instances. One record each: name, provider, region, nodes, master, link, age_hours,
    cost_so_far_usd, instance_types (None where a provider has no such thing)."""
    from orchestrator.cluster import local_clusters
    from orchestrator.providers import ec2

    mine = [{"name": c.name, "provider": c.provider, "region": None, "nodes": len(c.nodes),
             "master": c.master.address, "link": c.extra.get("bandwidth"), "age_hours": None,
             "cost_so_far_usd": None, "instance_types": []}
            for c in local_clusters() if c.provider != "ec2"]
    try:
        found = ec2.list_clusters(region, all_regions, progress)
    except ConfigError as e:
        if not mine or e.key != "--region":
            raise
        progress(f"(EC2 not searched: {e.why})")
        return mine
    return mine + [{"name": s.name, "provider": "ec2", "region": s.region, "nodes": s.instances,
                    "master": None, "link": None, "age_hours": round(s.age_h, 4),
                    "cost_so_far_usd": s.cost_so_far, "instance_types": list(s.types)}
                   for s in found]
