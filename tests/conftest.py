"""Shared fixtures: emulated hosts for the netns and deploy tests (owned by the netns area).

Fixtures (all clean up every process, namespace and file they made):

``relufit_home`` -> Path
    A fresh RELUFIT_HOME (set in the environment) so clusters never touch ~/.relufit.

``sshd_host`` -> SshdHost
    One OpenSSH sshd on 127.0.0.1:<free port>, already answering, running as root in a
    private mount namespace with an empty tmpfs over /root and /tmp. Attributes: ``host``,
    ``port``, ``user`` ("root"), ``key_path`` (the authorized user key, 0600), ``host_key``
    ("ssh-ed25519 AAAA..."), ``known_hosts`` (a file pinning it as ``[127.0.0.1]:port``),
    ``dir``, ``pid``, ``log``. Methods: ``start()``, ``stop()``, ``start_later(seconds)``
    (sshd comes up late), ``rotate_host_key()`` (restarts with a new host key; the known_hosts
    file keeps the old one), ``new_key(name)`` (a key sshd does not accept), ``home(path)``
    (a path in its private home, readable from the test), ``ssh(*cmd)`` (the ssh client's
    argv). A restart gives a fresh empty home. ``stop()`` also ends every process its
    sessions left in its mount namespace (``in_mount_namespace_of(pid)``).

``netns_cluster`` -> factory ``(workers=2, bandwidth=None, master_bandwidth=None) -> NetnsCluster``
    Emulated hosts (orchestrator.providers.netns): node 0 + ``workers``, each with its own
    network namespace, address, sshd, empty home; saved as a cluster under ``relufit_home``.

``host_ssh`` -> function ``(cluster, rank, *cmd) -> subprocess.CompletedProcess``
    Runs ``cmd`` on one emulated host with the real ssh client, host key checked.

Both need root, ip, tc, unshare and sshd. Outside CI they skip when something is missing;
with CI=true they fail instead.

``moto_server`` -> str
    moto_server on 127.0.0.1:<free port> (its URL), killed by PID at the end.

``aws_env`` -> dict
    The environment of a user with fake credentials whose AWS_ENDPOINT_URL is
    ``moto_server``, in ``MOTO_REGION``, with RELUFIT_HOME under the test's tmp_path. With
    ``moto_client(env)`` (a boto3 EC2 client of it) and ``relufit_image(client)`` (a
    relufit:ami image there: moto has no Ubuntu 22.04+ for `cluster up` to find).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from orchestrator.errors import RunError
from orchestrator.providers import ec2, netns

MOTO_REGION = "us-east-1"


def require_emulated_hosts() -> None:
    """Skip (outside CI) or fail (CI=true) unless this machine can run emulated hosts."""
    try:
        netns.check_requirements()
    except RunError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must be able to run emulated hosts: {e}")
        pytest.skip(str(e))


def ssh_argv(key_path: str, known_hosts: str, user: str, host: str, port: int,
             *cmd: str) -> list[str]:
    """argv of the OpenSSH client: key only, host key checked against ``known_hosts``."""
    return ["ssh", "-i", key_path, "-p", str(port), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{user}@{host}", *cmd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshdHost:
    """One sshd on 127.0.0.1 with its own host key, user key and private empty home."""

    def __init__(self, base: Path):
        self.dir = base
        base.mkdir(parents=True, exist_ok=True)
        self.host, self.port, self.user = "127.0.0.1", free_port(), "root"
        self.key_path = str(base / "id_ed25519")
        self.known_hosts = str(base / "known_hosts")
        self.log = base / "sshd.log"
        self.pid = 0
        self._timer: threading.Timer | None = None
        self._tag = f"rf-sshd-{secrets.token_hex(4)}"  # marks its cmdline; see netns._is_our_sshd
        pub = netns.keygen(Path(self.key_path), "relufit-test-user")
        self.host_key = netns.prepare_host_dir(base, self.host, self.port, pub)
        self._pin()

    def _pin(self) -> None:
        Path(self.known_hosts).write_text(
            f"[{self.host}]:{self.port} {' '.join(self.host_key.split()[:2])}\n")

    def start(self) -> None:
        if self.pid:
            return
        self.pid = netns.start_sshd(self.dir, self._tag)
        netns.wait_for_sshd(self.host, self.port, self.pid, self.log)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
            self._timer = None
        if self.pid:  # and whatever its sessions left running (an autostop watchdog)
            netns._kill([self.pid, *in_mount_namespace_of(self.pid)])
            _reap(self.pid)
            self.pid = 0

    def start_later(self, seconds: float) -> threading.Timer:
        """Stop now and start again after ``seconds`` in a background thread."""
        self.stop()
        self._timer = threading.Timer(seconds, self.start)
        self._timer.start()
        return self._timer

    def rotate_host_key(self) -> str:
        """Restart with a new host key (known_hosts keeps the old one); returns the new key."""
        self.stop()
        self.host_key = netns.keygen(self.dir / "ssh_host_ed25519_key", "relufit-rotated")
        self.start()
        return self.host_key

    def new_key(self, name: str = "other") -> str:
        """Path of a fresh key pair that this sshd does not accept."""
        path = self.dir / f"{name}_ed25519"
        netns.keygen(path, f"relufit-{name}")
        return str(path)

    def home(self, path: str = "") -> Path:
        """A path inside this sshd's private home, as seen from the test process."""
        return Path(f"/proc/{self.pid}/root{os.path.expanduser('~root')}") / path

    def ssh(self, *cmd: str, key: str | None = None) -> list[str]:
        return ssh_argv(key or self.key_path, self.known_hosts, self.user, self.host, self.port,
                        *cmd)


def in_mount_namespace_of(pid: int) -> list[int]:
    """Other live processes in ``pid``'s mount namespace (an sshd_host's is its own)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == pid:
            continue
        try:
            if os.readlink(proc / "ns" / "mnt") == ns and not netns._zombie(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _reap(pid: int) -> None:
    """Collect an exited child of this process, so no zombie outlives the test."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@pytest.fixture
def relufit_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "relufit-home"
    home.mkdir()
    monkeypatch.setenv("RELUFIT_HOME", str(home))
    return home


@pytest.fixture
def sshd_host(tmp_path):
    require_emulated_hosts()
    host = SshdHost(tmp_path / "sshd")
    host.start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def netns_cluster(relufit_home):
    require_emulated_hosts()
    made: list[tuple[str, Path]] = []

    def make(workers: int = 2, bandwidth: str | None = None,
             master_bandwidth: str | None = None) -> netns.NetnsCluster:
        name = f"t{secrets.token_hex(3)}"
        made.append((name, netns.cluster_dir(name)))  # teardown must not depend on the env
        return netns.up(name, workers, bandwidth, master_bandwidth)

    yield make
    for name, state_dir in made:
        state = netns.load_state(name, state_dir)
        netns.down(name, state_dir=state_dir)
        for h in state.hosts if state else ():
            _reap(h.pid)


def host_ssh(c: netns.NetnsCluster, rank: int, *cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` on host ``rank`` of an emulated cluster with the real ssh client."""
    h = c.hosts[rank]
    argv = ssh_argv(c.key_path, c.known_hosts, c.user, h.address, 22, *cmd)
    return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(name="host_ssh")
def host_ssh_fixture():
    """``host_ssh(cluster, rank, *cmd) -> CompletedProcess``, as a fixture."""
    return host_ssh


@pytest.fixture
def moto_server(tmp_path):
    """moto_server on a free port; killed by PID at the end. Yields its URL."""
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")  # closed in finally
    env = {**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}  # fast describe_images
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def aws_env(moto_server, tmp_path):
    """Environment of a user with (fake) credentials whose endpoint is the moto server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=moto_server, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=MOTO_REGION,
               AWS_EC2_METADATA_DISABLED="true", RELUFIT_HOME=str(tmp_path / "home"),
               RELUFIT_EC2_POLL_S="0.05",
               # moto's instances do not exist: `cluster status` must not SSH to the
               # addresses moto makes up (it reads autostop from the tags instead)
               RELUFIT_STATUS_SSH="0")
    return env


def moto_client(env: dict):
    """A boto3 EC2 client of the moto server in ``env`` (from ``aws_env``)."""
    return boto3.client("ec2", region_name=MOTO_REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def relufit_image(client) -> None:
    """A relufit:ami image, as `relufit ami build` would leave (moto has no Ubuntu 22.04+)."""
    builder = client.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                   InstanceType="t3.micro")["Instances"][0]["InstanceId"]
    client.create_image(InstanceId=builder, Name="relufit-node", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": ec2.TAG_AMI, "Value": "1"}]}])
    client.terminate_instances(InstanceIds=[builder])
