"""The provider-neutral cluster model, its local state, and the EC2 cluster spec.

Every provider (``ec2``, ``hosts``, ``netns``) describes what it made as one ``Cluster``;
deploy, run and ``relufit cluster ssh`` only ever see this model, never the provider.

``Node``
    One machine. ``rank`` 0 is the master (``role="master"``), ranks 1..N are workers.
    ``address`` is what *this* machine reaches over SSH (a public IP on EC2),
    ``private_address`` what the other nodes use to reach it (the VPC address on EC2;
    the same as ``address`` for hosts and netns). ``instance_id`` is set on EC2 only.
``Cluster``
    ``name``, ``provider``, ``nodes`` (rank order), ``key_path`` (the private key every
    node accepts), ``region`` (EC2 only) and ``extra`` (provider-specific JSON values,
    e.g. the EC2 security group id). ``cluster.master`` is node 0.

Local state lives under ``$RELUFIT_HOME`` (default ``~/.relufit``)::

    clusters/<name>/            mode 0700
        cluster.json            the Cluster, as JSON (written atomically)
        id_ed25519              the cluster's private key (mode 0600; EC2 generates it)
        known_hosts             pinned host keys (written by deploy)

For EC2 this is a cache: the truth is the ``relufit:cluster`` tags in the account, and
``providers.ec2.find_cluster`` rebuilds the nodes from them. Losing ``~/.relufit`` loses
only the private key (SSH access), never track of what is billing.

``ClusterSpec`` is what ``relufit cluster up`` (EC2) is asked to make: a TOML file
(``--spec``) whose keys are the flag names with ``_`` for ``-``, overridden by flags.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from orchestrator.errors import ConfigError, RelufitError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROVIDERS = ("ec2", "hosts", "netns")
ROLES = ("master", "worker")
STATE_FILE = "cluster.json"
KEY_FILE = "id_ed25519"
KNOWN_HOSTS_FILE = "known_hosts"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


@dataclass(frozen=True, kw_only=True)
class Node:
    """One machine of a cluster; rank 0 is the master."""

    rank: int
    role: str  # "master" | "worker"
    address: str  # reached from the user's machine (SSH)
    private_address: str  # reached from the other nodes
    user: str
    port: int = 22
    instance_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """What a provider made: enough to reach every node over SSH."""

    name: str
    provider: str  # "ec2" | "hosts" | "netns"
    nodes: tuple[Node, ...]
    key_path: str
    region: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept any sequence (lists come back from JSON) but keep the model immutable.
        object.__setattr__(self, "nodes", tuple(self.nodes))

    @property
    def master(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> tuple[Node, ...]:
        return self.nodes[1:]

    @property
    def known_hosts(self) -> str:
        return str(cluster_dir(self.name) / KNOWN_HOSTS_FILE)


def check_name(name: str, key: str = "--name") -> str:
    """``name`` if it can name a cluster (it becomes part of AWS names and file paths)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(key, f"{name!r}: use 1-40 of a-z, 0-9 and '-', starting with a "
                               "letter or digit")
    return name


def relufit_home() -> Path:
    return Path(os.environ.get("RELUFIT_HOME") or Path.home() / ".relufit").expanduser()


def cluster_dir(name: str) -> Path:
    """``$RELUFIT_HOME/clusters/<name>`` (not created)."""
    return relufit_home() / "clusters" / check_name(name)


def make_cluster_dir(name: str) -> Path:
    """The cluster's directory, created with mode 0700 (it holds a private key)."""
    path = cluster_dir(name)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def key_path(name: str) -> Path:
    return cluster_dir(name) / KEY_FILE


def write_private_key(name: str, pem: bytes) -> Path:
    """Write a private key with mode 0600 from the start (never readable by others)."""
    path = make_cluster_dir(name) / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.chmod(0o600)  # O_CREAT's mode does not apply to an existing file
    return path


def new_key_pair(name: str) -> str:
    """Generate the cluster's ed25519 key: private half to ``id_ed25519`` (0600), public
    half returned as an OpenSSH line (``ssh-ed25519 AAAA... relufit-<name>``)."""
    key = Ed25519PrivateKey.generate()
    write_private_key(name, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH,
                                              NoEncryption()))
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{public} relufit-{name}"


def save_cluster(c: Cluster) -> Path:
    """Write ``cluster.json`` atomically; returns its path."""
    path = make_cluster_dir(c.name) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(c), indent=1))
    os.replace(tmp, path)
    return path


def cluster_from_dict(d: dict[str, Any]) -> Cluster:
    nodes = tuple(Node(**n) for n in d["nodes"])
    return Cluster(**{**d, "nodes": nodes})


def read_cluster(name: str) -> Cluster | None:
    """The locally recorded cluster ``name``, or None."""
    path = cluster_dir(name) / STATE_FILE
    if not path.exists():
        return None
    return cluster_from_dict(json.loads(path.read_text()))


def local_clusters() -> list[Cluster]:
    """Every cluster recorded on this machine, by name (unreadable records are skipped)."""
    found = []
    for path in sorted((relufit_home() / "clusters").glob(f"*/{STATE_FILE}")):
        try:
            found.append(cluster_from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return found


def load_cluster(name: str) -> Cluster:
    """The locally recorded cluster ``name``; a RelufitError naming the fix if there is none."""
    c = read_cluster(name)
    if c is None:
        raise RelufitError(f"no cluster {name!r} on this machine ({cluster_dir(name)}): "
                           f"create it with `relufit cluster up --name {name}`")
    return c


def remove_cluster_state(name: str) -> bool:
    """Delete ``clusters/<name>/`` (key included); True if there was something to delete."""
    path = cluster_dir(name)
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def ssh_argv(c: Cluster, rank: int = 0, *command: str) -> list[str]:
    """argv of the OpenSSH client to node ``rank``, with the cluster's key and known_hosts.

    ``accept-new`` pins a host key on first contact and refuses a changed one.
    """
    if not 0 <= rank < len(c.nodes):
        raise ConfigError("--rank", f"{rank} is not a node of {c.name!r} "
                                    f"(ranks 0..{len(c.nodes) - 1})")
    if not Path(c.key_path).exists():
        raise RelufitError(f"the key of cluster {c.name!r} is missing ({c.key_path}): it was "
                           f"generated by the machine that ran `relufit cluster up`")
    n = c.nodes[rank]
    return ["ssh", "-i", c.key_path, "-p", str(n.port), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={c.known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
            f"{n.user}@{n.address}", *command]


# ---------------------------------------------------------------- the EC2 cluster spec


@dataclass(frozen=True)
class ClusterSpec:
    """An EC2 cluster: one master instance plus ``workers`` worker instances."""

    name: str
    workers: int = 2
    region: str | None = None  # None: AWS_REGION, AWS_DEFAULT_REGION, then the profile's
    instance_type: str = "c5.large"
    master_instance_type: str | None = None  # None: instance_type
    ami: str | None = None  # None: newest relufit:ami image, else newest Ubuntu LTS
    spot: bool = False
    subnet: str | None = None
    availability_zone: str | None = None
    ssh_cidr: str | None = None  # None: this machine's public IP as a /32
    max_hours: float = 4.0  # kill switch: every instance shuts down (terminates) after this
    user: str = "ubuntu"  # the AMI's login user
    volume_gb: int = 16
    idle_minutes: float = 30.0  # autostop: each node terminates after this long idle; 0: off

    @property
    def master_type(self) -> str:
        return self.master_instance_type or self.instance_type

    def instance_types(self) -> list[str]:
        """Instance type of each rank (0 = master)."""
        return [self.master_type] + [self.instance_type] * self.workers


DEFAULT_IDLE_MINUTES = ClusterSpec.idle_minutes
EC2_MIN_IDLE_MINUTES = 5.0  # a node boots, passes status checks and gets deployed first
MAX_IDLE_MINUTES = 7 * 24 * 60.0


def check_idle_minutes(value: float | None, provider: str) -> float:
    """``--idle-minutes`` (None: the default) if usable for ``provider``; else ConfigError."""
    value = DEFAULT_IDLE_MINUTES if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_IDLE_MINUTES:
        raise ConfigError("--idle-minutes", f"{value!r}: between 0 (no autostop) and "
                                            f"{MAX_IDLE_MINUTES:g} minutes")
    if provider == "ec2" and 0 < value < EC2_MIN_IDLE_MINUTES:
        raise ConfigError("--idle-minutes", f"{value:g}: at least {EC2_MIN_IDLE_MINUTES:g} on "
                          "EC2 (a node boots, passes its status checks and is deployed before "
                          "its first run), or 0 for no autostop")
    return float(value)


_SPEC_TYPES = {f.name: f.type for f in fields(ClusterSpec)}
_INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_ssh_cidr(cidr: str) -> str:
    """A normalised IPv4/IPv6 network; the whole internet is refused."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ConfigError("--ssh-cidr", f"{cidr!r} is not a network such as 203.0.113.7/32") \
            from None
    if net.prefixlen == 0:
        raise ConfigError("--ssh-cidr", f"{cidr} opens SSH to the whole internet; "
                                        "give your own address, e.g. 203.0.113.7/32")
    return str(net)


def _check_type(key: str, value: Any) -> Any:
    want = _SPEC_TYPES[key]
    if "bool" in want:
        ok = isinstance(value, bool)
    elif "int" in want:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in want:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(_flag(key), f"{value!r} is not a {want.split(' ')[0]}")
    return value


def validate_spec(s: ClusterSpec) -> ClusterSpec:
    """``s`` if every field is usable; else ConfigError naming the flag and why."""
    check_name(s.name)
    if s.workers < 1:
        raise ConfigError("--workers", f"{s.workers}: a cluster needs at least 1 worker")
    if s.workers > 256:
        raise ConfigError("--workers", f"{s.workers}: at most 256")
    for key in ("instance_type", "master_instance_type"):
        value = getattr(s, key)
        if value is not None and not _INSTANCE_TYPE_RE.match(value):
            raise ConfigError(_flag(key), f"{value!r} is not an instance type such as c5.large")
    if not 0 < s.max_hours <= 168:
        raise ConfigError("--max-hours", f"{s.max_hours}: between 0 and 168 hours")
    if s.subnet and s.availability_zone:
        raise ConfigError("--subnet", "give --subnet or --availability-zone, not both "
                                      "(a subnet lies in one zone)")
    if s.ami is not None and not re.match(r"^ami-[0-9a-f]+$", s.ami):
        raise ConfigError("--ami", f"{s.ami!r} is not an AMI id such as ami-0123456789abcdef0")
    if s.ssh_cidr is not None:
        s = replace(s, ssh_cidr=check_ssh_cidr(s.ssh_cidr))
    if not 8 <= s.volume_gb <= 1024:
        raise ConfigError("--volume-gb", f"{s.volume_gb}: between 8 and 1024")
    return replace(s, idle_minutes=check_idle_minutes(s.idle_minutes, "ec2"))


def load_spec(path: str | None, flags: dict[str, Any]) -> ClusterSpec:
    """The spec of TOML file ``path`` (if any) with every non-None flag on top, validated."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise ConfigError("--spec", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--spec", f"{path} is not valid TOML: {e}") from None
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(_SPEC_TYPES))
        if unknown:
            raise ConfigError(unknown[0], f"unknown key in {path}; known keys: "
                                          f"{', '.join(_SPEC_TYPES)}")
    values.update({k: v for k, v in flags.items() if v is not None})
    if "name" not in values:
        raise ConfigError("--name", "every cluster needs a name: pass --name or name = ... "
                                    "in the spec file")
    values = {k: _check_type(k, v) for k, v in values.items()}
    return validate_spec(ClusterSpec(**values))
