"""End to end: the real `relufit` executable against moto_server on 127.0.0.1.

boto3 reaches the server only through AWS_ENDPOINT_URL (boto3 >= 1.28 honours it), exactly
as a user would point relufit at another endpoint: relufit itself knows nothing of moto.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import MOTO_REGION, moto_client, relufit_image

from orchestrator.providers import ec2

REGION = MOTO_REGION


def _relufit_exe() -> str:
    beside = Path(sys.executable).parent / "relufit"
    found = str(beside) if beside.exists() else shutil.which("relufit")
    assert found, "the relufit console script is not installed"
    return found


def test_up_list_status_down_leave_nothing(aws_env):
    client = moto_client(aws_env)
    relufit_image(client)

    def relufit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_relufit_exe(), "cluster", *args], env=aws_env, text=True,
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)

    # A name of our own: `cluster down` of a name with no local state also looks for an
    # emulated (netns) cluster of that name on this machine, which other tests may run.
    name = f"ec2e2e-{secrets.token_hex(4)}"
    r = relufit("up", "--name", name, "--workers", "2", "--ssh-cidr", "198.51.100.4/32",
                "--yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name
    assert "Estimated cost" in r.stderr and "status checks: 3/3 passed" in r.stderr
    home = Path(aws_env["RELUFIT_HOME"]) / "clusters" / name
    assert (home / "cluster.json").exists() and (home / "id_ed25519").stat().st_mode & 0o077 == 0

    r = relufit("list")
    assert r.returncode == 0, r.stderr
    (row,) = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(f"{name} ")]
    assert row[1:3] == [REGION, "3"]

    r = relufit("status", name)
    assert r.returncode == 0, r.stderr
    roles = [ln.split()[1] for ln in r.stdout.splitlines()[1:4]]
    assert roles == ["master", "worker", "worker"]
    autostop = r.stdout.splitlines()[4:]  # from the tags: RELUFIT_STATUS_SSH=0 (aws_env)
    assert autostop[0].startswith("autostop") and len(autostop) == 4
    assert all("not reachable): idle limit 30 min, not before" in ln for ln in autostop[1:])

    r = relufit("down", name)
    assert r.returncode == 0, r.stderr
    assert not any(ec2.tagged_resources(client, name).values())
    assert not any(ec2.tagged_resources(client).values())
    assert not home.exists()

    r = relufit("down", name)
    assert r.returncode == 0 and "Nothing to do" in r.stderr
