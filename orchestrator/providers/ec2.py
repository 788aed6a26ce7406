"""The ``ec2`` provider: relufit clusters on Amazon EC2. The only module that imports boto3.

A cluster ``NAME`` in a region is, in the account:

- a key pair ``relufit-NAME`` (ed25519, generated here; only the public half is imported,
  the private key stays in ``$RELUFIT_HOME/clusters/NAME/id_ed25519``, mode 0600);
- a security group ``relufit-NAME`` in the VPC: SSH (TCP 22) from ``--ssh-cidr`` only,
  relufit's ports (TCP ``RELUFIT_PORTS``, the master's and agents' ZeroMQ sockets) from
  members of the group only, nothing else in, nothing from 0.0.0.0/0 or ::/0;
- instances rank 0 (master) .. N (workers), all in one availability zone, IMDSv2 only,
  an encrypted gp3 root volume deleted with the instance, ``InstanceInitiatedShutdownBehavior
  =terminate`` and user-data whose first act is ``shutdown -h +<max-hours>`` (so a forgotten
  cluster terminates itself), then the autostop watchdog (``--idle-minutes``: each node halts,
  so terminates, once no relufit run has been active on it that long; worker/watchdog.py),
  then the node bootstrap script (package data, ``orchestrator/data/bootstrap.sh``).

Every resource carries ``relufit:cluster=NAME`` and ``relufit:role`` (``master``/``worker``;
``shared`` on the key pair and group), instances and their volumes also ``relufit:rank``,
``relufit:user`` (the login user), ``relufit:launch`` (the launch attempt id) and
``relufit:idle-minutes`` (autostop's limit, for ``status``). Tags are the
truth: ``down``, ``list``, ``status`` and ``gc`` work from them alone; local state is a cache.

Launch attempts: each ``up`` gets an id (persisted in ``clusters/NAME/launch``), and every
``RunInstances`` a ``ClientToken`` derived from (name, attempt, zone, rank): a retried call
never doubles an instance, and an ``up`` killed before it could clean up resumes on re-run.
Errors become one-line ``CloudError``/``ConfigError`` messages that name the fix; a failed or
interrupted ``up`` (Ctrl-C included) removes everything tagged with the cluster, then re-raises.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import os
import random
import shlex
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)

from orchestrator import pricing
from orchestrator.cluster import (
    Cluster,
    ClusterSpec,
    Node,
    cluster_dir,
    key_path,
    make_cluster_dir,
    new_key_pair,
    read_cluster,
    remove_cluster_state,
    save_cluster,
)
from orchestrator.distribution import bootstrap_script
from orchestrator.errors import CloudError, ConfigError, RelufitError

Progress = Callable[[str], None]
Confirm = Callable[[str], bool]

TAG_CLUSTER = "relufit:cluster"
TAG_ROLE = "relufit:role"
TAG_RANK = "relufit:rank"
TAG_USER = "relufit:user"
TAG_LAUNCH = "relufit:launch"
TAG_IDLE = "relufit:idle-minutes"  # autostop's limit, for `status` when SSH cannot say
TAG_AMI = "relufit:ami"  # on images built by `relufit ami build`
RELUFIT_PORTS = (5555, 5655)  # TCP, inclusive: master and agent sockets, open within the group
UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_NAMES = ("ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-{arch}-server-*",
                "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-{arch}-server-*")
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
CHECKIP_URL = "https://checkip.amazonaws.com"
LAUNCH_FILE = "launch"

# Capacity errors: another zone may have room. Quota errors: no zone will (regional limits).
CAPACITY_ERRORS = frozenset({"InsufficientInstanceCapacity", "InsufficientCapacity",
                             "InsufficientHostCapacity", "SpotMaxPriceTooLow", "Unsupported"})
QUOTA_ERRORS = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded",
                          "MaxSpotInstanceCountExceeded", "PendingVerification"})
AUTH_ERRORS = frozenset({"AuthFailure", "ExpiredToken", "ExpiredTokenException",
                         "RequestExpired", "UnrecognizedClientException",
                         "InvalidClientTokenId", "SignatureDoesNotMatch"})
THROTTLE = "RequestLimitExceeded"

# Waiting: tests set POLL_S to 0 (or RELUFIT_EC2_POLL_S) and replace _pause.
POLL_S = float(os.environ.get("RELUFIT_EC2_POLL_S", "5"))
WAIT_RUNNING_S = 600.0
WAIT_STATUS_S = 900.0
WAIT_TERMINATED_S = 600.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
BACKOFF_TRIES = 7
GC_GRACE_S = 900.0  # gc leaves clusters younger than this alone (their `up` may be running)
_jitter = random.Random()


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def backoff_s(attempt: int, rng: random.Random = _jitter) -> float:
    """Exponential backoff with jitter: half the capped delay, plus up to as much again."""
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt)
    return delay / 2 + rng.uniform(0, delay / 2)


# ---------------------------------------------------------------- errors -> one line


def _code(e: ClientError) -> str:
    return e.response.get("Error", {}).get("Code", "")


def cloud_error(e: ClientError, what: str) -> RelufitError:
    """The one-line message, naming the fix, for an EC2 error while doing ``what``."""
    code = _code(e)
    if code in AUTH_ERRORS:
        return CloudError(f"AWS rejected the credentials ({code}) while {what}: refresh them "
                          "(`aws sso login`, a new session token, or `aws configure`)")
    if code == "UnauthorizedOperation":
        return CloudError(f"not permitted ({code}) while {what}: give your IAM user or role "
                          "the EC2 permissions relufit needs (README: EC2 clusters)")
    if code == "OptInRequired":
        return CloudError(f"the region is not enabled for this account ({code}): enable it "
                          "in the AWS console or pass another --region")
    if code in QUOTA_ERRORS:
        return CloudError(f"EC2 quota reached ({code}) while {what}: request an increase in "
                          "the Service Quotas console (EC2 On-Demand/Spot vCPUs), or ask "
                          "for fewer or smaller instances")
    if code == THROTTLE:
        return CloudError(f"EC2 kept throttling requests ({code}) while {what}: wait a "
                          "minute and run the command again")
    msg = e.response.get("Error", {}).get("Message", str(e))
    return CloudError(f"EC2 said {code} while {what}: {msg}")


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Turn botocore's exceptions into relufit's one-line errors."""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise CloudError("no AWS credentials found: run `aws configure` (or `aws sso login`), "
                         "or set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") \
            from None
    except ProfileNotFound as e:
        raise CloudError(f"AWS profile {e.kwargs.get('profile')!r} not found: fix AWS_PROFILE "
                         "or create it with `aws configure --profile NAME`") from None
    except EndpointConnectionError as e:
        raise CloudError(f"cannot reach EC2 at {e.kwargs.get('endpoint_url')}: check --region "
                         "and your network") from None
    except ClientError as e:
        raise cloud_error(e, what) from None
    except BotoCoreError as e:
        raise CloudError(f"AWS client error while {what}: {e}") from None


# ---------------------------------------------------------------- session and client


@functools.cache
def _shared_loader() -> botocore.loaders.Loader:
    """botocore's API models are static and take ~0.2 s to parse: parse them once."""
    return botocore.loaders.create_loader()


def _botocore_session() -> botocore.session.Session:
    """A fresh session (it reads AWS_PROFILE and the environment) on the shared loader."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader())
    return core


@functools.cache
def _known_regions() -> frozenset[str]:
    """Every EC2 region in botocore's (static) endpoint data, all partitions."""
    session = boto3.Session(botocore_session=_botocore_session())
    return frozenset(r for p in session.get_available_partitions()
                     for r in session.get_available_regions("ec2", partition_name=p))


def resolve_region(region: str | None) -> tuple[boto3.Session, str]:
    """The boto3 session (AWS_PROFILE honoured) and a region that EC2 has."""
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    with aws_errors("reading the AWS configuration"):
        session = boto3.Session(botocore_session=_botocore_session(),
                                region_name=region or None)
    region = session.region_name
    if not region:
        raise ConfigError("--region", "no AWS region: pass --region, set AWS_REGION, or set "
                                      "a region in your AWS profile")
    if region not in _known_regions():
        raise ConfigError("--region", f"{region!r} is not an EC2 region (e.g. us-east-1, "
                                      "eu-west-1)")
    return session, region


def client(region: str | None) -> tuple[Any, str]:
    """An EC2 client and its region. AWS_ENDPOINT_URL (boto3 >= 1.28) redirects it."""
    session, region = resolve_region(region)
    # botocore retries throttling and transient errors itself; ours add capacity handling.
    config = BotoConfig(retries={"mode": "standard", "max_attempts": 5},
                        connect_timeout=10, read_timeout=60)
    with aws_errors("creating the EC2 client"):
        try:
            return session.client("ec2", region_name=region, config=config), region
        except NoRegionError:
            raise ConfigError("--region", "no AWS region: pass --region") from None


def caller_cidr(timeout: float = 3.0) -> str:
    """This machine's public IP as a /32 (or /128), as EC2 will see it."""
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=timeout) as r:
            ip = ipaddress.ip_address(r.read(64).decode().strip())
    except (OSError, ValueError):
        raise ConfigError("--ssh-cidr", f"cannot find this machine's public IP ({CHECKIP_URL} "
                                        "did not answer): pass --ssh-cidr YOUR.IP/32") from None
    return f"{ip}/{ip.max_prefixlen}"


# ---------------------------------------------------------------- tags and lookups


def _tag_specs(resource_types: tuple[str, ...], name: str, role: str,
               **more: str) -> list[dict]:
    tags = [{"Key": TAG_CLUSTER, "Value": name}, {"Key": TAG_ROLE, "Value": role}]
    tags += [{"Key": f"relufit:{k}", "Value": v} for k, v in more.items()]
    return [{"ResourceType": t, "Tags": tags} for t in resource_types]


def tags_of(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _cluster_filter(name: str | None) -> dict:
    if name is None:
        return {"Name": "tag-key", "Values": [TAG_CLUSTER]}
    return {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]}


def instances(ec2: Any, name: str | None = None,
              states: tuple[str, ...] = LIVE_STATES) -> list[dict]:
    """Instances tagged with cluster ``name`` (any relufit cluster if None) in ``states``."""
    filters = [_cluster_filter(name), {"Name": "instance-state-name", "Values": list(states)}]
    out: list[dict] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            out.extend(reservation["Instances"])
    return out


def security_groups(ec2: Any, name: str | None = None) -> list[dict]:
    return ec2.describe_security_groups(Filters=[_cluster_filter(name)])["SecurityGroups"]


def key_pairs(ec2: Any, name: str | None = None) -> list[dict]:
    return ec2.describe_key_pairs(Filters=[_cluster_filter(name)])["KeyPairs"]


def volumes(ec2: Any, name: str | None = None, state: str = "available") -> list[dict]:
    filters = [_cluster_filter(name), {"Name": "status", "Values": [state]}]
    return ec2.describe_volumes(Filters=filters)["Volumes"]


def tagged_resources(ec2: Any, name: str | None = None) -> dict[str, list[str]]:
    """Every live resource tagged with the cluster (any cluster if None), by kind."""
    return {
        "instances": [i["InstanceId"] for i in instances(ec2, name)],
        "security groups": [g["GroupId"] for g in security_groups(ec2, name)],
        "key pairs": [k["KeyName"] for k in key_pairs(ec2, name)],
        "volumes": [v["VolumeId"] for v in volumes(ec2, name, "available")]
                   + [v["VolumeId"] for v in volumes(ec2, name, "in-use")],
    }


def to_cluster(name: str, region: str, found: list[dict]) -> Cluster:
    """The cluster model of ``found`` (instances of cluster ``name``), from their tags."""
    nodes = []
    for inst in sorted(found, key=lambda i: int(tags_of(i).get(TAG_RANK, "0"))):
        tags = tags_of(inst)
        private = inst.get("PrivateIpAddress", "")
        nodes.append(Node(rank=int(tags.get(TAG_RANK, "0")), role=tags.get(TAG_ROLE, "worker"),
                          address=inst.get("PublicIpAddress") or private,
                          private_address=private, user=tags.get(TAG_USER, "ubuntu"),
                          instance_id=inst["InstanceId"]))
    first = found[0] if found else {}
    groups = [g["GroupId"] for g in first.get("SecurityGroups", [])] or [
        g["GroupId"] for nic in first.get("NetworkInterfaces", []) for g in nic.get("Groups", [])]
    extra = {"security_group": groups[0] if groups else None,
             "key_name": first.get("KeyName"),
             "availability_zone": first.get("Placement", {}).get("AvailabilityZone"),
             "launch": tags_of(first).get(TAG_LAUNCH),
             "master_instance_type": first.get("InstanceType")}  # shown by `cluster status`
    return Cluster(name=name, provider="ec2", nodes=tuple(nodes), key_path=str(key_path(name)),
                   region=region, extra=extra)


def find_cluster(name: str, region: str | None = None) -> Cluster | None:
    """Cluster ``name`` rebuilt from its tags alone (no local state needed); None if none."""
    local = read_cluster(name)
    ec2, region = client(region or (local.region if local else None))
    with aws_errors(f"looking up cluster {name}"):
        found = instances(ec2, name, ("pending", "running"))
    return to_cluster(name, region, found) if found else None


# ---------------------------------------------------------------- the launch plan


@dataclass(frozen=True)
class Plan:
    """Everything checked before anything is created."""

    spec: ClusterSpec
    region: str
    image_id: str
    image_name: str
    root_device: str
    volume_gb: int
    vpc_id: str
    placements: tuple[tuple[str, str], ...]  # (zone, subnet id), in the order to try

    def describe(self) -> str:
        s = self.spec
        zones = ", ".join(z for z, _ in self.placements)
        market = "spot" if s.spot else "on-demand"
        return (f"Cluster {s.name} in {self.region}: master {s.master_type} + {s.workers} x "
                f"{s.instance_type} ({market}), image {self.image_id} ({self.image_name}), "
                f"zones in order {zones}, SSH from {s.ssh_cidr}, self-terminating after "
                f"{s.max_hours:g} h" + (f" or {s.idle_minutes:g} min with no run (each node "
                                        "on its own)" if s.idle_minutes else ""))


def _check_instance_types(ec2: Any, spec: ClusterSpec, region: str) -> str:
    """The CPU architecture of the cluster; ConfigError for an unknown or mixed type."""
    archs = {}
    checks = [("--instance-type", spec.instance_type)]
    if spec.master_instance_type:
        checks.append(("--master-instance-type", spec.master_instance_type))
    for flag, itype in checks:
        try:
            info = ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"]
        except ClientError as e:
            if _code(e).startswith("InvalidInstanceType") or _code(e) == "InvalidParameterValue":
                info = []
            else:
                raise
        if not info:
            raise ConfigError(flag, f"{itype!r} is not an instance type offered in {region} "
                                    "(e.g. c5.large, m5.xlarge)")
        supported = info[0]["ProcessorInfo"]["SupportedArchitectures"]
        archs[flag] = "arm64" if "arm64" in supported else "x86_64"
    if len(set(archs.values())) > 1:
        raise ConfigError("--master-instance-type", "master and workers need the same CPU "
                                                    "architecture (one image for all)")
    return archs["--instance-type"]


def _newest(images: list[dict]) -> dict | None:
    return max(images, key=lambda i: i.get("CreationDate", ""), default=None)


def find_image(ec2: Any, ami: str | None, arch: str) -> dict:
    """``--ami``, else the newest image tagged relufit:ami, else the newest Ubuntu LTS."""
    if ami:
        try:
            found = ec2.describe_images(ImageIds=[ami])["Images"]
        except ClientError as e:
            if not _code(e).startswith("InvalidAMIID"):
                raise
            found = []
        if not found:
            raise ConfigError("--ami", f"{ami} does not exist in this region")
        return found[0]
    available = {"Name": "state", "Values": ["available"]}
    by_arch = {"Name": "architecture", "Values": [arch]}
    own = ec2.describe_images(Owners=["self"], Filters=[
        {"Name": "tag-key", "Values": [TAG_AMI]}, available, by_arch])["Images"]
    ubuntu_arch = "arm64" if arch == "arm64" else "amd64"
    image = _newest(own) or _newest(ec2.describe_images(Owners=[UBUNTU_OWNER], Filters=[
        {"Name": "name", "Values": [n.format(arch=ubuntu_arch) for n in UBUNTU_NAMES]},
        available, by_arch])["Images"])
    if image is None:
        raise CloudError(f"no Ubuntu 22.04/24.04 {arch} image found in this region: "
                         "pass --ami AMI_ID")
    return image


def _placements(ec2: Any, spec: ClusterSpec, region: str) -> tuple[str, list[tuple[str, str]]]:
    """The VPC and the (zone, subnet) pairs to try, preferred zone first."""
    if spec.subnet:
        try:
            subnet = ec2.describe_subnets(SubnetIds=[spec.subnet])["Subnets"][0]
        except ClientError as e:
            if not _code(e).startswith("InvalidSubnetID"):
                raise
            raise ConfigError("--subnet", f"{spec.subnet} does not exist in {region}") from None
        return subnet["VpcId"], [(subnet["AvailabilityZone"], subnet["SubnetId"])]
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise CloudError(f"{region} has no default VPC: pass --subnet SUBNET_ID (a subnet "
                         "whose route table reaches an internet gateway)")
    vpc = vpcs[0]["VpcId"]
    zones = {z["ZoneName"] for z in ec2.describe_availability_zones(Filters=[
        {"Name": "state", "Values": ["available"]},
        {"Name": "zone-type", "Values": ["availability-zone"]}])["AvailabilityZones"]}
    for itype in set(spec.instance_types()):
        offered = ec2.describe_instance_type_offerings(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [itype]}])["InstanceTypeOfferings"]
        zones &= {o["Location"] for o in offered}
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                            {"Name": "default-for-az", "Values": ["true"]}])
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets["Subnets"]
               if s["AvailabilityZone"] in zones}
    if spec.availability_zone and spec.availability_zone not in by_zone:
        raise ConfigError("--availability-zone", f"{spec.availability_zone} has no default "
                          f"subnet offering the instance types; zones: "
                          f"{', '.join(sorted(by_zone)) or 'none'}")
    if not by_zone:
        raise CloudError(f"no zone of {region} offers {', '.join(set(spec.instance_types()))} "
                         "in the default VPC: pass --subnet, or another --instance-type")
    order = sorted(by_zone, key=lambda z: (z != spec.availability_zone, z))
    return vpc, [(z, by_zone[z]) for z in order]


def make_plan(ec2: Any, spec: ClusterSpec, region: str) -> Plan:
    """Check instance types, image and network; create nothing."""
    arch = _check_instance_types(ec2, spec, region)
    image = find_image(ec2, spec.ami, arch)
    root = image.get("RootDeviceName", "/dev/sda1")
    sizes = [m["Ebs"].get("VolumeSize", 0) for m in image.get("BlockDeviceMappings", [])
             if m.get("DeviceName") == root and "Ebs" in m]
    vpc, placements = _placements(ec2, spec, region)
    return Plan(spec=spec, region=region, image_id=image["ImageId"],
                image_name=image.get("Name", ""), root_device=root,
                volume_gb=max([spec.volume_gb, *sizes]), vpc_id=vpc,
                placements=tuple(placements))


# ---------------------------------------------------------------- user-data and launch args


def user_data(spec: ClusterSpec, rank: int, bootstrap: str) -> str:
    """Kill switch first (so nothing outlives --max-hours), then the bootstrap as the user."""
    minutes = max(1, math.ceil(spec.max_hours * 60))
    role = "master" if rank == 0 else "worker"
    return (
        "#!/bin/bash\n"
        f"# relufit cluster {spec.name}, rank {rank} ({role}).\n"
        "# Kill switch: halt after --max-hours; InstanceInitiatedShutdownBehavior=terminate\n"
        "# turns the halt into termination, so a forgotten cluster stops billing.\n"
        f'shutdown -h +{minutes} "relufit: --max-hours={spec.max_hours:g} reached"\n'
        "install -d -m 0755 /opt/relufit\n"
        "cat > /opt/relufit/bootstrap.sh <<'RELUFIT_BOOTSTRAP_EOF'\n"
        f"{bootstrap.rstrip()}\n"
        "RELUFIT_BOOTSTRAP_EOF\n"
        "chmod 0755 /opt/relufit/bootstrap.sh\n"
        f"{watchdog_user_data(spec)}"
        f"sudo -u {spec.user} -H sh /opt/relufit/bootstrap.sh "
        ">/var/log/relufit-bootstrap.log 2>&1\n"
    )


def watchdog_user_data(spec: ClusterSpec) -> str:
    """Autostop: the node's own watchdog (worker/watchdog.py, packed), started as root before
    the bootstrap and outside cloud-init's service (systemd-run, else setsid). It halts the
    node once no relufit run has been active there for --idle-minutes; the halt terminates
    the instance, as the kill switch's does. Nothing for --idle-minutes 0."""
    if not spec.idle_minutes:
        return ""
    from orchestrator import autostop

    user = shlex.quote(spec.user)
    args = autostop.watchdog_args(spec.idle_minutes, "poweroff")
    return (
        f"# Autostop: halt after --idle-minutes={spec.idle_minutes:g} with no relufit run.\n"
        "base64 -d > /opt/relufit/watchdog.py.gz <<'RELUFIT_WATCHDOG_EOF'\n"
        f"{autostop.packed_source()}"
        "RELUFIT_WATCHDOG_EOF\n"
        "gunzip -f /opt/relufit/watchdog.py.gz\n"
        f"home=$(getent passwd {user} | cut -d: -f6)\n"
        f'install -d -m 0755 "$home/.relufit" && chown {user}: "$home/.relufit"\n'
        f'set -- /usr/bin/python3 /opt/relufit/watchdog.py {args} --home "$home"\n'
        'systemd-run --unit relufit-watchdog --quiet "$@" 2>/dev/null || '
        '{ setsid nohup "$@" >/var/log/relufit-watchdog.log 2>&1 </dev/null & }\n'
    )


def client_token(name: str, attempt: str, zone: str, rank: int) -> str:
    """Same inputs, same token: EC2 then returns the instance instead of a second one."""
    digest = hashlib.sha256(f"{name}/{attempt}/{zone}/{rank}".encode()).hexdigest()
    return f"relufit-{digest[:48]}"


def run_args(plan: Plan, rank: int, zone: str, subnet: str, attempt: str,
             bootstrap: str, group_id: str | None, key_name: str | None) -> dict:
    """RunInstances arguments of one node (group and key omitted for a dry run)."""
    s = plan.spec
    role = "master" if rank == 0 else "worker"
    nic: dict[str, Any] = {"DeviceIndex": 0, "SubnetId": subnet,
                           "AssociatePublicIpAddress": True, "DeleteOnTermination": True}
    if group_id:
        nic["Groups"] = [group_id]
    args: dict[str, Any] = {
        "ImageId": plan.image_id, "MinCount": 1, "MaxCount": 1,
        "InstanceType": s.instance_types()[rank],
        "NetworkInterfaces": [nic],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": plan.root_device, "Ebs": {
            "VolumeSize": plan.volume_gb, "VolumeType": "gp3", "Encrypted": True,
            "DeleteOnTermination": True}}],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "UserData": user_data(s, rank, bootstrap),
        "ClientToken": client_token(s.name, attempt, zone, rank),
        "TagSpecifications": _tag_specs(("instance", "volume"), s.name, role, rank=str(rank),
                                        user=s.user, launch=attempt,
                                        **{"idle-minutes": f"{s.idle_minutes:g}"}),
    }
    if key_name:
        args["KeyName"] = key_name
    if s.spot:
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    return args


# ---------------------------------------------------------------- creating


def with_backoff(call: Callable[[], Any]) -> Any:
    """``call()``, retried with jittered exponential backoff while EC2 throttles us."""
    for attempt in range(BACKOFF_TRIES):
        try:
            return call()
        except ClientError as e:
            if _code(e) != THROTTLE or attempt == BACKOFF_TRIES - 1:
                raise
            _pause(backoff_s(attempt))
    raise AssertionError("unreachable")


def _ensure_key_pair(ec2: Any, name: str, progress: Progress) -> str:
    key_name = f"relufit-{name}"
    existing = key_pairs(ec2, name)
    if existing and key_path(name).exists():
        return existing[0]["KeyName"]  # a resumed launch: same key as its instances
    for k in existing:  # no private key for it here: it is useless, replace it
        ec2.delete_key_pair(KeyName=k["KeyName"])
    public = new_key_pair(name)
    ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=public.encode(),
                        TagSpecifications=_tag_specs(("key-pair",), name, "shared"))
    progress(f"Key pair {key_name} imported; private key in {key_path(name)}")
    return key_name


def ingress_rules(ssh_cidr: str, group_id: str) -> list[dict]:
    """SSH from ``ssh_cidr`` only; relufit's ports from the group itself only."""
    net = ipaddress.ip_network(ssh_cidr)
    ssh: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    if net.version == 4:
        ssh["IpRanges"] = [{"CidrIp": str(net), "Description": "relufit: SSH from --ssh-cidr"}]
    else:
        ssh["Ipv6Ranges"] = [{"CidrIpv6": str(net),
                              "Description": "relufit: SSH from --ssh-cidr"}]
    lo, hi = RELUFIT_PORTS
    ports = {"IpProtocol": "tcp", "FromPort": lo, "ToPort": hi, "UserIdGroupPairs": [
        {"GroupId": group_id, "Description": "relufit: master and agents, within the group"}]}
    return [ssh, ports]


def _ensure_security_group(ec2: Any, plan: Plan, progress: Progress) -> str:
    s = plan.spec
    group_name = f"relufit-{s.name}"
    for g in security_groups(ec2, s.name):
        if g["VpcId"] == plan.vpc_id:
            return g["GroupId"]  # a resumed launch
    group_id = ec2.create_security_group(
        GroupName=group_name, VpcId=plan.vpc_id,
        Description=f"relufit cluster {s.name}: SSH from {s.ssh_cidr}, relufit ports in-group",
        TagSpecifications=_tag_specs(("security-group",), s.name, "shared"))["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id,
                                         IpPermissions=ingress_rules(s.ssh_cidr, group_id))
    progress(f"Security group {group_id}: SSH from {s.ssh_cidr}, TCP "
             f"{RELUFIT_PORTS[0]}-{RELUFIT_PORTS[1]} within the group")
    return group_id


def launch_nodes(ec2: Any, plan: Plan, attempt: str, group_id: str | None,
                 key_name: str | None, progress: Progress,
                 resumed: Sequence[dict] = ()) -> list[str]:
    """Launch every node in one zone; on a capacity error, the next zone. Instance ids.

    ``resumed``: live instances of this launch attempt (an ``up`` killed before cleanup);
    their ranks are kept rather than launched again.
    """
    bootstrap = bootstrap_script()
    refused = []
    for zone, subnet in plan.placements:
        kept = {int(tags_of(i)[TAG_RANK]): i["InstanceId"] for i in resumed
                if i.get("Placement", {}).get("AvailabilityZone") == zone}
        launched: list[str] = []
        try:
            for rank in range(plan.spec.workers + 1):
                if rank in kept:
                    launched.append(kept[rank])
                    continue
                args = run_args(plan, rank, zone, subnet, attempt, bootstrap, group_id,
                                key_name)
                inst = with_backoff(lambda a=args: ec2.run_instances(**a))["Instances"][0]
                launched.append(inst["InstanceId"])
                progress(f"  rank {rank}: {inst['InstanceId']} ({args['InstanceType']}, "
                         f"{zone})")
            return launched
        except ClientError as e:
            if _code(e) not in CAPACITY_ERRORS:
                raise
            refused.append(f"{zone}: {_code(e)}")
            progress(f"No capacity in {zone} ({_code(e)}); trying the next zone")
            if launched:  # a cluster lives in one zone: give these back
                ec2.terminate_instances(InstanceIds=launched)
    hint = " or without --spot" if plan.spec.spot else ""
    raise CloudError(f"no capacity for {', '.join(sorted(set(plan.spec.instance_types())))} "
                     f"in any zone of {plan.region} ({'; '.join(refused)}): try another "
                     f"--instance-type or --region{hint}, or later")


def _wait(what: str, check: Callable[[], tuple[bool, str]], timeout_s: float,
          progress: Progress) -> None:
    """Poll ``check`` (-> done, progress text) every POLL_S until done or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        done, text = check()
        if text != last:
            progress(f"  {what}: {text}")
            last = text
        if done:
            return
        if time.monotonic() > deadline:
            raise CloudError(f"gave up waiting for {what} after {timeout_s / 60:.0f} min "
                             f"({text}); `relufit cluster down` removes what exists")
        _pause(POLL_S)


def wait_running(ec2: Any, ids: list[str], progress: Progress) -> None:
    def check() -> tuple[bool, str]:
        found = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
                 for i in r["Instances"]]
        dead = [i for i in found if i["State"]["Name"] in ("shutting-down", "terminated")]
        if dead:
            reason = dead[0].get("StateReason", {}).get("Message", "no reason given")
            raise CloudError(f"instance {dead[0]['InstanceId']} ended while starting: {reason}")
        running = sum(i["State"]["Name"] == "running" for i in found)
        return running == len(ids), f"{running}/{len(ids)} running"
    _wait("instances", check, WAIT_RUNNING_S, progress)


def wait_status_ok(ec2: Any, ids: list[str], progress: Progress) -> None:
    def check() -> tuple[bool, str]:
        statuses = ec2.describe_instance_status(InstanceIds=ids, IncludeAllInstances=True)
        ok = sum(s["InstanceStatus"]["Status"] == "ok" and s["SystemStatus"]["Status"] == "ok"
                 for s in statuses["InstanceStatuses"])
        return ok == len(ids), f"{ok}/{len(ids)} passed"
    _wait("status checks", check, WAIT_STATUS_S, progress)


def _launch_attempt(name: str, existing: list[dict], region: str) -> str:
    """This launch's id: a new one, or the one of an interrupted launch being resumed."""
    path = cluster_dir(name) / LAUNCH_FILE
    attempt = path.read_text().strip() if path.exists() else ""
    if existing and not (attempt and all(tags_of(i).get(TAG_LAUNCH) == attempt
                                         for i in existing)):
        raise CloudError(f"cluster {name!r} already exists in {region} ({len(existing)} "
                         f"instances): use it, or `relufit cluster down {name}` first")
    return attempt or uuid.uuid4().hex[:12]


def _record_attempt(name: str, attempt: str) -> None:
    (make_cluster_dir(name) / LAUNCH_FILE).write_text(attempt + "\n")


def dry_run(ec2: Any, plan: Plan, progress: Progress) -> None:
    """Ask EC2 whether each creating call would be allowed (DryRun=True); create nothing."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH)  # in memory only
    s = plan.spec
    zone, subnet = plan.placements[0]
    bootstrap = bootstrap_script()
    calls = [
        ("import the key pair", lambda: ec2.import_key_pair(
            KeyName=f"relufit-{s.name}", PublicKeyMaterial=public, DryRun=True,
            TagSpecifications=_tag_specs(("key-pair",), s.name, "shared"))),
        ("create the security group", lambda: ec2.create_security_group(
            GroupName=f"relufit-{s.name}", Description="relufit dry run", VpcId=plan.vpc_id,
            DryRun=True, TagSpecifications=_tag_specs(("security-group",), s.name, "shared"))),
    ] + [(f"launch rank {r} ({s.instance_types()[r]})", lambda r=r: ec2.run_instances(
        DryRun=True, **run_args(plan, r, zone, subnet, "dryrun", bootstrap, None, None)))
        for r in sorted({0, 1})]
    for what, call in calls:
        try:
            call()
        except ClientError as e:
            if _code(e) == "DryRunOperation":
                progress(f"  dry run: allowed to {what}")
                continue
            if _code(e) == "UnauthorizedOperation":
                raise CloudError(f"dry run: not permitted to {what} (UnauthorizedOperation): "
                                 "give your IAM user or role that EC2 permission") from None
            raise
        teardown(ec2, s.name, progress)  # the endpoint ignored DryRun: undo, and say so
        raise CloudError(f"dry run: the EC2 endpoint ignored DryRun when asked to {what}; "
                         "what it created has been removed")
    progress("Dry run passed: nothing was created.")


def up(spec: ClusterSpec, *, confirm: Confirm, progress: Progress,
       dry_run_only: bool = False) -> Cluster | None:
    """Create cluster ``spec``: key pair, security group, instances; wait until usable.

    Any failure or Ctrl-C after creation began removes everything tagged with the cluster,
    says so, and re-raises. Returns None for a dry run.
    """
    local = read_cluster(spec.name)
    if local is not None and local.provider != "ec2":
        raise RelufitError(f"cluster {spec.name!r} already exists here ({local.provider}): "
                           f"pick another --name, or `relufit cluster down {spec.name}` first")
    ec2, region = client(spec.region)
    with aws_errors(f"checking for cluster {spec.name}"):
        existing = instances(ec2, spec.name)
    attempt = _launch_attempt(spec.name, existing, region)
    spec = replace(spec, region=region, ssh_cidr=spec.ssh_cidr or caller_cidr())
    with aws_errors("checking the cluster spec"):
        plan = make_plan(ec2, spec, region)
    progress(plan.describe())
    progress(pricing.describe(spec.instance_types(), plan.volume_gb, spec.spot))
    if dry_run_only:
        with aws_errors("dry-running the launch"):
            dry_run(ec2, plan, progress)
        return None
    if not confirm(f"Launch {spec.workers + 1} instances in {region}?"):
        raise RelufitError("cancelled: nothing was created")
    with aws_errors(f"creating cluster {spec.name}"):
        try:
            return _create(ec2, plan, attempt, progress)
        except BaseException as e:
            _undo(ec2, spec.name, e, progress)
            raise


def _create(ec2: Any, plan: Plan, attempt: str, progress: Progress) -> Cluster:
    name = plan.spec.name
    _record_attempt(name, attempt)
    resumed = instances(ec2, name)  # only this attempt's: _launch_attempt checked
    if not resumed:  # a group or key pair of an earlier cluster of this name: start afresh
        stale = teardown(ec2, name, progress)
        if any(stale.values()):
            progress(f"Removed what an earlier cluster {name} left: {_summary(stale)}")
    key_name = _ensure_key_pair(ec2, name, progress)
    group_id = _ensure_security_group(ec2, plan, progress)
    verb = "Resuming" if resumed else "Launching"
    progress(f"{verb} {plan.spec.workers + 1} instances (launch {attempt})")
    ids = launch_nodes(ec2, plan, attempt, group_id, key_name, progress, resumed)
    wait_running(ec2, ids, progress)
    wait_status_ok(ec2, ids, progress)
    found = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
             for i in r["Instances"]]
    c = to_cluster(name, plan.region, found)
    save_cluster(c)
    (cluster_dir(name) / LAUNCH_FILE).unlink(missing_ok=True)
    progress(f"Cluster {name} is up: master {c.master.address}; "
             f"`relufit cluster ssh {name}` to log in, `relufit cluster down {name}` to remove")
    return c


def _undo(ec2: Any, name: str, cause: BaseException, progress: Progress) -> None:
    """Remove everything tagged with ``name`` after a failed or interrupted ``up``."""
    why = "Interrupted" if isinstance(cause, KeyboardInterrupt) else "Launch failed"
    progress(f"{why}: removing everything cluster {name} created ...")
    try:
        removed = teardown(ec2, name, progress)
        remove_cluster_state(name)
    except Exception as e:  # keep the original error; say how to finish the job
        progress(f"Cleanup failed ({e}): run `relufit cluster down {name}`")
        return
    progress(f"{why}: removed {_summary(removed) or 'nothing (nothing had been created)'}.")


# ---------------------------------------------------------------- removing


def _summary(removed: dict[str, list[str]]) -> str:
    """E.g. '2 instances, 1 security groups' (root volumes go with their instances)."""
    return ", ".join(f"{len(v)} {k}" for k, v in removed.items() if v and k != "volumes")


def delete_security_group(ec2: Any, group_id: str) -> None:
    """Delete a group; DependencyViolation (instances or ENIs still going) is retried."""
    for attempt in range(BACKOFF_TRIES * 2):
        try:
            ec2.delete_security_group(GroupId=group_id)
            return
        except ClientError as e:
            if _code(e) == "InvalidGroup.NotFound":
                return
            if _code(e) not in ("DependencyViolation", THROTTLE) \
                    or attempt == BACKOFF_TRIES * 2 - 1:
                raise
            _pause(backoff_s(attempt))


def wait_terminated(ec2: Any, ids: list[str], progress: Progress) -> None:
    def check() -> tuple[bool, str]:
        found = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
                 for i in r["Instances"]]
        done = sum(i["State"]["Name"] == "terminated" for i in found)
        return done == len(found), f"{done}/{len(found)} terminated"
    _wait("termination", check, WAIT_TERMINATED_S, progress)


def teardown(ec2: Any, name: str, progress: Progress) -> dict[str, list[str]]:
    """Terminate and delete everything tagged ``relufit:cluster=name``; what was removed."""
    found = tagged_resources(ec2, name)
    if found["instances"]:
        progress(f"Terminating {len(found['instances'])} instances of {name}")
        ec2.terminate_instances(InstanceIds=found["instances"])
        wait_terminated(ec2, found["instances"], progress)
    for group_id in found["security groups"]:
        delete_security_group(ec2, group_id)
    for key_name in found["key pairs"]:
        ec2.delete_key_pair(KeyName=key_name)
    for volume in volumes(ec2, name, "available"):  # root volumes went with the instances
        ec2.delete_volume(VolumeId=volume["VolumeId"])
    return found


def down(name: str, region: str | None, progress: Progress) -> bool:
    """Remove cluster ``name`` (from its tags) and its local state; False if nothing existed."""
    local = read_cluster(name)
    ec2, region = client(region or (local.region if local else None))
    with aws_errors(f"removing cluster {name}"):
        removed = teardown(ec2, name, progress)
    removed_local = remove_cluster_state(name)
    if not any(removed.values()):
        progress(f"Nothing to do: no resources of cluster {name} in {region}"
                 + (" (removed its local state)" if removed_local else ""))
        return removed_local
    progress(f"Cluster {name} removed from {region}: {_summary(removed)}")
    return True


# ---------------------------------------------------------------- list, status, gc


@dataclass(frozen=True)
class ClusterSummary:
    name: str
    region: str
    instances: int
    age_h: float
    cost_so_far: float | None  # None: a type with no price on record
    types: tuple[str, ...]


def _hours_since(t: datetime, now: datetime) -> float:
    return max(0.0, (now - t).total_seconds() / 3600)


def summarize(region: str, found: list[dict], now: datetime) -> list[ClusterSummary]:
    by_name: dict[str, list[dict]] = {}
    for inst in found:
        by_name.setdefault(tags_of(inst)[TAG_CLUSTER], []).append(inst)
    out = []
    for name, insts in sorted(by_name.items()):
        costs = [pricing.hourly(i["InstanceType"]) for i in insts]
        hours = [_hours_since(i["LaunchTime"], now) for i in insts]
        cost = None if None in costs else sum(c * h for c, h in zip(costs, hours, strict=True))
        out.append(ClusterSummary(name=name, region=region, instances=len(insts),
                                  age_h=max(hours), cost_so_far=cost,
                                  types=tuple(sorted({i["InstanceType"] for i in insts}))))
    return out


def enabled_regions(ec2: Any) -> list[str]:
    """The regions this account may use."""
    found = ec2.describe_regions(Filters=[
        {"Name": "opt-in-status", "Values": ["opt-in-not-required", "opted-in"]}])["Regions"]
    return sorted(r["RegionName"] for r in found)


def list_clusters(region: str | None, all_regions: bool,
                  progress: Progress) -> list[ClusterSummary]:
    """Every relufit cluster with live instances, in one region or in all of them."""
    ec2, region = client(region)
    now = datetime.now(timezone.utc)
    with aws_errors("listing clusters"):
        regions = enabled_regions(ec2) if all_regions else [region]
    out = []
    for r in regions:
        rc = ec2 if r == region else client(r)[0]
        try:
            with aws_errors(f"listing clusters in {r}"):
                out += summarize(r, instances(rc), now)
        except CloudError as e:
            if not all_regions:
                raise
            progress(f"skipped {r}: {e}")
    return out


def status(name: str, region: str | None) -> tuple[Cluster | None, list[dict]]:
    """The cluster's model (from tags) and one row per instance, including stopped ones."""
    local = read_cluster(name)
    ec2, region = client(region or (local.region if local else None))
    with aws_errors(f"reading cluster {name}"):
        found = instances(ec2, name)
    rows = [{"rank": int(tags_of(i).get(TAG_RANK, "0")), "role": tags_of(i).get(TAG_ROLE, "?"),
             "instance_id": i["InstanceId"], "type": i["InstanceType"],
             "state": i["State"]["Name"], "public_ip": i.get("PublicIpAddress", "-"),
             "private_ip": i.get("PrivateIpAddress", "-"),
             "zone": i.get("Placement", {}).get("AvailabilityZone", "-"),
             "idle_minutes": _idle_minutes(tags_of(i)), "launch_time": i["LaunchTime"]}
            for i in found]
    live = [i for i in found if i["State"]["Name"] in ("pending", "running")]
    return (to_cluster(name, region, live) if live else None), sorted(rows,
                                                                       key=lambda r: r["rank"])


def _idle_minutes(tags: dict[str, str]) -> float | None:
    """The autostop limit an instance was launched with (None: launched before the tag)."""
    try:
        return float(tags[TAG_IDLE])
    except (KeyError, ValueError):
        return None


def orphans(ec2: Any, now: datetime) -> dict[str, list[tuple[str, str]]]:
    """Tagged groups, key pairs and unattached volumes of clusters with no live instance.

    A cluster whose key pair is younger than GC_GRACE_S counts as live: its `up` may be
    between creating the group and launching the instances.
    """
    live = {tags_of(i)[TAG_CLUSTER] for i in instances(ec2)}
    live |= {tags_of(k)[TAG_CLUSTER] for k in key_pairs(ec2)
             if "CreateTime" in k and (now - k["CreateTime"]).total_seconds() < GC_GRACE_S}

    def dead(resources: list[dict], id_key: str) -> list[tuple[str, str]]:
        return [(r[id_key], tags_of(r)[TAG_CLUSTER]) for r in resources
                if tags_of(r).get(TAG_CLUSTER) not in live]
    return {"security groups": dead(security_groups(ec2), "GroupId"),
            "key pairs": dead(key_pairs(ec2), "KeyName"),
            "volumes": dead(volumes(ec2), "VolumeId")}


def gc(region: str | None, *, confirm: Confirm, progress: Progress) -> int:
    """Remove relufit-tagged resources that belong to no live cluster; how many."""
    ec2, region = client(region)
    with aws_errors("looking for leftovers"):
        found = orphans(ec2, datetime.now(timezone.utc))
        total = sum(len(v) for v in found.values())
        if not total:
            progress(f"Nothing to collect in {region}.")
            return 0
        for kind, items in found.items():
            for rid, name in items:
                progress(f"  {kind[:-1]} {rid} (cluster {name})")
        if not confirm(f"Delete these {total} resources in {region}?"):
            raise RelufitError("cancelled: nothing was deleted")
        for group_id, _ in found["security groups"]:
            delete_security_group(ec2, group_id)
        for key_name, _ in found["key pairs"]:
            ec2.delete_key_pair(KeyName=key_name)
        for volume_id, _ in found["volumes"]:
            ec2.delete_volume(VolumeId=volume_id)
    progress(f"Deleted {total} resources in {region}.")
    return total


# ---------------------------------------------------------------- worker AMI (deploy area)


def _ubuntu_image(ec2: Any, arch: str) -> dict:
    """The newest Ubuntu LTS image: the base of a relufit AMI (never a relufit AMI itself)."""
    ubuntu_arch = "arm64" if arch == "arm64" else "amd64"
    image = _newest(ec2.describe_images(Owners=[UBUNTU_OWNER], Filters=[
        {"Name": "name", "Values": [n.format(arch=ubuntu_arch) for n in UBUNTU_NAMES]},
        {"Name": "state", "Values": ["available"]},
        {"Name": "architecture", "Values": [arch]}])["Images"])
    if image is None:
        raise CloudError(f"no Ubuntu LTS {arch} image found in this region: pass --base-ami")
    return image


def build_ami(region: str | None, install: Callable[[Cluster, Progress], None], *,
              confirm: Confirm, progress: Progress, instance_type: str = "c5.large",
              base_ami: str | None = None, ssh_cidr: str | None = None,
              version: str = "") -> str:
    """Build a relufit worker AMI; its image id.

    Launches one builder instance (a temporary cluster ``ami-<hex>``, with its own key pair
    and locked-down group, user-data running bootstrap.sh, a 2-hour kill switch), hands it
    to ``install`` (the SSH half: deploy.prepare_image), images it, waits until the image is
    available, tags it ``relufit:ami`` and removes the builder and everything it made,
    whatever happens (Ctrl-C included)."""
    ec2, region = client(region)
    builder = f"ami-{uuid.uuid4().hex[:8]}"
    # no autostop: its watchdog must not halt the builder while the image is made
    spec = ClusterSpec(name=builder, workers=0, region=region, instance_type=instance_type,
                       ssh_cidr=ssh_cidr or caller_cidr(), max_hours=2.0, idle_minutes=0.0)
    with aws_errors("checking the builder"):
        plan = make_plan(ec2, replace(spec, ami=base_ami), region)
        if base_ami is None:
            base = _ubuntu_image(ec2, _check_instance_types(ec2, spec, region))
            plan = replace(plan, image_id=base["ImageId"], image_name=base.get("Name", ""))
    progress(f"AMI builder: {instance_type} in {region} from {plan.image_id} "
             f"({plan.image_name})")
    progress(pricing.describe([instance_type], plan.volume_gb, False))
    if not confirm(f"Launch one {instance_type} in {region} to build the image?"):
        raise RelufitError("cancelled: nothing was created")
    with aws_errors("building the AMI"):
        try:
            return _build(ec2, plan, install, progress, version)
        finally:
            removed = teardown(ec2, builder, progress)
            remove_cluster_state(builder)
            progress(f"Builder removed: {_summary(removed)}.")


def _build(ec2: Any, plan: Plan, install: Callable[[Cluster, Progress], None],
           progress: Progress, version: str) -> str:
    c = _create(ec2, plan, uuid.uuid4().hex[:12], progress)  # a cluster of one: the builder
    install(c, progress)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    tags = [{"Key": TAG_AMI, "Value": version or "1"}, {"Key": "Name", "Value": f"relufit-{stamp}"}]
    image_id = ec2.create_image(
        InstanceId=c.master.instance_id, Name=f"relufit-node-{stamp}",
        Description=f"relufit worker image {version} from {plan.image_id}",
        TagSpecifications=[{"ResourceType": "image", "Tags": tags}])["ImageId"]
    progress(f"Creating image {image_id}")

    def available() -> tuple[bool, str]:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
        state = images[0]["State"] if images else "pending"
        if state == "failed":
            raise CloudError(f"image {image_id} failed: "
                             f"{images[0].get('StateReason', {}).get('Message', '?')}")
        return state == "available", state
    _wait(f"image {image_id}", available, WAIT_STATUS_S, progress)
    [image] = ec2.describe_images(ImageIds=[image_id])["Images"]
    snapshots = [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", [])
                 if m.get("Ebs", {}).get("SnapshotId")]
    ec2.create_tags(Resources=[image_id, *snapshots], Tags=tags)  # the snapshots too
    progress(f"Image {image_id} is ready: `relufit cluster up` now boots from it")
    return image_id
