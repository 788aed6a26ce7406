"""deploy.py against a real OpenSSH sshd on 127.0.0.1 (the ``sshd_host`` fixture of conftest):
connect retries, host key pinning, fatal errors, and installing relufit on a fresh home."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from orchestrator import deploy, distribution
from orchestrator.deploy import NodePlatform, Session, SSHTarget
from orchestrator.errors import SSHError

pytestmark = pytest.mark.sshd
# Built wheels and the dependency wheelhouse are cached across tests and sessions.
os.environ.setdefault("RELUFIT_CACHE", str(Path.home() / ".cache" / "relufit-tests"))


def target(h, known_hosts: str | None = None, key: str | None = None) -> SSHTarget:
    return SSHTarget(h.host, h.user, key or h.key_path, known_hosts or h.known_hosts, h.port)


def test_first_contact_pins_the_host_key_then_checks_it(sshd_host, tmp_path):
    kh = tmp_path / "known_hosts"
    with Session(target(sshd_host, str(kh))) as s:
        assert s.run("echo hello").strip() == "hello"
    line = kh.read_text().strip()
    assert line.startswith(f"[127.0.0.1]:{sshd_host.port} ssh-ed25519 ")
    assert line.split()[2] == sshd_host.host_key.split()[1]
    with Session(target(sshd_host, str(kh))) as s:  # pinned: connects, file unchanged
        assert s.run("id -u").strip() == "0"
    assert kh.read_text().strip() == line


@pytest.fixture
def retries(monkeypatch) -> list[float]:
    """The backoff pauses of deploy.connect (each one a retry), still really slept."""
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(deploy, "_pause", sleep)
    return pauses


def test_changed_host_key_is_refused(sshd_host, retries):
    sshd_host.rotate_host_key()  # known_hosts still pins the old key
    before = Path(sshd_host.known_hosts).read_text()
    with pytest.raises(SSHError, match=r"host key changed.*refusing") as e:
        deploy.connect(target(sshd_host))
    assert retries == []  # fatal: not retried
    assert str(e.value).startswith(f"[127.0.0.1:{sshd_host.port}] ")
    assert Path(sshd_host.known_hosts).read_text() == before  # never auto-accepted
    shown = subprocess.run(["ssh-keygen", "-lf", "-"], input=sshd_host.host_key,
                           capture_output=True, text=True).stdout.split()[1]
    assert shown in str(e.value)  # the new key's fingerprint, as OpenSSH shows it


def test_wrong_key_fails_fast_with_a_clear_error(sshd_host, retries):
    other = sshd_host.new_key("stranger")
    with pytest.raises(SSHError, match=r"authentication failed for user 'root'"):
        deploy.connect(target(sshd_host, key=other))
    assert retries == []  # fatal: not retried


def test_key_readable_by_others_is_refused(sshd_host, tmp_path):
    key = tmp_path / "loose_key"
    key.write_bytes(Path(sshd_host.key_path).read_bytes())
    key.chmod(0o644)
    with pytest.raises(SSHError, match="chmod 600"):
        deploy.connect(target(sshd_host, key=str(key)))


def test_sshd_that_comes_up_late_is_retried(sshd_host, retries):
    timer = sshd_host.start_later(2.0)  # down now: the first attempts are refused
    with Session(target(sshd_host), timeout=30) as s:
        assert s.run("echo up").strip() == "up"
    timer.join()
    assert len(retries) >= 2  # refused, backed off, tried again
    assert retries == sorted(retries) and max(retries) <= 5.0  # growing backoff, capped


def test_unreachable_gives_up_after_the_timeout(sshd_host):
    sshd_host.stop()
    with pytest.raises(SSHError, match="unreachable after 1 s"):
        deploy.connect(target(sshd_host), timeout=1.0)


def test_put_bytes_creates_the_file_private(sshd_host):
    with Session(target(sshd_host)) as s:
        s.put_bytes(b"secret", "probe-secret", 0o600)
        assert s.run("stat -c %a probe-secret").strip() == "600"
        assert s.run("cat probe-secret") == "secret"


def test_platform_tags_cover_older_glibc():
    plat = NodePlatform("3.11", "3.11.2", "x86_64", "2.36")
    tags = plat.platform_tags()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux2014_x86_64" in tags and plat.tag == "cp311-manylinux_2_36_x86_64"


def test_requirements_are_evaluated_for_the_node():
    reqs = ["numpy>=1.23", "tomli>=2.0; python_version < '3.11'"]
    assert deploy._applicable(reqs, NodePlatform("3.10", "3.10.9", "x86_64", "2.31")) == [
        "numpy>=1.23", "tomli>=2.0"]
    assert deploy._applicable(reqs, NodePlatform("3.11", "3.11.2", "x86_64", "2.36")) == [
        "numpy>=1.23"]


def test_wheel_is_built_from_the_exact_source_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RELUFIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"  # a snapshot: the checkout may change while the suite runs
    root = distribution.source_tree()
    for f in distribution._source_files(root):
        (src / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        (src / f.relative_to(root)).write_bytes(f.read_bytes())
    wheel = distribution.build_wheel(src)
    assert wheel.name.startswith("relufit-") and wheel.parent.parent == tmp_path / "cache/wheels"
    assert distribution.build_wheel(src) == wheel  # same source: the cached wheel
    with zipfile.ZipFile(wheel) as z:  # the wheel holds exactly the hashed source
        assert z.read("worker/node.py") == (src / "worker" / "node.py").read_bytes()
    before = distribution.source_hash(src)
    (src / "worker" / "__init__.py").write_text((src / "worker" / "__init__.py").read_text()
                                                + "# changed\n")
    assert distribution.source_hash(src) != before  # any change to the source: a new wheel
    reqs = distribution.wheel_requirements(wheel)
    assert any(r.startswith("numpy") for r in reqs) and any(r.startswith("pyzmq") for r in reqs)
    assert not any("pytest" in r for r in reqs)  # extras are not runtime dependencies
