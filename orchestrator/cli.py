"""The ``relufit`` command line. Click commands only: parse, call one function, print.

This is the only module that imports click. Each command delegates to one function
elsewhere; ``main`` is the one place that turns relufit's exceptions into exit codes.
Sections below are owned by areas of the code base; add commands inside your section.
"""

from __future__ import annotations

import click

from orchestrator import __version__
from orchestrator.errors import RelufitError


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


# ---------------------------------------------------------------- run (core)


@cli.command()
@click.argument("experiment_file", type=click.Path(dir_okay=False))
@click.option("--backend", "-b", default=None, help="sim or local (default: local).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any key of the experiment file; repeatable.")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Where run directories are written.")
@click.option("--bind", default="tcp://0.0.0.0:5555", hidden=True,
              help="listen backend: the master's address; agents connect to it.")
@click.option("--curve-dir", default=None, hidden=True, type=click.Path(file_okay=False),
              help="listen backend: CurveZMQ keys (server.key_secret, clients' *.key).")
def run(experiment_file: str, backend: str | None, overrides: tuple[str, ...], out: str,
        bind: str, curve_dir: str | None) -> None:
    """Run EXPERIMENT_FILE (TOML): every trial of its sweep, written to OUT/<run-id>/."""
    from orchestrator.config import load_experiment
    from orchestrator.providers import DEFAULT_BACKEND, open_pool
    from orchestrator.runner import run_experiment

    exp = load_experiment(experiment_file, list(overrides))
    backend = backend or DEFAULT_BACKEND
    options = {"bind": bind, "curve_dir": curve_dir, "progress": echo_progress}
    with open_pool(backend, exp, **(options if backend == "listen" else {})) as pool:
        path = run_experiment(exp, pool, out, backend, progress=echo_progress)
    click.echo(str(path))
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
def agent(master: str, rank: int | None, timeout: float, curve_dir: str | None) -> None:
    """Serve the master's trials as one worker until it says STOP or goes silent."""
    from worker.agent import AgentError, AgentOptions, run_agent

    try:
        code = run_agent(AgentOptions(master, rank, timeout, curve_dir))
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
# ------------------------------------------------------- deploy / fetch / logs / stop / ami


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="relufit")


if __name__ == "__main__":  # `python -m orchestrator.cli`: how the local backend starts agents
    main()
