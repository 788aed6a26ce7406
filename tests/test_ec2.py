"""EC2 clusters against moto in-process: what `relufit cluster ...` creates, and what it leaves.

Errors moto never raises (capacity, throttling, DependencyViolation, quotas, expired tokens)
are injected by wrapping one method of the real (moto-backed) client.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import stat
import subprocess

import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner
from moto import mock_aws

from orchestrator import autostop, pricing
from orchestrator import cluster as model
from orchestrator.cli import cli
from orchestrator.providers import ec2, netns

REGION = "us-east-1"
CIDR = "203.0.113.7/32"


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    """Every backoff/poll pause, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(ec2, "POLL_S", 0.0)
    monkeypatch.setattr(ec2, "_pause", recorded.append)
    return recorded


@pytest.fixture
def aws(monkeypatch, relufit_home, pauses):
    """A moto account in us-east-1 with a relufit:ami image; yields an EC2 client."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # moto's thousands of default images make every describe_images take ~1 s; none needed
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    # `cluster down` of a name with no local state also looks for an emulated cluster of
    # that name on this machine: never let these tests find (and remove) another test's.
    monkeypatch.setattr(netns, "exists", lambda name, state_dir=None: False)
    # moto's instances have no sshd: `cluster status` must never SSH to their made-up
    # addresses (it reports them unreachable, from their tags)
    monkeypatch.setattr(autostop, "read_state", lambda target, timeout=0: None)
    with mock_aws():
        client, _ = ec2.client(REGION)  # shares relufit's parsed API models: faster
        builder = client.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                       InstanceType="t3.micro")["Instances"][0]["InstanceId"]
        client.create_image(InstanceId=builder, Name="relufit-node-1", TagSpecifications=[
            {"ResourceType": "image", "Tags": [{"Key": ec2.TAG_AMI, "Value": "1"}]}])
        client.terminate_instances(InstanceIds=[builder])
        yield client


def relufit(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def up(name: str = "t1", *more: str):
    return relufit("cluster", "up", "--name", name, "--ssh-cidr", CIDR, "--yes", *more)


def live(client, name: str | None = None) -> dict[str, list[str]]:
    """Every resource still tagged with ``name`` (any relufit cluster if None)."""
    return ec2.tagged_resources(client, name)


def nothing_left(client, name: str | None = None) -> bool:
    return not any(live(client, name).values())


def inject(monkeypatch, method: str, codes: list[str | None]) -> list[dict]:
    """Make ``method`` of every client relufit creates raise ClientError(code) for each code
    in turn (None: the real call), then behave normally. Returns the calls' arguments."""
    real = ec2.client
    calls: list[dict] = []

    def client(region):
        c, r = real(region)
        original = getattr(c, method)

        def wrapped(**kwargs):
            calls.append(kwargs)
            code = codes.pop(0) if codes else None
            if code:
                raise ClientError({"Error": {"Code": code, "Message": "injected"}}, method)
            return original(**kwargs)
        c.__dict__[method] = wrapped
        return c, r
    monkeypatch.setattr(ec2, "client", client)
    return calls


def interrupt_at(monkeypatch, rank: int):
    """Ctrl-C just before node ``rank`` is launched; returns the real ``run_args``."""
    real = ec2.run_args

    def interrupting(plan, r, *args, **kwargs):
        if r == rank:
            raise KeyboardInterrupt
        return real(plan, r, *args, **kwargs)
    monkeypatch.setattr(ec2, "run_args", interrupting)
    return real


def one_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, output
    return lines[0]


# ---------------------------------------------------------------- up: what it creates


def test_up_creates_a_tagged_locked_down_cluster(aws):
    r = up("t1", "--workers", "2", "--max-hours", "1.5")
    assert r.exit_code == 0, r.output
    assert "Estimated cost: $" in r.output and pricing.PRICES_AS_OF in r.output

    insts = ec2.instances(aws, "t1")
    assert len(insts) == 3
    by_rank = {int(ec2.tags_of(i)[ec2.TAG_RANK]): i for i in insts}
    assert sorted(by_rank) == [0, 1, 2]
    for rank, inst in by_rank.items():
        tags = ec2.tags_of(inst)
        assert tags[ec2.TAG_CLUSTER] == "t1"
        assert tags[ec2.TAG_ROLE] == ("master" if rank == 0 else "worker")
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        assert len({i["Placement"]["AvailabilityZone"] for i in insts}) == 1
        attr = aws.describe_instance_attribute(InstanceId=inst["InstanceId"],
                                               Attribute="instanceInitiatedShutdownBehavior")
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        ud = aws.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
        text = base64.b64decode(ud["UserData"]["Value"]).decode()
        assert text.startswith("#!/bin/bash\n")
        assert "shutdown -h +90 " in text  # 1.5 h
        assert text.index("shutdown -h") < text.index("bootstrap.sh")
        assert ec2.bootstrap_script().strip() in text
        assert "sudo -u ubuntu -H sh /opt/relufit/bootstrap.sh" in text

    vols = aws.describe_volumes(Filters=[{"Name": "tag:relufit:cluster", "Values": ["t1"]}])
    assert len(vols["Volumes"]) == 3
    for v in vols["Volumes"]:
        assert v["Encrypted"] and v["VolumeType"] == "gp3"
        assert {ec2.TAG_ROLE, ec2.TAG_RANK} <= set(ec2.tags_of(v))

    (group,) = ec2.security_groups(aws, "t1")
    assert ec2.tags_of(group)[ec2.TAG_ROLE] == "shared"
    rules = sorted(group["IpPermissions"], key=lambda p: p["FromPort"])
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in rules] == [
        ("tcp", 22, 22), ("tcp", *ec2.RELUFIT_PORTS)]
    assert [x["CidrIp"] for x in rules[0]["IpRanges"]] == [CIDR]
    assert not rules[0].get("UserIdGroupPairs") and not rules[0].get("Ipv6Ranges")
    assert [p["GroupId"] for p in rules[1]["UserIdGroupPairs"]] == [group["GroupId"]]
    assert not rules[1]["IpRanges"] and not rules[1].get("Ipv6Ranges")
    assert "0.0.0.0/0" not in json.dumps(group["IpPermissions"])
    assert "::/0" not in json.dumps(group["IpPermissions"])
    assert all([g["GroupId"] for g in i["NetworkInterfaces"][0]["Groups"]] == [group["GroupId"]]
               for i in insts)

    (kp,) = ec2.key_pairs(aws, "t1")
    assert kp["KeyName"] == "relufit-t1" and ec2.tags_of(kp)[ec2.TAG_ROLE] == "shared"
    key = model.key_path("t1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(model.cluster_dir("t1").stat().st_mode) == 0o700
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert key.read_text() not in r.output

    c = model.load_cluster("t1")
    assert [(n.rank, n.role) for n in c.nodes] == [(0, "master"), (1, "worker"), (2, "worker")]
    assert c.provider == "ec2" and c.region == REGION and c.key_path == str(key)
    assert all(n.address and n.private_address and n.instance_id for n in c.nodes)
    assert not (model.cluster_dir("t1") / ec2.LAUNCH_FILE).exists()


def user_data_of(client, inst: dict) -> str:
    ud = client.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
    return base64.b64decode(ud["UserData"]["Value"]).decode()


def packed_watchdog(text: str) -> str:
    return text.split("<<'RELUFIT_WATCHDOG_EOF'\n")[1].split("RELUFIT_WATCHDOG_EOF\n")[0]


@pytest.mark.parametrize("flags, minutes", [([], 30), (["--idle-minutes", "45"], 45),
                                            (["--idle-minutes", "7.5"], 7.5)])
def test_user_data_installs_the_autostop_watchdog_with_its_limit(aws, tmp_path, flags, minutes):
    assert up("t1", "--workers", "1", *flags).exit_code == 0
    for inst in ec2.instances(aws, "t1"):
        text = user_data_of(aws, inst)
        assert len(text.encode()) < 16384  # EC2's limit on user-data
        packed = packed_watchdog(text)
        assert gzip.decompress(base64.b64decode(packed)) == autostop.watchdog_source()
        start = (f"/usr/bin/python3 /opt/relufit/watchdog.py --idle-seconds {minutes * 60:g} "
                 '--action poweroff --home "$home"')
        assert start in text
        assert text.index("shutdown -h +") < text.index(start) < text.index(
            "sh /opt/relufit/bootstrap.sh")  # started before the minutes-long bootstrap
        assert 'systemd-run --unit relufit-watchdog --quiet "$@"' in text
        assert ec2.tags_of(inst)[ec2.TAG_IDLE] == f"{minutes:g}"
    # the user-data's own shell lines unpack it (base64 -d, gunzip), byte for byte
    lines = text.splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if ln.startswith("base64 -d"))
    script = "".join(lines[first:first + packed.count("\n") + 3]).replace(
        "/opt/relufit", str(tmp_path))
    subprocess.run(["bash", "-c", script], check=True)
    assert (tmp_path / "watchdog.py").read_bytes() == autostop.watchdog_source()


def test_idle_minutes_0_installs_no_watchdog(aws):
    assert up("t0", "--workers", "1", "--idle-minutes", "0").exit_code == 0
    for inst in ec2.instances(aws, "t0"):
        text = user_data_of(aws, inst)
        assert "watchdog" not in text and "shutdown -h +240 " in text
        assert ec2.tags_of(inst)[ec2.TAG_IDLE] == "0"


def test_spot_and_master_type(aws):
    r = up("sp", "--workers", "1", "--spot", "--master-instance-type", "m5.large")
    assert r.exit_code == 0, r.output
    insts = {ec2.tags_of(i)[ec2.TAG_ROLE]: i for i in ec2.instances(aws, "sp")}
    assert insts["master"]["InstanceType"] == "m5.large"
    assert insts["worker"]["InstanceType"] == "c5.large"
    assert all(i.get("InstanceLifecycle") == "spot" for i in insts.values())


def test_spec_file_is_overridden_by_flags(aws, tmp_path):
    spec = tmp_path / "c.toml"
    spec.write_text('name = "fromfile"\nworkers = 3\ninstance_type = "t3.micro"\n'
                    f'ssh_cidr = "{CIDR}"\nmax_hours = 2\n')
    r = relufit("cluster", "up", "--spec", str(spec), "--workers", "1", "--yes")
    assert r.exit_code == 0, r.output
    insts = ec2.instances(aws, "fromfile")
    assert len(insts) == 2 and {i["InstanceType"] for i in insts} == {"t3.micro"}


# ---------------------------------------------------------------- down, interruption


def test_down_removes_everything_and_is_idempotent(aws):
    assert up("t2").exit_code == 0
    r = relufit("cluster", "down", "t2")
    assert r.exit_code == 0, r.output
    assert "removed" in r.output
    assert nothing_left(aws, "t2")
    assert not model.cluster_dir("t2").exists()
    again = relufit("cluster", "down", "t2")
    assert again.exit_code == 0 and "Nothing to do" in again.output


def test_down_works_from_tags_alone(aws):
    assert up("t3").exit_code == 0
    model.remove_cluster_state("t3")  # ~/.relufit lost
    assert relufit("cluster", "down", "t3").exit_code == 0
    assert nothing_left(aws, "t3")


def test_ctrl_c_mid_launch_removes_what_was_created(aws, monkeypatch):
    interrupt_at(monkeypatch, rank=1)
    r = up("t4")
    assert r.exit_code == 130, r.output
    assert "Interrupted: removed 1 instances, 1 security groups, 1 key pairs" in r.output
    assert nothing_left(aws, "t4")
    assert not model.cluster_dir("t4").exists()


def test_down_after_an_up_killed_before_cleanup(aws, monkeypatch):
    """kill -9 of `up` (no cleanup ran): `down` still finds everything by its tags."""
    real = interrupt_at(monkeypatch, rank=2)
    monkeypatch.setattr(ec2, "_undo", lambda *a: None)
    assert up("t5").exit_code == 130
    assert len(live(aws, "t5")["instances"]) == 2
    monkeypatch.setattr(ec2, "run_args", real)
    r = relufit("cluster", "down", "t5")
    assert r.exit_code == 0, r.output
    assert nothing_left(aws, "t5")


def test_rerun_of_a_killed_up_resumes_without_doubling(aws, monkeypatch):
    real = interrupt_at(monkeypatch, rank=1)
    monkeypatch.setattr(ec2, "_undo", lambda *a: None)
    assert up("t6").exit_code == 130
    (first,) = live(aws, "t6")["instances"]
    monkeypatch.setattr(ec2, "run_args", real)
    r = up("t6")
    assert r.exit_code == 0, r.output
    assert "Resuming" in r.output
    ids = live(aws, "t6")["instances"]
    assert len(ids) == 3 and first in ids
    assert len(live(aws, "t6")["security groups"]) == 1


def test_up_after_a_dead_cluster_starts_afresh(aws, monkeypatch):
    """Leftovers of an earlier cluster of the same name (old SSH rule) are not reused."""
    real = interrupt_at(monkeypatch, rank=0)
    monkeypatch.setattr(ec2, "_undo", lambda *a: None)
    assert up("again").exit_code == 130
    (old_group,) = live(aws, "again")["security groups"]
    monkeypatch.setattr(ec2, "run_args", real)
    r = relufit("cluster", "up", "--name", "again", "--ssh-cidr", "198.51.100.9/32", "--yes")
    assert r.exit_code == 0, r.output
    (group,) = ec2.security_groups(aws, "again")
    assert group["GroupId"] != old_group
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "198.51.100.9/32"
    assert len(live(aws, "again")["key pairs"]) == 1


def test_up_refuses_an_existing_cluster(aws):
    assert up("t7").exit_code == 0
    r = up("t7")
    assert r.exit_code == 1
    assert "already exists" in one_line(r.output) and "cluster down t7" in r.output
    assert len(live(aws, "t7")["instances"]) == 3
    node = model.Node(rank=0, role="master", address="10.0.0.1", private_address="10.0.0.1",
                      user="me")
    model.save_cluster(model.Cluster(name="lab", provider="hosts", nodes=(node,),
                                     key_path="/k"))
    r = up("lab")
    assert r.exit_code == 1 and "already exists here (hosts)" in one_line(r.output)
    assert model.load_cluster("lab").provider == "hosts" and nothing_left(aws, "lab")


# ---------------------------------------------------------------- dry run and confirmation


def test_dry_run_creates_nothing(aws, monkeypatch):
    calls = inject(monkeypatch, "run_instances", [])
    r = up("dry", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "Dry run passed" in r.output and "allowed to launch rank 0" in r.output
    assert calls and all(c["DryRun"] for c in calls)
    assert nothing_left(aws)
    assert not model.cluster_dir("dry").exists()


def test_dry_run_reports_missing_permission(aws, monkeypatch):
    inject(monkeypatch, "run_instances", ["UnauthorizedOperation"])
    r = up("dry", "--dry-run")
    assert r.exit_code == 1
    assert "not permitted to launch rank 0" in one_line(r.output)
    assert nothing_left(aws)


def test_declining_the_cost_creates_nothing(aws):
    r = relufit("cluster", "up", "--name", "no", "--ssh-cidr", CIDR, input="n\n")
    assert r.exit_code != 0
    assert "Estimated cost" in r.output
    assert nothing_left(aws) and not model.cluster_dir("no").exists()


# ---------------------------------------------------------------- injected AWS errors


def zones_of(client, name: str) -> set[str]:
    return {i["Placement"]["AvailabilityZone"] for i in ec2.instances(client, name)}


def test_capacity_error_moves_to_the_next_zone(aws, monkeypatch):
    calls = inject(monkeypatch, "run_instances", [None, "InsufficientInstanceCapacity"])
    r = up("cap", "--availability-zone", "us-east-1c")
    assert r.exit_code == 0, r.output
    assert "No capacity in us-east-1c" in r.output
    zones = [c["NetworkInterfaces"][0]["SubnetId"] for c in calls]
    assert zones[0] == zones[1] != zones[2]  # rank 0 ok, rank 1 refused, then a new zone
    assert zones_of(aws, "cap") == {"us-east-1a"}  # the rank-0 instance of 1c was given back
    assert len(ec2.instances(aws, "cap")) == 3


def test_spot_capacity_in_no_zone_is_a_clear_error(aws, monkeypatch):
    inject(monkeypatch, "run_instances", ["InsufficientCapacity"] * 50)
    r = up("nocap", "--spot")
    assert r.exit_code == 1
    line = one_line(r.output)
    assert "no capacity for c5.large in any zone of us-east-1" in line
    assert "without --spot" in line
    assert nothing_left(aws) and not model.cluster_dir("nocap").exists()


def test_request_limit_backs_off_in_the_same_zone(aws, monkeypatch, pauses):
    calls = inject(monkeypatch, "run_instances", ["RequestLimitExceeded"] * 3)
    r = up("thr", "--workers", "1")
    assert r.exit_code == 0, r.output
    backoffs = [p for p in pauses if p > 0]
    assert len(backoffs) == 3 and backoffs == sorted(backoffs)
    assert {c["NetworkInterfaces"][0]["SubnetId"] for c in calls} == {
        calls[0]["NetworkInterfaces"][0]["SubnetId"]}
    assert len({c["ClientToken"] for c in calls}) == 2  # retries reuse the rank's token


def test_dependency_violation_on_group_delete_is_retried(aws, monkeypatch, pauses):
    assert up("dep").exit_code == 0
    inject(monkeypatch, "delete_security_group", ["DependencyViolation"] * 3)
    r = relufit("cluster", "down", "dep")
    assert r.exit_code == 0, r.output
    assert len([p for p in pauses if p > 0]) == 3
    assert nothing_left(aws, "dep")


@pytest.mark.parametrize("code", ["VcpuLimitExceeded", "InstanceLimitExceeded"])
def test_quota_error_is_one_line_and_leaves_nothing(aws, monkeypatch, code):
    inject(monkeypatch, "run_instances", [None, code])
    r = up("quota")
    assert r.exit_code == 1
    line = one_line(r.output)
    assert code in line and "Service Quotas" in line
    assert nothing_left(aws) and not model.cluster_dir("quota").exists()


@pytest.mark.parametrize("code", ["ExpiredToken", "AuthFailure", "UnrecognizedClientException"])
def test_rejected_credentials(aws, monkeypatch, code):
    inject(monkeypatch, "describe_instances", [code])
    r = up("cred")
    assert r.exit_code == 1
    assert "rejected the credentials" in one_line(r.output) and "aws sso login" in r.output
    assert nothing_left(aws)


# ---------------------------------------------------------------- bad input


def test_missing_credentials(monkeypatch, relufit_home, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    r = up("nocred", "--region", REGION)
    assert r.exit_code == 1
    assert "no AWS credentials found" in one_line(r.output) and "aws configure" in r.output
    assert not model.cluster_dir("nocred").exists()


@pytest.mark.parametrize("args, flag", [
    (["--instance-type", "c5.bogus"], "--instance-type"),
    (["--master-instance-type", "zz9.huge"], "--master-instance-type"),
    (["--region", "mars-north-1"], "--region"),
    (["--ssh-cidr", "0.0.0.0/0"], "--ssh-cidr"),
    (["--ssh-cidr", "::/0"], "--ssh-cidr"),
    (["--ami", "ami-0000000000000dead"], "--ami"),
    (["--availability-zone", "us-east-1q"], "--availability-zone"),
    (["--max-hours", "0"], "--max-hours"),
    (["--idle-minutes", "2"], "--idle-minutes"),  # nodes would stop before their deploy
    (["--idle-minutes", "-1"], "--idle-minutes"),
])
def test_bad_input_is_one_line_and_creates_nothing(aws, args, flag):
    r = relufit("cluster", "up", "--name", "bad", "--ssh-cidr", CIDR, "--yes", *args)
    assert r.exit_code == 2, r.output
    assert one_line(r.output).startswith(f"Error: {flag}")
    assert nothing_left(aws) and not model.cluster_dir("bad").exists()


def test_workers_below_one(aws, tmp_path):
    r = up("w0", "--workers", "0")
    assert r.exit_code == 2 and "--workers" in r.output
    spec = tmp_path / "c.toml"
    spec.write_text('name = "w0"\nworkers = 0\n')
    r = relufit("cluster", "up", "--spec", str(spec), "--ssh-cidr", CIDR, "--yes")
    assert r.exit_code == 2 and "--workers: 0" in one_line(r.output)
    assert nothing_left(aws)


def test_unknown_spec_key(aws, tmp_path):
    spec = tmp_path / "c.toml"
    spec.write_text('name = "k"\nwrokers = 2\n')
    r = relufit("cluster", "up", "--spec", str(spec), "--yes")
    assert r.exit_code == 2 and one_line(r.output).startswith("Error: wrokers: unknown key")


def test_no_public_ip_asks_for_ssh_cidr(aws, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(ec2.urllib.request, "urlopen", offline)
    r = relufit("cluster", "up", "--name", "ip", "--yes")
    assert r.exit_code == 2
    assert "pass --ssh-cidr" in one_line(r.output)
    assert nothing_left(aws)


def test_image_lookup(aws):
    """The relufit:ami image first; moto has no Ubuntu 22.04/24.04, so then a clear error."""
    (own,) = aws.describe_images(Owners=["self"])["Images"]
    assert ec2.find_image(aws, None, "x86_64")["ImageId"] == own["ImageId"]
    assert ec2.find_image(aws, own["ImageId"], "x86_64")["ImageId"] == own["ImageId"]
    aws.deregister_image(ImageId=own["ImageId"])
    with pytest.raises(model.RelufitError, match="pass --ami"):
        ec2.find_image(aws, None, "x86_64")


# ---------------------------------------------------------------- list, status, ssh, gc


def test_list_and_status(aws, monkeypatch):
    monkeypatch.setattr(ec2, "enabled_regions", lambda client: [REGION, "eu-west-1"])
    assert up("ls1", "--workers", "1").exit_code == 0
    assert up("ls2", "--workers", "2").exit_code == 0
    r = relufit("cluster", "list")
    assert r.exit_code == 0, r.output
    rows = {ln.split()[0]: ln.split() for ln in r.output.splitlines()
            if ln.startswith("ls")}
    assert rows["ls1"][1:3] == [REGION, "2"] and rows["ls2"][1:3] == [REGION, "3"]
    assert rows["ls1"][4].startswith("$") and pricing.PRICES_AS_OF in r.output
    r = relufit("cluster", "list", "--all-regions")
    assert r.exit_code == 0 and "ls2" in r.output

    r = relufit("cluster", "status", "ls2")
    assert r.exit_code == 0, r.output
    lines = [ln.split() for ln in r.output.splitlines()[1:4]]
    assert [(ln[0], ln[1], ln[4]) for ln in lines] == [
        ("0", "master", "running"), ("1", "worker", "running"), ("2", "worker", "running")]
    autostop_block = r.output.splitlines()[4:]
    assert autostop_block[0].startswith("autostop") and len(autostop_block) == 4
    for rank, line in enumerate(autostop_block[1:]):  # SSH does not reach moto: the tags
        assert line.split()[0] == str(rank)
        assert "not reachable): idle limit 30 min, not before" in line
    assert relufit("cluster", "status", "nope").exit_code == 1


def test_cluster_rebuilt_from_tags_after_local_state_is_lost(aws):
    assert up("tags", "--workers", "2").exit_code == 0
    saved = model.load_cluster("tags")
    model.remove_cluster_state("tags")
    with pytest.raises(model.RelufitError, match="relufit cluster up"):
        model.load_cluster("tags")
    rebuilt = ec2.find_cluster("tags", REGION)
    assert rebuilt.nodes == saved.nodes
    assert rebuilt.extra["security_group"] == saved.extra["security_group"]
    assert rebuilt.extra["master_instance_type"] == "c5.large"  # run checks its link rate


def test_ssh_execs_openssh_with_the_cluster_key(aws, monkeypatch):
    assert up("ssh1", "--workers", "1").exit_code == 0
    seen = []
    monkeypatch.setattr(os, "execvp", lambda f, argv: seen.append(argv))
    r = relufit("cluster", "ssh", "ssh1", "--rank", "1", "uptime")
    assert r.exit_code == 0, r.output
    c = model.load_cluster("ssh1")
    (argv,) = seen
    assert argv[:3] == ["ssh", "-i", c.key_path]
    assert f"UserKnownHostsFile={model.cluster_dir('ssh1') / 'known_hosts'}" in argv
    assert argv[-2:] == [f"ubuntu@{c.nodes[1].address}", "uptime"]
    r = relufit("cluster", "ssh", "ssh1", "--rank", "5")
    assert r.exit_code == 2 and "--rank" in r.output


def test_gc_removes_only_resources_of_dead_clusters(aws, monkeypatch):
    assert up("alive", "--workers", "1").exit_code == 0
    real = interrupt_at(monkeypatch, rank=0)
    monkeypatch.setattr(ec2, "_undo", lambda *a: None)
    assert up("ghost").exit_code == 130  # left a group and a key pair, no instance
    monkeypatch.setattr(ec2, "run_args", real)
    vpc = aws.describe_vpcs()["Vpcs"][0]
    aws.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": ec2.TAG_CLUSTER, "Value": "ghost"}]}])
    assert vpc

    r = relufit("cluster", "gc", "--yes")
    assert r.exit_code == 0 and "Nothing to collect" in r.output  # ghost's `up` may be running
    monkeypatch.setattr(ec2, "GC_GRACE_S", 0.0)
    r = relufit("cluster", "gc", input="n\n")
    assert r.exit_code != 0 and "(cluster ghost)" in r.output and "(cluster alive)" not in r.output
    assert live(aws, "ghost")["security groups"]
    r = relufit("cluster", "gc", "--yes")
    assert r.exit_code == 0, r.output
    assert "Deleted 3 resources" in r.output
    assert nothing_left(aws, "ghost")
    assert live(aws, "alive")["security groups"] and len(live(aws, "alive")["instances"]) == 2
    assert "Nothing to collect" in relufit("cluster", "gc", "--yes").output


# ---------------------------------------------------------------- pure pieces


def test_client_token_is_stable_and_distinct():
    t = ec2.client_token("c", "a1", "us-east-1a", 0)
    assert t == ec2.client_token("c", "a1", "us-east-1a", 0) and len(t) <= 64
    others = {ec2.client_token("c", "a2", "us-east-1a", 0),
              ec2.client_token("c", "a1", "us-east-1b", 0),
              ec2.client_token("c", "a1", "us-east-1a", 1), ec2.client_token("d", "a1",
                                                                            "us-east-1a", 0)}
    assert t not in others and len(others) == 4


def test_backoff_grows_and_is_capped():
    import random
    rng = random.Random(0)
    delays = [ec2.backoff_s(a, rng) for a in range(10)]
    assert all(ec2.BACKOFF_BASE_S * 2 ** a / 2 <= d or d >= ec2.BACKOFF_CAP_S / 2
               for a, d in enumerate(delays))
    assert max(delays) <= ec2.BACKOFF_CAP_S


def test_ingress_rules_ipv6_ssh():
    rules = ec2.ingress_rules("2001:db8::1/128", "sg-1")
    assert rules[0]["Ipv6Ranges"][0]["CidrIpv6"] == "2001:db8::1/128"
    assert "IpRanges" not in rules[0]


def test_price_table_is_dated():
    line = pricing.describe(["c5.large", "c5.large", "x9.odd"], 16)
    assert pricing.PRICES_AS_OF in line and "x9.odd" in line
    each = 0.085 + 16 * pricing.GP3_USD_PER_GB_MONTH / pricing.HOURS_PER_MONTH
    assert line.startswith(f"Estimated cost: ${2 * each:.3f}/hour for 3 instances")
