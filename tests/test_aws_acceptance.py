"""Acceptance on real AWS: `relufit launch` of the quickstart on EC2, 1 master + 1 worker.

Three checks: the result equals ``--backend sim``; nothing tagged for the cluster is left
afterwards; the run cost under $0.10 by the price table (orchestrator/pricing.py).

Run it (it costs real money, a fraction of a cent; see README, "EC2 clusters"):

    RELUFIT_AWS_ACCEPTANCE=1 AWS_PROFILE=... python -m pytest -m aws tests/test_aws_acceptance.py

It is skipped unless RELUFIT_AWS_ACCEPTANCE=1 and AWS credentials are found, and says which
is missing. The instance type is t3.micro: the smallest (and cheapest, $0.0104/hour on
demand) type in relufit's price table, so the cost check has a price; 2 vCPUs and 1 GiB are
enough for the quickstart's master and its 4 agents (d = 100) and for pip installing wheels.
Spot where possible (one-time, cheaper than the on-demand price the check counts); on-demand
when no zone has spot capacity.

The same code runs in CI against moto_server (AWS_ENDPOINT_URL), as far as moto allows:
launch's EC2 half is real there (plan, cost statement, up with its tags, spot request, down),
and so are the checks "nothing left tagged" and "cost under $0.10". What moto cannot do: boot
an instance that SSH reaches. There, deploy and the remote run are replaced by a sim run on
this machine, so "equals sim" checks only the comparison code, not a cluster's numbers (those
are checked end to end on emulated hosts in test_launch.py and test_installed.py).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import MOTO_REGION, moto_client, relufit_image

from orchestrator import deploy, pricing, remote
from orchestrator.cli import cli
from orchestrator.config import load_experiment
from orchestrator.providers import ec2
from orchestrator.results import load_run
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
INSTANCE_TYPE = "t3.micro"
NODES = 2  # 1 master + 1 worker
MAX_USD = 0.10
# (exit code, stdout, stderr) of `relufit ARGS...`
Invoke = Callable[[list[str]], tuple[int, str, str]]


def skip_reason(env: dict[str, str]) -> str | None:
    """Why the real-AWS test cannot run in ``env``; None when it can."""
    if env.get("RELUFIT_AWS_ACCEPTANCE") != "1":
        return ("real-AWS acceptance test: set RELUFIT_AWS_ACCEPTANCE=1 and provide AWS "
                "credentials to run it (it launches 2 t3.micro instances, < $0.10)")
    if boto3.Session().get_credentials() is None:
        return ("real-AWS acceptance test: RELUFIT_AWS_ACCEPTANCE=1 but no AWS credentials "
                "found (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws/credentials, ...)")
    return None


def launch_quickstart(invoke: Invoke, out: Path, name: str, *more: str) -> tuple[dict, float]:
    """`relufit launch --json` of the quickstart on 1 master + 1 worker of INSTANCE_TYPE,
    spot unless no zone has spot capacity; its JSON record and the wall time it took (every
    second the instances existed lies inside it)."""
    def launch(market: str) -> tuple[int, str, str, float]:
        t0 = time.monotonic()
        code, stdout, stderr = invoke(
            ["launch", str(QUICKSTART), "--provider", "ec2", "--name", name,
             "--workers", str(NODES - 1), "--instance-type", INSTANCE_TYPE, market,
             "--max-hours", "1", "--yes", "--json", "--out", str(out), *more])
        return code, stdout, stderr, time.monotonic() - t0

    code, stdout, stderr, wall = launch("--spot")
    if code != 0 and "no capacity" in stderr:  # launch removed what it made; on-demand then
        code, stdout, stderr, more_wall = launch("--on-demand")
        wall += more_wall
    assert code == 0, stderr[-3000:]
    return json.loads(stdout), wall


def check_acceptance(rec: dict, wall_s: float, client, name: str, tmp_path: Path) -> None:
    """The three checks of the acceptance test."""
    # 1. the result equals sim
    run = load_run(rec["run"]["run_dir"])
    assert [t["status"] for t in run["summary"]["trials"]] == ["completed"] * 4
    sim = run_experiment(load_experiment(QUICKSTART), SimPool(), tmp_path / "sim", "sim",
                         progress=lambda line: None)
    ref = load_run(sim)["metrics"]
    np.testing.assert_array_equal(run["metrics"]["trial"], ref["trial"])
    np.testing.assert_array_equal(run["metrics"]["rel_error"], ref["rel_error"])

    # 2. everything tagged for the cluster is gone
    assert rec["cluster"] == {"name": name, "provider": "ec2", "made": True, "kept": False}
    assert ec2.tagged_resources(client, name) == {
        "instances": [], "security groups": [], "key pairs": [], "volumes": []}

    # 3. under $0.10 by the price table: on-demand prices (an upper bound for spot) for the
    # whole wall time of the launch, a minute at least (EC2's minimum per instance)
    per_hour = rec["cost"]["usd_per_hour"]
    assert per_hour >= NODES * pricing.hourly(INSTANCE_TYPE)  # the table knows the type
    bound = per_hour * max(wall_s, 60.0) / 3600
    assert rec["cost"]["spent_usd"] <= bound + 1e-6
    assert bound < MAX_USD, f"${bound:.4f} for {wall_s:.0f} s"


@pytest.mark.aws
def test_quickstart_on_real_ec2(tmp_path):
    reason = skip_reason(dict(os.environ))
    if reason:
        pytest.skip(reason)
    name = f"accept-{secrets.token_hex(3)}"
    exe = Path(sys.executable).parent / "relufit"

    def invoke(args: list[str]) -> tuple[int, str, str]:
        p = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=3600,
                           stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout, p.stderr

    try:
        rec, wall = launch_quickstart(invoke, tmp_path / "results", name)
    finally:  # whatever happened, nothing of it may go on costing
        invoke(["cluster", "down", name])
    client, _ = ec2.client(None)
    check_acceptance(rec, wall, client, name, tmp_path)


def test_the_skip_reason_names_what_is_missing(tmp_path, monkeypatch):
    for var in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "set RELUFIT_AWS_ACCEPTANCE=1" in skip_reason({})
    assert "no AWS credentials found" in skip_reason({"RELUFIT_AWS_ACCEPTANCE": "1"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    assert skip_reason({"RELUFIT_AWS_ACCEPTANCE": "1"}) is None


def test_the_acceptance_code_against_moto(aws_env, tmp_path, monkeypatch):
    """The real test's helper and checks, on moto_server (see the module docstring)."""
    for key, value in aws_env.items():
        if key.startswith(("AWS_", "RELUFIT_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(ec2, "POLL_S", 0.0)
    client = moto_client(aws_env)
    relufit_image(client)
    name = f"accept-{secrets.token_hex(3)}"
    seen: dict[str, list] = {}

    def no_ssh_here(*args, **kw) -> list:  # moto's instances cannot be reached: look instead
        seen["tagged"] = ec2.tagged_resources(client, name)
        seen["instances"] = ec2.instances(client, name)
        return []

    def sim_run(exp, cluster, out, progress, run_id, resume=None):
        return run_experiment(exp, SimPool(), out, "sim", progress=progress, run_id=run_id,
                              resume=resume)

    monkeypatch.setattr(deploy, "deploy", no_ssh_here)
    monkeypatch.setattr(remote, "run_on_cluster", sim_run)

    def invoke(args: list[str]) -> tuple[int, str, str]:
        r = CliRunner().invoke(cli, args)
        return r.exit_code, r.stdout, r.stderr

    rec, wall = launch_quickstart(invoke, tmp_path / "results", name, "--ssh-cidr",
                                  "198.51.100.4/32", "--region", MOTO_REGION)
    # while it was up: two tagged t3.micro spot instances, a group and a key pair
    assert len(seen["tagged"]["instances"]) == NODES
    assert seen["tagged"]["security groups"] and seen["tagged"]["key pairs"]
    assert {i["InstanceType"] for i in seen["instances"]} == {INSTANCE_TYPE}
    assert {i.get("InstanceLifecycle") for i in seen["instances"]} == {"spot"}
    assert sorted(ec2.tags_of(i)[ec2.TAG_ROLE] for i in seen["instances"]) == [
        "master", "worker"]
    check_acceptance(rec, wall, client, name, tmp_path)
