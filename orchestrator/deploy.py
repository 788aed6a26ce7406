"""SSH to the nodes of a cluster, and relufit onto them. The only module that imports paramiko.

- ``connect``: key-only SSH (no password, no agent, no ~/.ssh keys), retried with backoff
  while sshd comes up (timeouts, refused, no banner yet), failing fast on what retrying
  cannot fix (authentication, a changed host key). Host keys are pinned on first contact
  into the cluster's own known_hosts file and checked on every later contact.
- ``Session``: run a command, upload a file or bytes (with a mode), fetch a directory tree.
- ``on_all``: the same function on every node, in a bounded thread pool.
- ``deploy``: a wheel of exactly the relufit running here (``distribution.relufit_wheel``:
  from the source tree or the installed files), wheels of every runtime dependency for the
  node's own Python and platform (a node needs no package index), uploaded over SFTP; then
  the bootstrap script (package data) installs them, and ``relufit --version`` is checked.

Every failure is an ``SSHError`` printed as ``[host] message``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko

from orchestrator.cluster import Cluster
from orchestrator.distribution import bootstrap_path, cache_dir, relufit_wheel, wheel_requirements
from orchestrator.errors import RunError, SSHError
from worker.watchdog import TOUCH_COMMAND

Progress = Callable[[str], None]
T = TypeVar("T")

REMOTE_HOME_DIR = ".relufit"  # relative paths over SSH and SFTP start in the user's home
REMOTE_VENV = f"{REMOTE_HOME_DIR}/venv"
REMOTE_RELUFIT = f"{REMOTE_VENV}/bin/relufit"
REMOTE_WHEELHOUSE = f"{REMOTE_HOME_DIR}/wheelhouse"
REMOTE_BOOTSTRAP = f"{REMOTE_HOME_DIR}/bootstrap.sh"
MAX_PARALLEL = 16  # SSH sessions at once; enough for any cluster we launch, polite to sshd
CONNECT_TIMEOUT_S = 120.0  # overall, while sshd comes up (EC2 boots take a minute)
ATTEMPT_TIMEOUT_S = 10.0
KEEPALIVE_S = 15  # while following a run: a dead connection is noticed, not waited on forever


@dataclass(frozen=True)
class SSHTarget:
    """How to reach one node."""

    address: str
    user: str
    key_path: str
    known_hosts: str  # the cluster's own file: host keys pinned on first contact
    port: int = 22
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or (self.address if self.port == 22 else f"{self.address}:{self.port}")


def targets(cluster: Cluster) -> list[SSHTarget]:
    """One target per node of ``cluster``, in rank order."""
    return [SSHTarget(n.address, n.user, cluster.key_path, cluster.known_hosts, n.port,
                      f"node{n.rank} {n.address}" + (f":{n.port}" if n.port != 22 else ""))
            for n in cluster.nodes]


# ------------------------------------------------------------------------------ connecting

_known_hosts_lock = threading.Lock()
_pause = time.sleep  # the backoff between connect attempts (tests count them)


class _PinOnFirstContact(paramiko.MissingHostKeyPolicy):
    """Accept and save a host key only when the host is absent from the cluster's file.

    paramiko calls this policy only for unknown hosts; a host whose pinned key differs
    raises BadHostKeyException before we get here, so a changed key is never accepted.
    """

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key) -> None:
        with _known_hosts_lock:
            with open(self.path, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def load_key(target: SSHTarget) -> paramiko.PKey:
    """The cluster's private key; refuses a key others can read, as OpenSSH does."""
    path = Path(target.key_path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SSHError(target.name, f"no such key file {path}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SSHError(target.name, f"key {path} is readable by others; run: chmod 600 {path}")
    try:
        return paramiko.PKey.from_path(str(path))
    except paramiko.PasswordRequiredException:
        raise SSHError(target.name, f"key {path} is passphrase-protected; "
                                    "use an unencrypted key for the cluster") from None
    except (paramiko.SSHException, ValueError, OSError) as e:
        raise SSHError(target.name, f"cannot read key {path}: {e}") from None


def fingerprint(key: paramiko.PKey) -> str:
    """As OpenSSH shows it: ``ssh-ed25519 SHA256:...``."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def _fatal(target: SSHTarget, e: Exception) -> SSHError | None:
    """The SSHError for a failure that retrying cannot fix; None when it is transient."""
    if isinstance(e, paramiko.BadHostKeyException):
        return SSHError(target.name, f"host key changed (now {fingerprint(e.key)}), refusing "
                        "to connect; if the host was really rebuilt, delete its line from "
                        f"{target.known_hosts}")
    if isinstance(e, paramiko.AuthenticationException):
        return SSHError(target.name, f"authentication failed for user {target.user!r} with key "
                        f"{target.key_path} (is its public key in authorized_keys?)")
    if isinstance(e, (OSError, EOFError, paramiko.SSHException)):
        return None  # refused, timed out, unreachable, no banner yet, reset during negotiation
    return SSHError(target.name, f"{type(e).__name__}: {e}")


def connect(target: SSHTarget, timeout: float | None = None,
            attempt_timeout: float = ATTEMPT_TIMEOUT_S) -> paramiko.SSHClient:
    """An authenticated client, after retries with backoff for at most ``timeout`` seconds
    (default ``CONNECT_TIMEOUT_S``, read at call time so that tests can shorten it)."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    pkey = load_key(target)
    known = Path(target.known_hosts)
    known.parent.mkdir(parents=True, exist_ok=True)
    known.touch(mode=0o600, exist_ok=True)
    deadline, delay = time.monotonic() + timeout, 0.2
    while True:
        client = paramiko.SSHClient()
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(_PinOnFirstContact(str(known)))
        try:
            client.connect(
                target.address, port=target.port, username=target.user, pkey=pkey,
                look_for_keys=False, allow_agent=False, timeout=attempt_timeout,
                banner_timeout=attempt_timeout, auth_timeout=attempt_timeout,
            )
            return client
        except Exception as e:  # noqa: BLE001 - classified right below
            client.close()
            err = _fatal(target, e)
            if err is not None:
                raise err from None
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() + delay > deadline:
            raise SSHError(target.name, f"unreachable after {timeout:.0f} s ({last})")
        _pause(delay)
        delay = min(delay * 2, 5.0)


# ------------------------------------------------------------------------------ sessions


class Session:
    """One SSH connection to one node. Use as a context manager."""

    def __init__(self, target: SSHTarget, timeout: float | None = None):
        self.target = target
        self.client = connect(target, timeout)
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def run(self, command: str, check: bool = True, timeout: float | None = None) -> str:
        """Run ``command`` with sh; its output (stdout and stderr together).
        A non-zero exit raises SSHError with the last lines of output when ``check``."""
        rc, out = self.run_rc(command, timeout)
        if check and rc != 0:
            tail = " | ".join(out.strip().splitlines()[-5:])
            raise SSHError(self.target.name, f"exit {rc} from {command.split()[0]}: {tail}")
        return out

    def run_rc(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        """Exit code and output of ``command``; SSHError if the connection is lost."""
        try:
            chan = self.client.get_transport().open_session()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(self.target.name, f"connection lost: {e}") from None
        try:
            chan.set_combine_stderr(True)  # one stream: no deadlock on a full stderr window
            if timeout is not None:
                chan.settimeout(timeout)
            chan.exec_command(command)
            chunks = []
            try:
                while data := chan.recv(65536):
                    chunks.append(data)
            except TimeoutError:
                raise SSHError(self.target.name, f"timed out after {timeout} s: "
                                                 f"{command.split()[0]}") from None
            return chan.recv_exit_status(), b"".join(chunks).decode(errors="replace")
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(self.target.name, f"connection lost: {e}") from None
        finally:
            chan.close()

    def stream(self, command: str, on_line: Callable[[str], None]) -> int:
        """Run ``command``, handing each output line to ``on_line`` as it comes; exit code.
        A lost connection raises SSHError (keepalives find a silent one)."""
        transport = self.client.get_transport()
        transport.set_keepalive(KEEPALIVE_S)
        try:
            chan = transport.open_session()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(self.target.name, f"connection lost: {e}") from None
        try:
            chan.set_combine_stderr(True)
            chan.settimeout(0.5)  # wake up regularly: Ctrl-C is seen while output is quiet
            chan.exec_command(command)
            buf = b""
            while True:
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    if not transport.is_active():
                        raise SSHError(self.target.name, "connection lost") from None
                    continue
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    on_line(line.decode(errors="replace"))
            if not chan.exit_status_ready() and not transport.is_active():
                raise SSHError(self.target.name, "connection lost")
            if buf:
                on_line(buf.decode(errors="replace"))
            return chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(self.target.name, f"connection lost: {e}") from None
        finally:
            chan.close()

    def put(self, local: str | Path, remote: str, mode: int = 0o644) -> None:
        self.sftp.put(str(local), remote)
        self.sftp.chmod(remote, mode)

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o600) -> None:
        """Write ``data`` to ``remote``, created with ``mode`` before any byte is written
        (so a secret is never readable by others, even for a moment)."""
        with self.sftp.open(remote, "wb") as f:
            f.chmod(mode)
            f.write(data)

    def mkdir(self, remote: str, mode: int = 0o700) -> None:
        self.run(f"mkdir -p -m {mode:o} {shlex.quote(remote)}")

    def listdir_sizes(self, remote: str) -> dict[str, int]:
        try:
            return {a.filename: a.st_size for a in self.sftp.listdir_attr(remote)}
        except FileNotFoundError:
            return {}

    def get_tree(self, remote: str, local: str | Path) -> int:
        """Copy the directory ``remote`` to ``local`` (recursively); the number of files."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        count = 0
        for attr in self.sftp.listdir_attr(remote):
            src, dst = f"{remote}/{attr.filename}", local / attr.filename
            if stat.S_ISDIR(attr.st_mode):
                count += self.get_tree(src, dst)
            elif stat.S_ISREG(attr.st_mode):
                self.sftp.get(src, str(dst))
                count += 1
        return count

    def put_tree(self, local: str | Path, remote: str, skip: tuple[str, ...] = ()) -> int:
        """Copy the directory ``local`` to ``remote`` (recursively, files 0600, directories
        0700), leaving out top-level entries named in ``skip``; the number of files."""
        self.mkdir(remote)
        count = 0
        for path in sorted(Path(local).iterdir()):
            if path.name in skip:
                continue
            dst = f"{remote}/{path.name}"
            if path.is_dir():
                count += self.put_tree(path, dst)
            elif path.is_file():
                self.put(path, dst, 0o600)
                count += 1
        return count

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def on_all(targets: Iterable[SSHTarget], fn: Callable[[SSHTarget], T],
           progress: Progress = lambda line: None, max_workers: int = MAX_PARALLEL) -> list[T]:
    """``fn(target)`` on every target in parallel; results in order. If any failed, every
    failure is reported through ``progress`` and the first is raised."""
    targets = list(targets)
    if not targets:
        return []
    pool = ThreadPoolExecutor(max_workers=min(max_workers, len(targets)))
    try:
        futures = [pool.submit(fn, t) for t in targets]
        errors, results = [], []
        for t, fut in zip(targets, futures, strict=True):
            try:
                results.append(fut.result())
            except SSHError as e:
                errors.append(e)
            except (OSError, EOFError, paramiko.SSHException) as e:
                errors.append(SSHError(t.name, f"{type(e).__name__}: {e}"))
    except BaseException:
        # Ctrl-C: do not sit out the nodes' work (an install takes minutes) before the
        # caller's cleanup; what still runs ends when the cleanup drops its connections.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if errors:
        for e in errors[1:]:
            progress(f"  {e}")
        raise errors[0]
    return results


# ------------------------------------------------------------------------------ wheelhouse

@dataclass(frozen=True)
class NodePlatform:
    """What a node's system python3 is, as far as wheels care."""

    python: str  # "3.11"
    full_version: str  # "3.11.2"
    machine: str  # "x86_64", "aarch64"
    glibc: str  # "2.36"; "" on a non-glibc system

    @property
    def tag(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.platform_tags()[0]}"

    def platform_tags(self) -> list[str]:
        if not self.glibc:
            return [f"linux_{self.machine}"]
        major, minor = (int(x) for x in self.glibc.split(".")[:2])
        # pip does not expand a manylinux_2_N tag to older glibcs by itself: list them all,
        # newest first, down to manylinux2014 (glibc 2.17) and its legacy aliases
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        legacy = ["manylinux2014"]
        if self.machine in ("x86_64", "i686"):
            legacy += ["manylinux2010", "manylinux1"]
        return tags + [f"{name}_{self.machine}" for name in legacy]


def probe_platform(session: Session) -> NodePlatform:
    out = session.run(f"sh {REMOTE_BOOTSTRAP} probe")
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return NodePlatform(**json.loads(line))
    raise SSHError(session.target.name, f"could not read the node's python3: {out.strip()[-300:]}")


def _applicable(requirements: list[str], plat: NodePlatform) -> list[str]:
    """Requirements whose environment markers hold on the node (not on this machine)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
    env = {"python_version": plat.python, "python_full_version": plat.full_version,
           "platform_machine": plat.machine, "sys_platform": "linux", "platform_system": "Linux",
           "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def wheelhouse_dir(plat: NodePlatform) -> Path:
    return cache_dir() / "wheelhouse" / plat.tag


def build_wheelhouse(plat: NodePlatform, requirements: list[str],
                     progress: Progress = lambda line: None) -> Path:
    """Wheels of every runtime dependency (and pip) for ``plat``, downloaded once and kept
    under <cache>/wheelhouse/<tag>/ (see ``cache_dir``)."""
    with _wheelhouse_lock:  # nodes of one platform share it: download once
        return _build_wheelhouse(plat, sorted(_applicable(requirements, plat)) + ["pip"], progress)


_wheelhouse_lock = threading.Lock()


def _build_wheelhouse(plat: NodePlatform, reqs: list[str], progress: Progress) -> Path:
    out = wheelhouse_dir(plat)
    stamp = out / ".requirements"
    if stamp.exists() and stamp.read_text() == "\n".join(reqs):
        return out
    progress(f"downloading wheels for {plat.tag}: {', '.join(reqs)}")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", plat.python,
           "-d", str(out)]
    for tag in plat.platform_tags():
        cmd += ["--platform", tag]
    proc = subprocess.run(cmd + reqs, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunError(f"could not gather wheels for {plat.tag}: {proc.stderr.strip()[-500:]}")
    stamp.write_text("\n".join(reqs))
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ------------------------------------------------------------------------------ deploy

@dataclass(frozen=True)
class NodeReport:
    """What deploy did on one node."""

    node: str
    platform: str
    version: str
    uploaded_bytes: int
    seconds: float


def upload_missing(session: Session, local_dir: Path, remote_dir: str) -> int:
    """Upload the files of ``local_dir`` that ``remote_dir`` lacks (same name and size);
    the number of bytes sent. Wheels are immutable by name, so this is a safe cache."""
    session.mkdir(remote_dir)
    have = session.listdir_sizes(remote_dir)
    sent = 0
    for f in sorted(local_dir.glob("*.whl")):
        size = f.stat().st_size
        if have.get(f.name) != size:
            session.put(f, f"{remote_dir}/{f.name}")
            sent += size
    return sent


def install_node(target: SSHTarget, wheel: Path, requirements: list[str],
                 from_index: bool = False, progress: Progress = lambda line: None) -> NodeReport:
    """Put relufit on one node: bootstrap script, wheels, venv, install, verify."""
    t0 = time.monotonic()
    with Session(target) as s:
        s.mkdir(REMOTE_HOME_DIR)
        s.run(TOUCH_COMMAND)  # a deploy is activity: autostop's idle clock starts again
        s.put(bootstrap_path(), REMOTE_BOOTSTRAP, 0o755)
        plat = probe_platform(s)
        progress(f"[{target.name}] python {plat.full_version} {plat.machine} ({plat.tag})")
        sent = 0
        args = ["install", "--wheel", f"{REMOTE_HOME_DIR}/wheels/{wheel.name}"]
        if from_index:
            args.append("--index")
        else:
            house = build_wheelhouse(plat, requirements, progress)
            sent += upload_missing(s, house, REMOTE_WHEELHOUSE)
            args += ["--wheelhouse", REMOTE_WHEELHOUSE]
        s.mkdir(f"{REMOTE_HOME_DIR}/wheels")
        s.put(wheel, f"{REMOTE_HOME_DIR}/wheels/{wheel.name}")
        sent += wheel.stat().st_size
        progress(f"[{target.name}] uploaded {sent / 1e6:.1f} MB; installing")
        out = s.run(f"sh {REMOTE_BOOTSTRAP} {' '.join(shlex.quote(a) for a in args)}",
                    timeout=900)
        for line in out.splitlines():
            if line.startswith("bootstrap: "):
                progress(f"[{target.name}] {line[len('bootstrap: '):]}")
        version = s.run(f"{REMOTE_RELUFIT} --version").strip()
        s.run(TOUCH_COMMAND)  # and its end: an install may outlast a short idle limit
    seconds = time.monotonic() - t0
    progress(f"[{target.name}] ok: {version} ({seconds:.1f} s)")
    return NodeReport(target.name, plat.tag, version, sent, seconds)


def deploy(targets: list[SSHTarget], from_index: bool = False,
           progress: Progress = lambda line: None) -> list[NodeReport]:
    """Install this exact relufit on every node, in parallel; one report per node."""
    shipped = relufit_wheel()
    wheel = shipped.path
    progress(f"wheel {wheel.name} ({wheel.stat().st_size / 1e3:.0f} kB, {shipped.origin})")
    reqs = wheel_requirements(wheel)
    lock = threading.Lock()

    def one(t: SSHTarget) -> NodeReport:
        return install_node(t, wheel, reqs, from_index, _locked(progress, lock))

    return on_all(targets, one, progress)


def _locked(progress: Progress, lock: threading.Lock) -> Progress:
    def say(line: str) -> None:
        with lock:
            progress(line)
    return say


def prepare_image(cluster: Cluster, progress: Progress = lambda line: None) -> None:
    """The SSH half of `relufit ami build`: relufit and its dependencies on the builder, then
    remove what must not be baked into an image (the builder's login key, shell history)."""
    deploy(targets(cluster), progress=progress)

    def clean(t: SSHTarget) -> None:
        with Session(t) as s:
            s.run("rm -f ~/.ssh/authorized_keys ~/.bash_history; "
                  "sudo -n cloud-init clean --logs >/dev/null 2>&1 || true")

    on_all(targets(cluster), clean, progress)
