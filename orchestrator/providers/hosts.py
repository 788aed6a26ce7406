"""The ``hosts`` provider: machines you already have, listed in a hosts file (TOML).

```toml
user = "ubuntu"                 # optional: default, your user name here
key = "~/.ssh/id_ed25519"       # the private key every host accepts (mode 0600)
master_port = 5555              # optional: the TCP port node 0's master listens on
[[host]]                        # node 0 (the first) runs the master, the rest the workers
address = "10.0.0.5"
port = 22                       # optional
user = "admin"                  # optional: this host's login, if not the default
private_address = "192.168.1.5" # optional: how the other hosts reach it (default: address)
```

``up`` validates the file (``ConfigError(key, why)`` naming e.g. ``host[2].port``), checks
that every host answers over SSH (pinning its host key into the cluster's known_hosts),
and saves a ``Cluster`` with provider ``"hosts"``. ``down`` stops relufit's processes on
the hosts (autostop's watchdog too) and forgets the cluster locally; the machines
themselves are left alone.
"""

from __future__ import annotations

import difflib
import getpass
import ipaddress
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import cluster as model
from orchestrator.cluster import Cluster, Node
from orchestrator.errors import ConfigError, RelufitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Progress = Callable[[str], None]
MASTER_PORT = 5555

TOP_KEYS = ("user", "key", "master_port", "host")
HOST_KEYS = ("address", "port", "user", "private_address")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _unknown(key: str, where: str, known: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"{where}{key}", "unknown key" + hint)


def _address(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, "must be a host name or IP address string")
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if _HOSTNAME_RE.match(value):
            return value
    raise ConfigError(key, f"{value!r} is not a host name or IP address")


def _user(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _USER_RE.match(value):
        raise ConfigError(key, f"{value!r} is not a user name")
    return value


def _key_path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("key", "must be the path of a private key, e.g. \"~/.ssh/id_ed25519\"")
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError("key", f"{path}: no such file")
    if path.stat().st_mode & 0o077:
        raise ConfigError("key", f"{path} is readable by others; run: chmod 600 {path}")
    return str(path)


def _host(i: int, h: Any, default_user: str) -> Node:
    where = f"host[{i}]"
    if not isinstance(h, dict):
        raise ConfigError(where, "must be a table: [[host]] address = \"...\"")
    for k in h:
        if k not in HOST_KEYS:
            raise _unknown(k, f"{where}.", HOST_KEYS)
    if "address" not in h:
        raise ConfigError(f"{where}.address", "missing: every [[host]] needs an address")
    address = _address(h["address"], f"{where}.address")
    port = h.get("port", 22)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}.port", f"must be a port number 1-65535, got {port!r}")
    private = _address(h.get("private_address", address), f"{where}.private_address")
    return Node(rank=i, role="master" if i == 0 else "worker", address=address,
                private_address=private, user=_user(h.get("user", default_user), f"{where}.user"),
                port=port)


def parse_hosts(data: dict[str, Any], name: str) -> Cluster:
    """A hosts file's contents as a Cluster (not saved); ConfigError on any problem."""
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown(k, "", TOP_KEYS)
    if "key" not in data:
        raise ConfigError("key", "missing: the private key every host accepts, "
                                 "e.g. key = \"~/.ssh/id_ed25519\"")
    key = _key_path(data["key"])
    user = _user(data.get("user", getpass.getuser()), "user")
    hosts = data.get("host")
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError("host", "no hosts: add one [[host]] table per machine "
                                  "(the first runs the master)")
    nodes = [_host(i, h, user) for i, h in enumerate(hosts)]
    seen: dict[tuple[str, int], int] = {}
    for n in nodes:
        if (n.address, n.port) in seen:
            raise ConfigError(f"host[{n.rank}].address", f"{n.address}:{n.port} is listed twice "
                                                         f"(also host[{seen[n.address, n.port]}])")
        seen[n.address, n.port] = n.rank
    port = data.get("master_port", MASTER_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
        raise ConfigError("master_port", f"must be a port number 1024-65535, got {port!r}")
    return Cluster(name=model.check_name(name), provider="hosts", nodes=tuple(nodes), key_path=key,
                   extra={"master_port": port})


def load_hosts_file(path: str | Path, name: str) -> Cluster:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--hosts-file", f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--hosts-file", f"{path} is not valid TOML: {e}") from None
    return parse_hosts(data, name)


def up(name: str, hosts_file: str | Path, progress: Progress = lambda line: None) -> Cluster:
    """Check every host of ``hosts_file`` over SSH (pinning host keys) and save the cluster."""
    from orchestrator import deploy

    c = load_hosts_file(hosts_file, name)
    old = model.read_cluster(name)
    if old is not None and old.provider != "hosts":
        raise RelufitError(f"cluster {name!r} already exists ({old.provider}); pick another "
                           "--name or take it down first")
    created = not model.cluster_dir(name).exists()
    model.make_cluster_dir(name)
    try:
        progress(f"checking {len(c.nodes)} host(s) over SSH")

        def check(t: deploy.SSHTarget) -> str:
            with deploy.Session(t, timeout=30) as s:
                out = s.run("python3 --version 2>&1 || echo no python3", check=False).strip()
            progress(f"  [{t.name}] reachable; {out}")
            return out

        deploy.on_all(deploy.targets(c), check, progress)
    except BaseException:
        if created:
            model.remove_cluster_state(name)
        raise
    model.save_cluster(c)
    progress(f"cluster {name}: {len(c.nodes)} host(s), master {c.master.address}")
    return c


def down(name: str, progress: Progress = lambda line: None) -> bool:
    """Stop relufit's processes on the hosts, autostop's watchdog included (best effort), and
    forget the cluster here."""
    from orchestrator import autostop, remote

    c = model.read_cluster(name)
    if c is None:
        return False
    if c.provider != "hosts":
        raise RelufitError(f"cluster {name!r} is a {c.provider} cluster, not hosts")
    for stop in (lambda: autostop.disarm(c, progress), lambda: remote.stop(c, None, progress)):
        try:  # each on every host it reaches, whatever the other did
            stop()
        except RelufitError as e:
            progress(f"could not stop processes on every host ({e}); forgetting the cluster "
                     "anyway")
    model.remove_cluster_state(name)
    progress(f"forgot hosts cluster {name} (the machines are untouched)")
    return True
