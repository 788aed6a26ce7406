"""End to end: the real `relufit` executable against moto_server on 127.0.0.1.

boto3 reaches the server only through AWS_ENDPOINT_URL (boto3 >= 1.28 honours it), exactly
as a user would point relufit at another endpoint: relufit itself knows nothing of moto.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from orchestrator.providers import ec2

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_server(tmp_path):
    """moto_server on a free port; killed by PID at the end. Yields its URL."""
    port = _free_port()
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
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION,
               AWS_EC2_METADATA_DISABLED="true", RELUFIT_HOME=str(tmp_path / "home"),
               RELUFIT_EC2_POLL_S="0.05")
    return env


def _client(env: dict):
    return boto3.client("ec2", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _relufit_exe() -> str:
    beside = Path(sys.executable).parent / "relufit"
    found = str(beside) if beside.exists() else shutil.which("relufit")
    assert found, "the relufit console script is not installed"
    return found


def test_up_list_status_down_leave_nothing(aws_env):
    client = _client(aws_env)
    # A relufit:ami image, as `relufit ami build` would leave (moto has no Ubuntu 22.04+).
    builder = client.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                   InstanceType="t3.micro")["Instances"][0]["InstanceId"]
    client.create_image(InstanceId=builder, Name="relufit-node", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": ec2.TAG_AMI, "Value": "1"}]}])
    client.terminate_instances(InstanceIds=[builder])

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
    roles = [ln.split()[1] for ln in r.stdout.splitlines()[1:]]
    assert roles == ["master", "worker", "worker"]

    r = relufit("down", name)
    assert r.returncode == 0, r.stderr
    assert not any(ec2.tagged_resources(client, name).values())
    assert not any(ec2.tagged_resources(client).values())
    assert not home.exists()

    r = relufit("down", name)
    assert r.returncode == 0 and "Nothing to do" in r.stderr
