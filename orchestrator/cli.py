"""The ``relufit`` command line. Click commands only: parse, call one function, print.

This is the only module that imports click. Each command delegates to one function
elsewhere; ``main`` is the one place that turns relufit's exceptions into exit codes.
Sections below are owned by areas of the code base; add commands inside your section.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from orchestrator import __version__
from orchestrator.errors import ConfigError, RelufitError, interrupt_handler


class _Cli(click.Group):
    """The one place where relufit's exceptions become a one-line error and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RelufitError as e:
            err = click.ClickException(str(e))
            err.exit_code = e.exit_code
            raise err from e
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relufit")
def cli() -> None:
    """relufit: fit a ReLU with distributed, QSGD-compressed SGD.

    Locally with worker processes, over SSH on machines you have, on emulated
    hosts in network namespaces, or on EC2 clusters it provisions and tears down.
    """


def echo_progress(line: str) -> None:
    """Progress lines go to stderr so stdout stays parseable."""
    click.echo(line, err=True)


overrides_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override any key of the experiment file; repeatable.")
out_option = click.option(
    "--out", default="results", show_default=True, type=click.Path(file_okay=False),
    help="Where run directories are written.")
from_index_option = click.option(
    "--from-index", is_flag=True,
    help="Nodes install the dependencies from their package index, instead of the wheels "
         "shipped from here.")
json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON object on stdout (schema: README, 'Output for scripts'); progress "
         "and errors stay on stderr.")


def echo_json(record: object) -> None:
    import json

    click.echo(json.dumps(record, indent=1))


# ---------------------------------------------------------------- run (core)


@cli.command()
@click.argument("experiment_file", type=click.Path(dir_okay=False), required=False)
@click.option("--backend", "-b", default=None, help="sim or local (default: local).")
@overrides_option
@out_option
@click.option("--resume", default=None, metavar="RUN_DIR", type=click.Path(file_okay=False),
              help="Go on with this interrupted or failed run: its completed trials are kept, "
                   "the others go on from their last checkpoint. EXPERIMENT_FILE, when given, "
                   "must be the run's experiment.")
@click.option("--bind", default="tcp://0.0.0.0:5555", hidden=True,
              help="listen backend: the master's address; agents connect to it.")
@click.option("--curve-dir", default=None, hidden=True, type=click.Path(file_okay=False),
              help="listen backend: CurveZMQ keys (server.key_secret, clients' *.key).")
@click.option("--cluster", "cluster_name", default=None, metavar="NAME",
              help="Run on cluster NAME (`relufit cluster up`; then `relufit deploy NAME`).")
@json_option
def run(experiment_file: str | None, backend: str | None, overrides: tuple[str, ...], out: str,
        resume: str | None, bind: str, curve_dir: str | None, cluster_name: str | None,
        as_json: bool) -> None:
    """Run EXPERIMENT_FILE (TOML): every trial of its sweep, written to OUT/<run-id>/.
    With --resume RUN_DIR, go on with that run instead (EXPERIMENT_FILE may be left out)."""
    from orchestrator.providers import DEFAULT_BACKEND, open_pool
    from orchestrator.runner import plan_resume, run_experiment

    exp = _run_experiment_file(experiment_file, overrides, resume)
    if resume:
        plan_resume(resume, exp)  # refuse now, before a process is started
    if cluster_name:  # the deploy area: master on node 0, agents on the others
        if backend:
            raise ConfigError("--backend", "not with --cluster: the cluster is the backend")
        from orchestrator.remote import run_on_cluster

        path = run_on_cluster(exp, _find_cluster(cluster_name), out, echo_progress,
                              resume=resume)
    else:
        backend = backend or DEFAULT_BACKEND
        options = {"bind": bind, "curve_dir": curve_dir, "progress": echo_progress}
        with open_pool(backend, exp, **(options if backend == "listen" else {})) as pool:
            path = run_experiment(exp, pool, out, backend, progress=echo_progress,
                                  resume=resume)
    if as_json:
        from orchestrator.results import run_record

        echo_json(run_record(path))
    else:
        click.echo(str(path))
def _run_experiment_file(experiment_file: str | None, overrides: tuple[str, ...],
                         resume: str | None):
    """The experiment `run` runs: the file given, or with --resume alone the run's own."""
    from orchestrator.config import load_experiment

    if experiment_file is None:
        if resume is None:
            raise ConfigError("EXPERIMENT_FILE", "missing: `relufit run EXPERIMENT_FILE`, or "
                              "`relufit run --resume RUN_DIR` to go on with a run")
        if overrides:
            raise ConfigError("--set", "not with --resume alone: the run's experiment is kept")
        run_toml = Path(resume) / "experiment.toml"
        if not run_toml.is_file():
            raise ConfigError(str(resume), "not a relufit run directory (no experiment.toml)")
        return load_experiment(run_toml)  # it names its experiment
    return load_experiment(experiment_file, list(overrides))


# ---------------------------------------------------------------- agent (engine)


@cli.command()
@click.option("--master", required=True, metavar="tcp://HOST:PORT",
              help="The master's address, e.g. tcp://10.0.0.5:5555.")
@click.option("--rank", type=int, default=None, help="This worker's rank (default: the master "
              "assigns the lowest free one).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the master before it has answered.")
@click.option("--curve-dir", default=None, type=click.Path(file_okay=False),
              help="CurveZMQ: a directory with server.key and client.key_secret.")
@click.option("--peer-bind", default=None, metavar="tcp://HOST[:PORT|:LO-HI|:*]",
              help="allreduce: where to listen for the other agents (default: loopback for a "
              "master on loopback, else tcp://0.0.0.0:5556-5655).")
@click.option("--peer-host", default=None, metavar="HOST",
              help="allreduce: the address other agents reach this one at (default: the "
              "address the master sees it connect from).")
def agent(master: str, rank: int | None, timeout: float, curve_dir: str | None,
          peer_bind: str | None, peer_host: str | None) -> None:
    """Serve the master's trials as one worker until it says STOP or goes silent."""
    from worker.agent import AgentError, AgentOptions, run_agent

    try:
        code = run_agent(AgentOptions(master, rank, timeout, curve_dir, peer_bind=peer_bind,
                                      peer_host=peer_host))
    except AgentError as e:
        raise click.ClickException(str(e)) from None
    raise SystemExit(code)
# ---------------------------------------------------------------- report


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where figures and summary.md go (default: RUN_DIR/report for one run, "
                   "report-<time>/ beside the first run for several).")
@click.option("--target", default=1e-6, show_default=True, type=float,
              help="The rel_error that 'rounds/bytes/time to' are measured at.")
def report(run_dirs: tuple[str, ...], out: str | None, target: float) -> None:
    """Figures (PNG, SVG) and a markdown summary from one or more run directories."""
    from orchestrator.report import make_report

    path = make_report(list(run_dirs), out, target)
    click.echo(str(path / "summary.md"))
# ---------------------------------------------------------------- cluster (ec2, hosts, netns)


def _confirm(yes: bool):
    """The confirmation callback the providers ask before spending money or deleting; the
    question goes to stderr, so stdout stays parseable."""
    return (lambda _question: True) if yes else (
        lambda q: click.confirm(q, default=False, err=True))


region_option = click.option(
    "--region", default=None,
    help="AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, then the AWS_PROFILE's).")
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")

# What cluster to make: `cluster up` and `launch` take the same flags, declared once here.
# Every default is None (the providers apply theirs), so a flag the user gave can be told
# from one they did not. A new `up` flag goes into this list and reaches both commands.
CLUSTER_OPTIONS = (
    click.option("--provider", type=click.Choice(["ec2", "hosts", "netns"]), default=None,
                 help="Where the nodes come from [default: ec2]."),
    click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None,
                 help="Cluster spec (TOML; keys as these flags, with _ for -); flags override "
                      "it."),
    click.option("--name", default=None, help="Cluster name (a-z, 0-9, -)."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="Worker nodes, besides the master [default: 2; launch: the "
                      "experiment's workers]."),
    region_option,
    click.option("--instance-type", default=None, help="Workers' type [default: c5.large]."),
    click.option("--master-instance-type", default=None,
                 help="Master's type [default: as workers]."),
    click.option("--ami", default=None,
                 help="Image id [default: newest relufit:ami image, else newest Ubuntu LTS]."),
    click.option("--spot/--on-demand", default=None,
                 help="Spot instances [default: on-demand]."),
    click.option("--subnet", default=None, help="Subnet id [default: the default VPC's]."),
    click.option("--availability-zone", default=None,
                 help="Preferred zone (others on no capacity)."),
    click.option("--ssh-cidr", default=None,
                 help="Who may SSH in [default: this machine's public IP /32]."),
    click.option("--max-hours", type=float, default=None,
                 help="Kill switch: instances terminate after this [default: 4]."),
    click.option("--bandwidth", default=None, metavar="RATE",
                 help="netns: workers' links, e.g. 100mbit, 1gbit or a preset such as "
                      "c5.large [default: unshaped]."),
    click.option("--master-bandwidth", default=None, metavar="RATE",
                 help="netns: the master's link [default: as --bandwidth]."),
    click.option("--hosts-file", default=None, type=click.Path(dir_okay=False),
                 help="hosts: TOML file listing the machines (the first runs the master)."),
    click.option("--idle-minutes", type=float, default=None, metavar="N",
                 help="Autostop: a node with no relufit run for N minutes tears itself down "
                      "(EC2: it terminates; netns, hosts: relufit's processes stop) "
                      "[default: 30; 0: never]."),
)


def cluster_options(fn):
    """Decorate a command with ``CLUSTER_OPTIONS``; they arrive as keyword arguments named
    as ``providers.clusters.request`` takes them."""
    for option in reversed(CLUSTER_OPTIONS):
        fn = option(fn)
    return fn


@cli.group()
def cluster() -> None:
    """Clusters to run on: EC2 instances, machines you have, or emulated hosts."""


@cluster.command("up")
@cluster_options
@click.option("--dry-run", is_flag=True, help="Check everything with EC2; create nothing.")
@yes_option
def cluster_up(dry_run: bool, yes: bool, **cluster_flags) -> None:
    """Create a cluster: one master and --workers workers."""
    from orchestrator.providers import clusters

    req = clusters.request(dry_run=dry_run, **cluster_flags)
    c = clusters.up(req, confirm=_confirm(yes), progress=echo_progress)
    if c is not None:
        click.echo(c.name)


@cluster.command("down")
@click.argument("name")
@region_option
def cluster_down(name: str, region: str | None) -> None:
    """Remove cluster NAME and everything it made; safe to run twice."""
    from orchestrator.providers import clusters

    clusters.down(name, region, echo_progress)


@cluster.command("status")
@click.argument("name")
@region_option
@json_option
def cluster_status(name: str, region: str | None, as_json: bool) -> None:
    """Nodes of cluster NAME: ranks, roles, addresses and states."""
    from orchestrator.providers import clusters

    rec = clusters.status(name, region)
    if as_json:
        echo_json(rec)
    elif rec["provider"] != "ec2":
        for n in rec["nodes"]:
            click.echo(f"{n['rank']:>4}  {n['role']:<6}  {n['user']}@{n['address']}:{n['port']}  "
                       f"{n['private_address']}")
    else:
        click.echo(f"{'rank':>4}  {'role':<6}  {'instance':<19}  {'type':<10}  {'state':<13}  "
                   f"{'public ip':<15}  {'private ip':<15}  zone")
        for n in rec["nodes"]:
            click.echo(f"{n['rank']:>4}  {n['role']:<6}  {n['instance_id']:<19}  "
                       f"{n['type']:<10}  {n['state']:<13}  {n['address'] or '-':<15}  "
                       f"{n['private_address'] or '-':<15}  {n['zone'] or '-'}")
    if not as_json:
        from orchestrator import autostop

        for line in autostop.echo_lines(rec["nodes"]):
            click.echo(line)


@cluster.command("list")
@region_option
@click.option("--all-regions", is_flag=True, help="Look in every enabled region.")
@json_option
def cluster_list(region: str | None, all_regions: bool, as_json: bool) -> None:
    """Every relufit cluster: the emulated (netns) and hosts clusters recorded here, then
    EC2 clusters with running instances (age, size, estimated cost so far)."""
    from orchestrator import pricing
    from orchestrator.providers import clusters

    found = clusters.listing(region, all_regions, echo_progress)
    if as_json:
        echo_json({"clusters": found})
        return
    mine = [c for c in found if c["provider"] != "ec2"]
    for c in mine:
        link = f"  link {c['link']}" if c["link"] else ""
        click.echo(f"{c['name']:<20}  {c['provider']:<14}  {c['nodes']:>9} nodes  "
                   f"master {c['master']}{link}")
    on_ec2 = [c for c in found if c["provider"] == "ec2"]
    if not on_ec2:
        echo_progress("No EC2 relufit clusters found." if mine else "No relufit clusters found.")
        return
    click.echo(f"{'name':<20}  {'region':<14}  {'instances':>9}  {'age':>7}  {'cost so far':>11}  "
               "types")
    for c in on_ec2:
        cost = "?" if c["cost_so_far_usd"] is None else f"${c['cost_so_far_usd']:.2f}"
        click.echo(f"{c['name']:<20}  {c['region']:<14}  {c['nodes']:>9}  "
                   f"{c['age_hours']:>6.1f}h  {cost:>11}  {','.join(c['instance_types'])}")
    echo_progress(f"(cost: on-demand list prices of {pricing.PRICES_REGION} as of "
                  f"{pricing.PRICES_AS_OF}, instances only)")


@cluster.command("ssh")
@click.argument("name")
@click.option("--rank", type=int, default=0, show_default=True, help="Node to log in to.")
@region_option
@click.argument("command", nargs=-1)
def cluster_ssh(name: str, rank: int, region: str | None, command: tuple[str, ...]) -> None:
    """Log in to node RANK of cluster NAME (or run COMMAND there) with OpenSSH."""
    import os

    from orchestrator.cluster import check_name, read_cluster, ssh_argv

    c = read_cluster(check_name(name, "NAME"))
    if c is None or c.provider == "ec2":  # EC2: the tags know the current addresses
        from orchestrator.providers import ec2

        c = ec2.find_cluster(name, region or (c.region if c else None))
        if c is None:
            raise RelufitError(f"no running cluster {name!r}: `relufit cluster list` shows them")
    argv = ssh_argv(c, rank, *command)
    os.execvp(argv[0], argv)


@cluster.command("gc")
@region_option
@yes_option
def cluster_gc(region: str | None, yes: bool) -> None:
    """Delete relufit-tagged groups, key pairs and volumes of clusters that are gone."""
    from orchestrator.providers import ec2

    ec2.gc(region, confirm=_confirm(yes), progress=echo_progress)
# ------------------------------------------------------- deploy / fetch / logs / stop / ami


def _find_cluster(name: str):
    """The cluster NAME, with current addresses (EC2: from its tags)."""
    from orchestrator.providers.clusters import find

    return find(name)


@cli.command()
@click.argument("cluster_name", metavar="CLUSTER")
@from_index_option
def deploy(cluster_name: str, from_index: bool) -> None:
    """Install this exact relufit (and its dependencies) on every node of CLUSTER."""
    from orchestrator import deploy as dep

    c = _find_cluster(cluster_name)
    reports = dep.deploy(dep.targets(c), from_index, progress=echo_progress)
    for r in reports:
        click.echo(f"{r.node}  {r.version}  {r.uploaded_bytes / 1e6:.1f} MB  {r.seconds:.1f} s")


@cli.command()
@click.argument("cluster_name", metavar="CLUSTER")
@click.argument("run_id")
@out_option
def fetch(cluster_name: str, run_id: str, out: str) -> None:
    """Copy run RUN_ID from CLUSTER to OUT/RUN_ID/ (node logs under nodes/)."""
    from orchestrator import remote

    click.echo(str(remote.fetch(_find_cluster(cluster_name), run_id, out, echo_progress)))


@cli.command()
@click.argument("cluster_name", metavar="CLUSTER")
@click.argument("run_id", required=False)
@click.option("--rank", type=int, default=None, help="An agent's log instead of the master's.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until that process ends.")
def logs(cluster_name: str, run_id: str | None, rank: int | None, follow: bool) -> None:
    """Print the master's log of RUN_ID (default: the latest run) on CLUSTER."""
    from orchestrator import remote

    remote.logs(_find_cluster(cluster_name), run_id, rank, click.echo, follow)


@cli.command()
@click.argument("cluster_name", metavar="CLUSTER")
@click.argument("run_id", required=False)
def stop(cluster_name: str, run_id: str | None) -> None:
    """Stop run RUN_ID (default: every run) on CLUSTER: master first, then the agents."""
    from orchestrator import remote

    for rid in remote.stop(_find_cluster(cluster_name), run_id, echo_progress):
        click.echo(rid)


@cli.group()
def ami() -> None:
    """Worker images (AMIs) with relufit installed, so clusters boot ready."""


@ami.command("build")
@region_option
@click.option("--instance-type", default="c5.large", show_default=True,
              help="The builder's type (its architecture is the image's).")
@click.option("--base-ami", default=None, help="Image to start from [default: newest Ubuntu LTS].")
@click.option("--ssh-cidr", default=None,
              help="Who may SSH to the builder [default: this machine's public IP /32].")
@yes_option
def ami_build(region: str | None, instance_type: str, base_ami: str | None,
              ssh_cidr: str | None, yes: bool) -> None:
    """Launch a builder, install relufit over SSH, image it (tag relufit:ami), remove it."""
    from orchestrator import __version__, deploy
    from orchestrator.cluster import check_ssh_cidr
    from orchestrator.providers import ec2

    image = ec2.build_ami(region, deploy.prepare_image, confirm=_confirm(yes),
                          progress=echo_progress, instance_type=instance_type,
                          base_ami=base_ami, version=__version__,
                          ssh_cidr=check_ssh_cidr(ssh_cidr) if ssh_cidr else None)
    click.echo(image)


# ---------------------------------------------------------------- launch


@cli.command()
@click.argument("experiment_file", type=click.Path(dir_okay=False))
@overrides_option
@out_option
@click.option("--cluster", "reuse", default=None, metavar="NAME",
              help="Reuse cluster NAME, which is up (it is never taken down by launch).")
@cluster_options
@click.option("--keep", is_flag=True, help="Keep the cluster launch made (default: down).")
@click.option("--resume", default=None, metavar="RUN_DIR", type=click.Path(file_okay=False),
              help="Go on with this run of EXPERIMENT_FILE (as `relufit run --resume`).")
@from_index_option
@yes_option
@json_option
def launch(experiment_file: str, overrides: tuple[str, ...], out: str, reuse: str | None,
           keep: bool, resume: str | None, from_index: bool, yes: bool, as_json: bool,
           **cluster_flags) -> None:
    """Up, deploy, run, fetch, report, down: EXPERIMENT_FILE on a new cluster (the flags of
    `cluster up`; name and workers default to launch-<hex> and the experiment's workers) or
    on --cluster NAME. Prints the run directory and the report."""
    from orchestrator.launch import launch as launch_all

    res = launch_all(experiment_file, list(overrides), reuse=reuse, up_args=cluster_flags,
                     out=out, keep=keep, from_index=from_index, confirm=_confirm(yes),
                     resume=resume)
    if as_json:
        echo_json(res.to_json())
    else:
        click.echo(str(res.run_dir))
        click.echo(str(res.report))


def main() -> None:
    """Console-script entry point. SIGTERM (``kill PID``, a CI runner's timeout) ends any
    command as Ctrl-C does, so its cleanup runs: remote processes stopped, a half-made
    cluster removed. This also holds where SIGINT is ignored (a job started with ``&``)."""
    signal.signal(signal.SIGTERM, interrupt_handler)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (`&`)
        signal.signal(signal.SIGINT, interrupt_handler)
    cli(prog_name="relufit")


if __name__ == "__main__":  # `python -m orchestrator.cli`: how the local backend starts agents
    main()
