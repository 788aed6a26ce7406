"""The ``netns`` provider: an emulated cluster on this Linux machine (root only).

Each node is an emulated host: its own network namespace ``rf-<cluster>-<rank>``
with an ``eth0`` on a bridge ``rfbr-<hash>`` in the root namespace, and its own
OpenSSH sshd started under ``unshare -m`` (a private mount namespace) that sees:

- a private tmpfs over the remote user's home (root: /root) and over /tmp, so
  each host starts with an empty home, as a fresh cloud node does;
- a private tmpfs over /etc/ssh holding that host's own host key, config and
  authorized_keys (the cluster's user key);
- the system python3 (/usr/bin/python3), and no package index: the namespace has
  no route beyond its bridge subnet, and this machine's pip configuration files
  (/etc/pip.conf, /etc/xdg/pip, ~/.config/pip) are hidden.

Links are shaped in both directions with ``tbf`` (egress of eth0 inside the
namespace, and egress of the bridge-side veth in the root namespace). There is
no delay emulation: ``netem`` is not available in this kernel.

Shared with the hosts: /dev/shm, the rest of the file system (read-write, as
root), the kernel, and the CPU. Processes see each other's PIDs.

Everything ``down`` needs is written to the state file before it is created,
and ``down`` also finds leftovers by name, so an ``up`` killed at any point
leaves nothing that ``down`` (or a re-run of ``up``) cannot clean.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from orchestrator.errors import ConfigError, RunError
from orchestrator.rates import format_rate, parse_rate

Progress = Callable[[str], None]

SYSTEM_PYTHON = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")  # one /24 per cluster inside it
STATE_FILE = "netns.json"
LOCK_FILE = "/run/relufit-netns.lock"
OWNERS_DIR = Path("/run/relufit-netns")  # <cluster name> -> the state dir that made it
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_SSHD_WAIT_S = 15.0
MAX_WORKERS = 250  # node r is .(r+2) of a /24


# ----------------------------------------------------------------- names and state
@dataclass(frozen=True)
class Names:
    """Every name one cluster uses; all derived from the cluster name, all prefixed."""

    cluster: str
    tag: str  # 6 hex digits of the cluster name's hash: interface names are at most 15 chars

    @property
    def bridge(self) -> str:
        return f"rfbr-{self.tag}"

    def namespace(self, rank: int) -> str:
        return f"rf-{self.cluster}-{rank}"

    def veth(self, rank: int) -> str:  # root-namespace side, a port of the bridge
        return f"rfv{self.tag}-{rank}"

    def peer(self, rank: int) -> str:  # host side before it moves into the namespace as eth0
        return f"rfp{self.tag}-{rank}"

    def is_namespace(self, ns: str) -> bool:
        return re.fullmatch(rf"rf-{re.escape(self.cluster)}-\d+", ns) is not None

    def is_link(self, link: str) -> bool:
        return link == self.bridge or re.fullmatch(rf"rf[vp]{self.tag}-\d+", link) is not None


def names_for(cluster: str) -> Names:
    """The names of cluster ``cluster``; raises ConfigError on a name we cannot use."""
    if not _NAME_RE.match(cluster):
        raise ConfigError("--name", f"{cluster!r}: use 1-40 of a-z, 0-9 and '-', "
                                    "starting with a letter or digit")
    return Names(cluster, hashlib.sha1(cluster.encode()).hexdigest()[:6])


@dataclass(frozen=True)
class Host:
    """One emulated host, as recorded in the state file."""

    rank: int
    namespace: str
    address: str
    veth: str
    host_dir: str
    host_key: str = ""  # "ssh-ed25519 AAAA..." once generated
    pid: int = 0  # its sshd, once started


@dataclass(frozen=True)
class NetnsCluster:
    """What ``up`` made: enough to reach every host, and for ``down`` to remove it all."""

    name: str
    state_dir: str
    subnet: str
    bridge: str
    bridge_address: str
    key_path: str  # the cluster's user key (private, 0600); .pub beside it
    known_hosts: str  # OpenSSH known_hosts file with every host's key
    user: str
    bandwidth_bps: int | None
    master_bandwidth_bps: int | None
    hosts: tuple[Host, ...]
    complete: bool = False

    @property
    def master(self) -> Host:
        return self.hosts[0]


def cluster_dir(name: str) -> Path:
    """Where a cluster's files live: $RELUFIT_HOME/clusters/<name> (default ~/.relufit)."""
    from orchestrator import cluster as model

    return model.cluster_dir(name)


def _write_state(c: NetnsCluster) -> None:
    path = Path(c.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(c), indent=1))
    os.replace(tmp, path)  # atomic: a kill leaves the old or the new state, never half


def load_state(name: str, state_dir: Path | None = None) -> NetnsCluster | None:
    """The recorded state of netns cluster ``name``, or None if it has none."""
    path = Path(state_dir or cluster_dir(name)) / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["hosts"] = tuple(Host(**h) for h in data["hosts"])
    return NetnsCluster(**data)


# ----------------------------------------------------------------- system commands
def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise RunError(f"netns: `{' '.join(args)}` failed: {err[-1] if err else proc.returncode}")
    return proc


def check_requirements() -> None:
    """Raise RunError naming the first thing this machine lacks for emulated hosts."""
    if not os.uname().sysname == "Linux":
        raise RunError("netns: emulated hosts need Linux network namespaces")
    if os.geteuid() != 0:
        raise RunError("netns: emulated hosts need root (run as root or with sudo)")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux"),
                      ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            raise RunError(f"netns: `{tool}` not found; install {pkg}")
    if not os.access(SSHD, os.X_OK):
        raise RunError(f"netns: {SSHD} not found; install openssh-server")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise RunError(f"netns: {SYSTEM_PYTHON} not found; install python3")


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    nets = re.findall(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out)
    return [ipaddress.ip_interface(n).network for n in nets]


def _pick_subnet(names: Names) -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 chosen from the name's hash; the next free one on a collision."""
    used = _used_networks()
    subnets = list(SUBNET_BASE.subnets(new_prefix=24))
    start = int(names.tag, 16) % len(subnets)
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise RunError(f"netns: no free /24 left in {SUBNET_BASE}")


def _ns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _is_our_sshd(pid: int, ns: str) -> bool:
    """Whether ``pid`` is still the sshd we started for ``ns`` (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RELUFIT_HOST={ns}".encode() in b" ".join(cmdline)


def _kill(pids: list[int]) -> None:
    """SIGTERM, a short grace, then SIGKILL, each by PID."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# ----------------------------------------------------------------- sshd in a private mount ns
# Runs as the host's sshd: records its PID, then builds the private view and execs sshd (same
# PID throughout: `ip netns exec`, `unshare` and `exec` all replace the process). Files are
# copied to /etc/ssh BEFORE the home and /tmp are hidden, since the state dir may be under them.
_HOST_SCRIPT = r"""
set -eu
hd="$1"; home="$2"; tag="$3"
mkdir -p /run/sshd && chmod 0755 /run/sshd
echo $$ > "$hd/sshd.pid"
mount -t tmpfs -o mode=0755,size=4m relufit-etc-ssh /etc/ssh
cp "$hd/sshd_config" "$hd/authorized_keys" "$hd/ssh_host_ed25519_key" \
   "$hd/ssh_host_ed25519_key.pub" /etc/ssh/
chmod 0600 /etc/ssh/ssh_host_ed25519_key
if [ -f "$hd/hosts" ]; then  # an emulated host: its own name, and the cluster's names
  hostname "$tag"
  cp "$hd/hosts" /etc/ssh/relufit-hosts && mount --bind /etc/ssh/relufit-hosts /etc/hosts
fi
if [ -d /etc/xdg/pip ]; then mount -t tmpfs -o mode=0755,size=1m relufit-nopip /etc/xdg/pip; fi
if [ -f /etc/pip.conf ]; then mount --bind /dev/null /etc/pip.conf; fi
mount -t tmpfs -o mode=0700,size=2g relufit-home "$home"
mount -t tmpfs -o mode=1777,size=1g relufit-tmp /tmp
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config -o "SetEnv=RELUFIT_HOST=$tag"
"""


def sshd_config(listen: str, port: int) -> str:
    """The sshd_config of an emulated host: key-only, root allowed with a key, SFTP on."""
    return "\n".join([
        f"ListenAddress {listen}",
        f"Port {port}",
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "AuthorizedKeysFile /etc/ssh/authorized_keys",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",  # PAM's session modules need a login-capable system; keys are enough here
        "PidFile none",  # the start script records the PID in the state dir instead
        "UseDNS no",
        "PrintMotd no",
        "MaxStartups 100:30:200",  # deploy opens many sessions at once
        "MaxSessions 50",
        "Subsystem sftp internal-sftp",
        "LogLevel INFO",
        "",
    ])


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at ``path`` (private 0600) and ``path``.pub; returns the public."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    os.chmod(path, 0o600)
    return Path(f"{path}.pub").read_text().strip()


def prepare_host_dir(host_dir: Path, listen: str, port: int, authorized_pub: str) -> str:
    """Write one host's sshd files (config, new host key, authorized_keys); returns its host key."""
    host_dir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(host_dir / "ssh_host_ed25519_key", f"relufit-host-{listen}")
    (host_dir / "sshd_config").write_text(sshd_config(listen, port))
    (host_dir / "authorized_keys").write_text(authorized_pub.strip() + "\n")
    return host_key


def start_sshd(host_dir: Path, tag: str, netns: str | None = None, home: str | None = None) -> int:
    """Start a host's sshd in its own mount and UTS namespaces (inside ``netns`` if given).

    Returns its PID. If ``host_dir/hosts`` exists, the host is named ``tag`` and sees that
    file as /etc/hosts. The process is detached (own session): it outlives the caller and
    is stopped by PID.
    """
    home = home or os.path.expanduser("~root")
    cmd = ["unshare", "-m", "-u", "--propagation", "private", "/bin/sh", "-c", _HOST_SCRIPT,
           "relufit-host", str(host_dir), home, tag]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(host_dir / "sshd.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    return proc.pid


def wait_for_sshd(address: str, port: int, pid: int, log: Path, timeout: float = _SSHD_WAIT_S,
                  ) -> None:
    """Block until sshd at address:port sends its banner; RunError with its log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise RunError(f"netns: sshd for {address} exited: {' | '.join(tail) or 'no log'}")
        try:
            with socket.create_connection((address, port), timeout=1.0) as s:
                s.settimeout(2.0)
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RunError(f"netns: sshd at {address}:{port} did not answer within {timeout:.0f} s")


# ----------------------------------------------------------------- shaping
def tbf_args(bps: int) -> list[str]:
    """``tc`` arguments of a token bucket at ``bps``; the bucket holds ~4 ms, at least 32 KiB."""
    burst = max(32 * 1024, bps // 8 // 250)
    return ["tbf", "rate", f"{bps}bit", "burst", str(burst), "latency", "50ms"]


def _shape(host: Host, bps: int | None) -> None:
    if bps is None:
        return
    _run(["ip", "netns", "exec", host.namespace, "tc", "qdisc", "replace", "dev", "eth0",
          "root", *tbf_args(bps)])  # host -> bridge
    _run(["tc", "qdisc", "replace", "dev", host.veth, "root", *tbf_args(bps)])  # bridge -> host


# ----------------------------------------------------------------- up / down
def _plan(names: Names, workers: int, bandwidth: int | None, master_bandwidth: int | None,
          state_dir: Path) -> NetnsCluster:
    net = _pick_subnet(names)
    addrs = list(net.hosts())  # .1 is the bridge, node r is .(r+2)
    hosts = tuple(
        Host(rank=r, namespace=names.namespace(r), address=str(addrs[r + 1]),
             veth=names.veth(r), host_dir=str(state_dir / "hosts" / str(r)))
        for r in range(workers + 1))
    return NetnsCluster(
        name=names.cluster, state_dir=str(state_dir), subnet=str(net), bridge=names.bridge,
        bridge_address=str(addrs[0]), key_path=str(state_dir / "id_ed25519"),
        known_hosts=str(state_dir / "known_hosts"), user="root", bandwidth_bps=bandwidth,
        master_bandwidth_bps=master_bandwidth, hosts=hosts)


@contextmanager
def _subnet_lock() -> Iterator[None]:
    with open(LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _make_bridge(c: NetnsCluster) -> None:
    prefix = ipaddress.ip_network(c.subnet).prefixlen
    _run(["ip", "link", "add", c.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{c.bridge_address}/{prefix}", "dev", c.bridge])
    _run(["ip", "link", "set", c.bridge, "up"])


def _make_host(c: NetnsCluster, names: Names, host: Host) -> None:
    prefix = ipaddress.ip_network(c.subnet).prefixlen
    ns, peer = host.namespace, names.peer(host.rank)
    _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer])
    _run(["ip", "link", "set", peer, "netns", ns])
    nsx = ["ip", "netns", "exec", ns]
    _run([*nsx, "ip", "link", "set", peer, "name", "eth0"])
    _run([*nsx, "ip", "addr", "add", f"{host.address}/{prefix}", "dev", "eth0"])
    _run([*nsx, "ip", "link", "set", "lo", "up"])
    _run([*nsx, "ip", "link", "set", "eth0", "up"])
    _run(["ip", "link", "set", host.veth, "master", c.bridge])
    _run(["ip", "link", "set", host.veth, "up"])


def up(name: str, workers: int, bandwidth: str | None = None,
       master_bandwidth: str | None = None, *, progress: Progress = lambda _: None,
       state_dir: Path | None = None) -> NetnsCluster:
    """Create ``workers`` + 1 emulated hosts (node 0 = master) and return the cluster.

    ``bandwidth`` shapes the workers' links, ``master_bandwidth`` node 0's (default: the same);
    None leaves links unshaped. On any failure or interrupt it removes what it made, then raises.
    """
    names = names_for(name)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError("--workers", f"{workers}: between 1 and {MAX_WORKERS} on one /24")
    bw = parse_rate(bandwidth) if bandwidth else None
    mbw = parse_rate(master_bandwidth, "--master-bandwidth") if master_bandwidth else bw
    check_requirements()
    state_dir = Path(state_dir or cluster_dir(name))
    _check_no_collision(names, state_dir)
    old = load_state(name, state_dir)
    found = leftovers(name, state_dir)
    if old is not None and old.complete and found:
        raise RunError(f"netns: cluster {name!r} is already up; "
                       f"`relufit cluster down {name}` first")
    if found:
        _check_owner(name, state_dir, old)
        progress(f"Cleaning up an earlier, interrupted `up` of {name}")
        down(name, progress=progress, state_dir=state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # it holds the cluster's private key
    with _subnet_lock():  # two `up`s at once must not pick the same free subnet
        c = _plan(names, workers, bw, mbw, state_dir)
        _write_state(c)  # before anything exists, so `down` knows every name
        _owner_file(name).parent.mkdir(parents=True, exist_ok=True)
        _owner_file(name).write_text(str(state_dir))
        try:
            _make_bridge(c)  # its address marks the subnet as used
        except BaseException:
            down(name, progress=progress, state_dir=state_dir)
            raise
    try:
        return _build(c, names, progress)
    except BaseException:
        progress(f"Cleaning up the emulated hosts of {name} after a failure")
        down(name, progress=progress, state_dir=state_dir)
        raise


def _owner_file(name: str) -> Path:
    """Names are machine-wide but state is per RELUFIT_HOME: this file says whose they are."""
    return OWNERS_DIR / name


def _check_owner(name: str, state_dir: Path, old: NetnsCluster | None) -> None:
    """Refuse to clean up namespaces and links of ``name`` that another RELUFIT_HOME made.

    Ours are always recorded: ``up`` writes its state before it creates anything.
    """
    owner = _owner_file(name)
    other = owner.read_text().strip() if owner.exists() else None
    if old is not None and other in (None, str(state_dir)):
        return
    where = f" (state in {other})" if other and other != str(state_dir) else ""
    raise RunError(f"netns: namespaces and links named for {name!r} exist on this machine but "
                   f"were not made from {state_dir}{where}; choose another --name, or remove "
                   f"them with `relufit cluster down {name}` under the RELUFIT_HOME that made them")


def _check_no_collision(names: Names, state_dir: Path) -> None:
    """Refuse a name whose 6-hex-digit tag another recorded netns cluster uses (1 in 16M)."""
    for other in state_dir.parent.glob(f"*/{STATE_FILE}"):
        data = json.loads(other.read_text())
        if data["name"] != names.cluster and data["bridge"] == names.bridge:
            raise ConfigError("--name", f"{names.cluster!r} shares its link names with netns "
                                        f"cluster {data['name']!r}; choose another name")


def _build(c: NetnsCluster, names: Names, progress: Progress) -> NetnsCluster:
    progress(f"Subnet {c.subnet}, bridge {c.bridge} at {c.bridge_address}")
    user_pub = keygen(Path(c.key_path), f"relufit-{c.name}")
    etc_hosts = "127.0.0.1 localhost\n" + "".join(
        f"{h.address} {h.namespace}\n" for h in c.hosts)
    hosts = []
    for h in c.hosts:
        rate = c.master_bandwidth_bps if h.rank == 0 else c.bandwidth_bps
        progress(f"Host {h.rank}: namespace {h.namespace} at {h.address}, link {format_rate(rate)}")
        _make_host(c, names, h)
        _shape(h, rate)
        key = prepare_host_dir(Path(h.host_dir), h.address, 22, user_pub)
        (Path(h.host_dir) / "hosts").write_text(etc_hosts)
        pid = start_sshd(Path(h.host_dir), h.namespace, netns=h.namespace)
        hosts.append(replace(h, host_key=key, pid=pid))
        c = replace(c, hosts=tuple(hosts) + c.hosts[len(hosts):])
        _write_state(c)
    progress(f"Waiting for sshd on {len(hosts)} hosts")
    for h in c.hosts:
        wait_for_sshd(h.address, 22, h.pid, Path(h.host_dir) / "sshd.log")
    Path(c.known_hosts).write_text(
        "".join(f"{h.address} {' '.join(h.host_key.split()[:2])}\n" for h in c.hosts))
    c = replace(c, complete=True)
    _write_state(c)
    _save_cluster(c)
    progress(f"Cluster {c.name} is up: master {c.master.address}, "
             f"{len(c.hosts) - 1} workers, ssh -i {c.key_path} root@{c.master.address}")
    return c


def _save_cluster(c: NetnsCluster) -> None:
    """Record it in the common cluster model, so deploy and run treat it like any cluster."""
    from orchestrator import cluster as model

    model.save_cluster(to_cluster(c))


def to_cluster(c: NetnsCluster):
    """The provider-neutral ``orchestrator.cluster.Cluster`` of an emulated cluster."""
    from orchestrator import cluster as model

    nodes = tuple(
        model.Node(rank=h.rank, role="master" if h.rank == 0 else "worker", address=h.address,
                   private_address=h.address, user=c.user, port=22)
        for h in c.hosts)
    extra = {"subnet": c.subnet, "bridge": c.bridge, "bridge_address": c.bridge_address,
             "bandwidth": format_rate(c.bandwidth_bps),
             "master_bandwidth": format_rate(c.master_bandwidth_bps)}
    return model.Cluster(name=c.name, provider="netns", nodes=nodes, key_path=c.key_path,
                         extra=extra)


def exists(name: str, state_dir: Path | None = None) -> bool:
    """Whether netns cluster ``name`` has a state file or anything left on this machine."""
    if load_state(name, state_dir) is not None:
        return True
    return shutil.which("ip") is not None and bool(leftovers(name, state_dir))


def leftovers(name: str, state_dir: Path | None = None) -> list[str]:
    """Namespaces, links and sshd PIDs of cluster ``name`` that still exist on this machine."""
    names = names_for(name)
    found = [ns for ns in _namespaces() if names.is_namespace(ns)]
    found += [link for link in _links() if names.is_link(link)]
    state = load_state(name, state_dir)
    if state is not None:
        found += [f"pid {h.pid}" for h in state.hosts if h.pid and _is_our_sshd(h.pid, h.namespace)]
    return found


def _forget(state: NetnsCluster | None, state_dir: Path) -> None:
    """Delete the cluster's files (record, keys, host dirs), keeping only the state file,
    marked as removed: a second ``relufit cluster down`` still knows it was a netns cluster."""
    shutil.rmtree(state_dir / "hosts", ignore_errors=True)
    for f in ("cluster.json", "known_hosts", "id_ed25519", "id_ed25519.pub"):
        (state_dir / f).unlink(missing_ok=True)
    if state is not None:
        _write_state(replace(state, complete=False,
                             hosts=tuple(replace(h, pid=0) for h in state.hosts)))


def down(name: str, *, progress: Progress = lambda _: None, state_dir: Path | None = None,
         ) -> None:
    """Remove every namespace, link, bridge and sshd of cluster ``name``; safe to run twice.

    Finds them from the state file AND by name on this machine, so it also cleans after an
    ``up`` that was killed. Then it deletes its own files from the state directory.
    """
    names = names_for(name)
    check_requirements()
    state_dir = Path(state_dir or cluster_dir(name))
    state = load_state(name, state_dir)
    owner = _owner_file(name)
    other = owner.read_text().strip() if owner.exists() else str(state_dir)
    if other != str(state_dir) and (Path(other) / STATE_FILE).exists():
        raise RunError(f"netns: cluster {name!r} on this machine was made from {other}, not "
                       f"{state_dir}: run `relufit cluster down {name}` with that RELUFIT_HOME")
    namespaces = {ns for ns in _namespaces() if names.is_namespace(ns)}
    pids = set()
    if state is not None:
        namespaces |= {h.namespace for h in state.hosts} & set(_namespaces())
        pids |= {h.pid for h in state.hosts if h.pid and _is_our_sshd(h.pid, h.namespace)}
    for ns in sorted(namespaces):
        pids |= set(_ns_pids(ns))
    if pids:
        progress(f"Stopping {len(pids)} processes of {name}")
        _kill(sorted(pids))
    for ns in sorted(namespaces):
        progress(f"Removing namespace {ns}")
        _run(["ip", "netns", "del", ns], check=False)
    for link in _links():  # the bridge and any veth whose namespace was never reached
        if names.is_link(link):
            progress(f"Removing link {link}")
            _run(["ip", "link", "del", link], check=False)
    remaining = leftovers(name, state_dir)
    if remaining:
        raise RunError(f"netns: could not remove {', '.join(remaining)}")
    _forget(state, state_dir)
    owner = _owner_file(name)
    if owner.exists() and owner.read_text().strip() == str(state_dir):
        owner.unlink()
    progress(f"Cluster {name}: nothing left")
