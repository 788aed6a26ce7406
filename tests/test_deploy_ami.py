"""`relufit ami build` against moto for the API half; the SSH half (deploy.prepare_image) is
replaced by a recorder, since moto's instances cannot be reached over SSH."""

from __future__ import annotations

import base64

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from orchestrator import cluster as model
from orchestrator import deploy
from orchestrator.cli import cli
from orchestrator.errors import SSHError
from orchestrator.providers import ec2

REGION = "us-east-1"
CIDR = "203.0.113.7/32"


@pytest.fixture
def aws(monkeypatch, relufit_home):
    """A moto account with one base image (moto's default images are not loaded)."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    monkeypatch.setattr(ec2, "POLL_S", 0.0)
    monkeypatch.setattr(ec2, "_pause", lambda s: None)
    with mock_aws():
        client = boto3.client("ec2", region_name=REGION)
        inst = client.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                    InstanceType="t3.micro")["Instances"][0]["InstanceId"]
        base = client.create_image(InstanceId=inst, Name="ubuntu-base")["ImageId"]
        client.terminate_instances(InstanceIds=[inst])
        yield client, base


def build(base: str, *more: str):
    return CliRunner().invoke(cli, ["ami", "build", "--base-ami", base, "--ssh-cidr", CIDR,
                                    "--yes", *more])


def live_instances(client) -> list[dict]:
    return [i for r in client.describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] not in ("terminated", "shutting-down")]


def test_ami_build_images_the_builder_tags_it_and_removes_the_builder(aws, monkeypatch):
    client, base = aws
    seen: list[model.Cluster] = []

    def fake_install(c: model.Cluster, progress) -> None:
        seen.append(c)
        # mid-build: the builder runs, with its own key and group, tagged as a cluster
        [builder] = live_instances(client)
        assert model.key_path(c.name).exists()
        # and no autostop watchdog that could halt it while it is imaged
        ud = client.describe_instance_attribute(InstanceId=builder["InstanceId"],
                                                Attribute="userData")["UserData"]["Value"]
        assert "watchdog" not in base64.b64decode(ud).decode()

    monkeypatch.setattr(deploy, "prepare_image", fake_install)
    res = build(base)
    assert res.exit_code == 0, res.output
    image_id = res.output.strip().splitlines()[-1]
    [c] = seen
    assert c.provider == "ec2" and len(c.nodes) == 1 and c.name.startswith("ami-")
    [image] = client.describe_images(ImageIds=[image_id])["Images"]
    tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    assert image["State"] == "available" and ec2.TAG_AMI in tags
    assert ec2.TAG_CLUSTER not in tags  # `cluster down` never touches the image
    # the builder and everything it made are gone, here and in the account
    assert live_instances(client) == []
    assert not any(ec2.tagged_resources(client, c.name).values())
    assert not model.cluster_dir(c.name).exists()
    # and `cluster up` now picks this image over Ubuntu
    assert ec2.find_image(client, None, "x86_64")["ImageId"] == image_id


def test_a_failed_ssh_half_leaves_nothing_and_no_image(aws, monkeypatch):
    client, base = aws
    names: list[str] = []

    def broken(c: model.Cluster, progress) -> None:
        names.append(c.name)
        raise SSHError("node0 1.2.3.4", "bootstrap failed")

    monkeypatch.setattr(deploy, "prepare_image", broken)
    res = build(base)
    assert res.exit_code == 1 and "[node0 1.2.3.4] bootstrap failed" in res.output
    assert live_instances(client) == []
    assert not any(ec2.tagged_resources(client, names[0]).values())
    images = client.describe_images(Owners=["self"])["Images"]
    assert [i["ImageId"] for i in images] == [base]


def test_declined_confirmation_creates_nothing(aws):
    client, base = aws
    res = CliRunner().invoke(cli, ["ami", "build", "--base-ami", base, "--ssh-cidr", CIDR],
                             input="n\n")
    assert res.exit_code == 1 and "nothing was created" in res.output
    assert live_instances(client) == []
