"""`relufit launch` (up, deploy, run, fetch, report, down) and the `--json` outputs.

End to end on emulated hosts (netns: a real up, deploy, run and down), and on moto for EC2,
where no instance answers SSH: there the deploy stage is interrupted or fails (a Ctrl-C
injected into it; nodes that refuse SSH), or deploy and run are replaced by a sim run, to
check what launch leaves behind and what it says about cost.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import test_ec2
from click.testing import CliRunner
from conftest import free_port, require_emulated_hosts
from test_ec2 import CIDR, nothing_left
from test_hosts import hosts_file
from test_remote import write_exp

from orchestrator import cluster as model
from orchestrator import deploy, launch, remote
from orchestrator.cli import cli
from orchestrator.cluster import Node
from orchestrator.config import load_experiment
from orchestrator.providers import ec2, netns
from orchestrator.results import load_run
from orchestrator.runner import parse_progress, run_experiment
from orchestrator.trial import SimPool

aws, pauses = test_ec2.aws, test_ec2.pauses  # the moto fixtures, shared

def tiny(tmp_path: Path, rounds: int = 30, sweep: str = "") -> Path:
    """A run of seconds: d = 40, 3 workers, ``rounds`` rounds, never stopping early."""
    return write_exp(tmp_path / "tiny.toml", rounds=rounds, sweep=sweep)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, stderr
    return errors[0]


def sim_rel_error(exp_file: Path, tmp_path: Path) -> np.ndarray:
    path = run_experiment(load_experiment(exp_file), SimPool(), tmp_path / "sim", "sim",
                          progress=lambda line: None)
    return load_run(path)["metrics"]["rel_error"]


@pytest.fixture
def shared_cache(monkeypatch):
    """Wheels and wheelhouses shared across tests (as in test_remote.py): built once."""
    monkeypatch.setenv("RELUFIT_CACHE", os.environ.get(
        "RELUFIT_CACHE", str(Path.home() / ".cache" / "relufit-tests")))


def no_namespaces_of(name: str) -> bool:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return netns.leftovers(name) == [] and f"rf-{name}-" not in listed


# ---------------------------------------------------------------- the progress display


def test_progress_lines_of_a_real_run_are_parsed(tmp_path):
    """The display reads the runner's own lines (on a cluster: the master's log)."""
    lines: list[str] = []
    exp = load_experiment(tiny(tmp_path, 40, '[sweep]\n"compress.levels" = [2, 8]'))
    run_experiment(exp, SimPool(), tmp_path / "out", "sim", progress=lines.append)
    parsed = [p for p in map(parse_progress, lines) if p]
    assert parsed[0] == {"trial": 1, "trials": 2, "round": 0, "rounds": None,
                         "rel_error": None}
    assert parsed[1]["round"] == 1 and parsed[1]["rounds"] == 40
    ends = [p for p in parsed if "rounds" not in p]
    assert [(p["trial"], p["round"]) for p in ends] == [(1, 40), (2, 40)]
    assert parse_progress("run x: 2 trial(s), backend sim -> out") is None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_display_plain_lines_carry_stage_trial_round_rel_error_elapsed_and_cost():
    out, clock = io.StringIO(), Clock()
    d = launch.Display(out, tty=False, clock=clock)
    d.stage("up")
    d.bill(3.6)  # $/hour: a cent a second
    clock.t += 125
    d("Launching 3 instances")
    d.stage("run")
    d("trial 2/3: d=20 n=400 M=2 ps qsgd s=4 elias")
    d("  trial 2/3 round 7/30  rel_error 1.250e-01  sent 0.01 MB  workers 2")
    lines = out.getvalue().splitlines()
    assert lines[1] == "[up  2:05  $0.125 so far] Launching 3 instances"
    assert lines[-1] == "[run  2:05  trial 2/3  round 7/30  rel_error 1.250e-01  $0.125 so far]"
    d.close()
    assert d.stages == {"check": 0.0, "up": 125.0, "run": 0.0}


def test_display_on_a_terminal_rewrites_one_line_in_place():
    out = io.StringIO()
    d = launch.Display(out, tty=True, clock=Clock())
    d.stage("run")
    d("  trial 1/1 round 3/30  rel_error 5.000e-01  sent 0.01 MB  workers 2")
    d("  trial 1/1 round 4/30  rel_error 4.000e-01  sent 0.01 MB  workers 2")
    d("master started")
    d.close()
    text = out.getvalue()
    assert "\r\x1b[K[run  0:00  trial 1/1  round 4/30  rel_error 4.000e-01]" in text
    assert "\r\x1b[Kmaster started\n" in text  # a message goes above the status line
    assert text.count("\n") == 3 and text.endswith("\n")  # -- run, master started, close


# ---------------------------------------------------------------- --json, and its errors


def test_run_json_is_the_summary_with_the_run_dir(tmp_path):
    r = invoke("run", str(tiny(tmp_path)), "--backend", "sim", "--out", str(tmp_path / "o"),
               "--json")
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert Path(rec["run_dir"]).parent == tmp_path / "o" and rec["status"] == "completed"
    assert rec["backend"] == "sim" and rec["trials_planned"] == 1
    [trial] = rec["trials"]
    assert trial["rounds"] == 30 and trial["status"] == "completed"
    assert trial["final_rel_error"] == load_run(rec["run_dir"])["metrics"]["rel_error"][-1]
    assert "trial 1/1" in r.stderr  # progress stays on stderr


def test_run_json_error_is_one_line_on_stderr_and_nothing_on_stdout(tmp_path):
    r = invoke("run", str(tiny(tmp_path)), "--backend", "sim", "--set", "train.lrr=1",
               "--json")
    assert r.exit_code == 2 and r.stdout == ""
    assert "train.lrr" in one_error_line(r.stderr)


@pytest.mark.sshd
@pytest.mark.netns
def test_cluster_list_and_status_json_of_an_emulated_cluster(netns_cluster):
    c = netns_cluster(workers=1, bandwidth="100mbit")
    env = {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", "AWS_PROFILE": "relufit-no-such"}
    r = CliRunner().invoke(cli, ["cluster", "list", "--json"], env=env)
    assert r.exit_code == 0, r.stderr
    [rec] = [x for x in json.loads(r.stdout)["clusters"] if x["name"] == c.name]
    assert rec == {"name": c.name, "provider": "netns", "region": None, "nodes": 2,
                   "master": c.hosts[0].address, "link": "100mbit", "age_hours": None,
                   "cost_so_far_usd": None, "instance_types": []}
    assert "EC2 not searched" in r.stderr
    r = CliRunner().invoke(cli, ["cluster", "status", c.name, "--json"], env=env)
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert (rec["name"], rec["provider"], rec["region"]) == (c.name, "netns", None)
    assert [(n["rank"], n["role"], n["address"], n["user"], n["port"], n["state"])
            for n in rec["nodes"]] == [(h.rank, "master" if h.rank == 0 else "worker",
                                        h.address, "root", 22, None) for h in c.hosts]
    assert sorted(rec["nodes"][0]) == sorted(
        ["rank", "role", "address", "private_address", "user", "port", "instance_id", "type",
         "state", "zone", "autostop"])
    # read from each node: this fixture's cluster was made without the CLI, so no watchdog
    assert [n["autostop"]["state"] for n in rec["nodes"]] == ["off", "off"]


def test_cluster_list_and_status_json_on_ec2(aws):
    r = invoke("cluster", "up", "--name", "js", "--workers", "1", "--ssh-cidr", CIDR, "--yes",
               "--instance-type", "c5.large")
    assert r.exit_code == 0, r.output
    r = invoke("cluster", "list", "--json")
    assert r.exit_code == 0, r.stderr
    [rec] = json.loads(r.stdout)["clusters"]
    assert (rec["name"], rec["provider"], rec["region"], rec["nodes"]) == (
        "js", "ec2", "us-east-1", 2)
    assert rec["instance_types"] == ["c5.large"] and rec["cost_so_far_usd"] >= 0
    r = invoke("cluster", "status", "js", "--json")
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert [(n["rank"], n["role"], n["state"], n["type"]) for n in rec["nodes"]] == [
        (0, "master", "running", "c5.large"), (1, "worker", "running", "c5.large")]
    assert all(n["instance_id"].startswith("i-") and n["user"] == "ubuntu"
               for n in rec["nodes"])
    assert all(n["autostop"]["state"] == "unknown" and "idle limit 30 min" in
               n["autostop"]["text"] for n in rec["nodes"])  # moto: from the tags
    missing = invoke("cluster", "status", "nope", "--json")
    assert missing.exit_code == 1 and missing.stdout == ""
    assert "no cluster 'nope'" in one_error_line(missing.stderr)


# ---------------------------------------------------------------- bad input: nothing made


@pytest.mark.parametrize("args, needle, code", [
    (["--set", "train.lrr=0.1", "--provider", "netns"], "train.lrr", 2),
    (["--provider", "netns", "--bandwidth", "fast"], "--bandwidth: 'fast'", 2),
    (["--provider", "netns", "--instance-type", "c5.large"], "--instance-type: only with", 2),
    (["--cluster", "lab", "--workers", "2"], "--workers: not with --cluster", 2),
    (["--cluster", "nope"], "no cluster 'nope'", 1),
    (["--provider", "netns", "--idle-minutes", "-1"], "--idle-minutes: -1", 2),
    (["--cluster", "lab", "--idle-minutes", "5"], "--idle-minutes: not with --cluster", 2),
])
def test_launch_bad_input_fails_before_anything_is_made(tmp_path, relufit_home, args, needle,
                                                        code, monkeypatch):
    made = []
    monkeypatch.setattr(netns, "up", lambda *a, **k: made.append(a))
    r = invoke("launch", str(tiny(tmp_path)), "--out", str(tmp_path / "out"), "--json", *args)
    assert r.exit_code == code and r.stdout == "", r.output
    assert needle in one_error_line(r.stderr)
    assert made == [] and not (relufit_home / "clusters").exists()
    assert not (tmp_path / "out").exists()


def test_launch_with_too_short_an_idle_limit_on_ec2_creates_nothing(aws, tmp_path):
    r = invoke("launch", str(tiny(tmp_path)), "--idle-minutes", "2", "--ssh-cidr", CIDR,
               "--yes")
    assert r.exit_code == 2 and "at least 5 on EC2" in one_error_line(r.stderr)
    assert nothing_left(aws)


def test_launch_bad_experiment_key_on_ec2_creates_nothing(aws, tmp_path):
    r = invoke("launch", str(tiny(tmp_path)), "--set", "compress.scheme=zip", "--ssh-cidr",
               CIDR, "--yes")
    assert r.exit_code == 2 and "compress.scheme" in one_error_line(r.stderr)
    assert nothing_left(aws)


# ---------------------------------------------------------------- EC2 on moto


def ec2_launch(tmp_path: Path, *more: str):
    return invoke("launch", str(tiny(tmp_path)), "--name", "ln", "--workers", "1",
                  "--instance-type", "c5.large", "--ssh-cidr", CIDR, "--yes",
                  "--out", str(tmp_path / "results"), *more)


def test_ctrl_c_during_deploy_removes_the_ec2_cluster(aws, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        assert len(ec2.tagged_resources(aws, "ln")["instances"]) == 2  # it was up
        raise KeyboardInterrupt
    monkeypatch.setattr(deploy, "deploy", interrupted)
    r = ec2_launch(tmp_path)
    assert r.exit_code == 130, r.output
    assert nothing_left(aws, "ln")
    assert "-- down" in r.stderr and "Cost spent: ~$" in r.stderr
    assert r.stdout == ""


def test_unreachable_nodes_at_deploy_remove_the_ec2_cluster(aws, tmp_path, monkeypatch,
                                                            shared_cache):
    """moto's instances answer no SSH: point the nodes at a closed local port, so deploy's
    real connect is refused until its (shortened) deadline."""
    real, port = ec2.to_cluster, free_port()

    def closed(*a):
        c = real(*a)
        nodes = [Node(**{**n.__dict__, "address": "127.0.0.1", "port": port}) for n in c.nodes]
        return type(c)(**{**c.__dict__, "nodes": nodes})
    monkeypatch.setattr(ec2, "to_cluster", closed)
    monkeypatch.setattr(deploy, "CONNECT_TIMEOUT_S", 1.0)
    r = ec2_launch(tmp_path, "--json")
    assert r.exit_code == 1 and r.stdout == "", r.output
    assert "unreachable after 1 s" in one_error_line(r.stderr)
    assert nothing_left(aws, "ln")


@pytest.fixture
def sim_for_ssh(monkeypatch) -> list[str]:
    """Deploy and the remote run replaced by a sim run here (moto boots nothing that SSH
    reaches): the names of the clusters run on."""
    used: list[str] = []

    def sim_run(exp, cluster, out, progress, run_id, resume=None):
        used.append(cluster.name)
        return run_experiment(exp, SimPool(), out, "sim", progress=progress, run_id=run_id,
                              resume=resume)
    monkeypatch.setattr(deploy, "deploy", lambda *a, **k: [])
    monkeypatch.setattr(remote, "run_on_cluster", sim_run)
    return used


def test_launch_on_ec2_states_the_cost_and_leaves_nothing(aws, tmp_path, sim_for_ssh):
    """The composition, costs and JSON (deploy and run replaced)."""
    r = ec2_launch(tmp_path, "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["cluster"] == {"name": "ln", "provider": "ec2", "made": True, "kept": False}
    per_hour = 2 * (0.085 + 16 * 0.08 / 730)  # two c5.large with their 16 GB gp3 roots
    assert rec["cost"]["usd_per_hour"] == pytest.approx(per_hour, rel=1e-6)
    assert rec["cost"]["spent_usd"] >= per_hour / 60  # at least a minute is billed
    assert Path(rec["report"]).exists() and rec["run"]["status"] == "completed"
    assert list(rec["stages"]) == ["check", "up", "deploy", "run", "report", "down"]
    before = r.stderr.index("-- up")
    assert f"Cost: ${per_hour:.3f}/hour for 2 nodes" in r.stderr[:before]
    assert "Run length, roughly" in r.stderr[:before] and "not the cluster's time" in r.stderr
    assert "Cost spent: ~$" in r.stderr and nothing_left(aws, "ln") and sim_for_ssh == ["ln"]


def test_launch_keep_keeps_the_ec2_cluster(aws, tmp_path, sim_for_ssh):
    r = ec2_launch(tmp_path, "--keep", "--idle-minutes", "45")
    assert r.exit_code == 0, r.output
    # a kept cluster still stops itself: its nodes' watchdogs have launch's --idle-minutes
    assert all(ec2.tags_of(i)[ec2.TAG_IDLE] == "45" and "--idle-seconds 2700 --action "
               "poweroff" in test_ec2.user_data_of(aws, i) for i in ec2.instances(aws, "ln"))
    run_dir, report = r.stdout.splitlines()
    assert Path(report) == Path(run_dir) / "report" / "summary.md" and Path(report).exists()
    assert "Cluster ln kept" in r.stderr and "goes on costing" in r.stderr
    assert len(ec2.tagged_resources(aws, "ln")["instances"]) == 2
    assert invoke("cluster", "down", "ln").exit_code == 0


def test_launch_on_a_reused_ec2_cluster_leaves_it_up(aws, tmp_path, sim_for_ssh):
    r = invoke("cluster", "up", "--name", "ru", "--workers", "1", "--ssh-cidr", CIDR, "--yes",
               "--instance-type", "c5.large")
    assert r.exit_code == 0, r.output
    r = invoke("launch", str(tiny(tmp_path)), "--cluster", "ru", "--json",
               "--out", str(tmp_path / "results"))
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["cluster"] == {"name": "ru", "provider": "ec2", "made": False, "kept": False}
    assert rec["cost"]["usd_per_hour"] == pytest.approx(2 * 0.085)  # instances only
    assert list(rec["stages"]) == ["check", "deploy", "run", "report"]
    assert "Cost of this launch: ~$" in r.stderr and sim_for_ssh == ["ru"]
    assert len(ec2.tagged_resources(aws, "ru")["instances"]) == 2


def test_launch_resume_goes_on_with_the_run_and_refuses_another_experiment_first(
        aws, tmp_path, sim_for_ssh):
    """--resume reaches the run (deploy and the remote run replaced by sim); a resume that
    does not fit is refused before anything is made."""
    exp_file = tiny(tmp_path, 30, '[sweep]\n"cluster.topology" = ["ps", "allgather"]')
    out = tmp_path / "results"

    class Stop(SimPool):
        def exchange(self, round_, down, relay):
            if (self.nodes[0].spec.trial, round_) == (1, 7):
                raise KeyboardInterrupt
            return super().exchange(round_, down, relay)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(exp_file), Stop(), out, "sim", progress=lambda s: None)
    [cut] = out.iterdir()
    r = invoke("launch", str(exp_file), "--resume", str(cut), "--set", "train.lr=0.3",
               "--name", "ln", "--workers", "1", "--ssh-cidr", CIDR, "--yes")
    assert r.exit_code == 1 and "train.lr: 0.5 != 0.3" in one_error_line(r.stderr)
    assert sim_for_ssh == [] and nothing_left(aws, "ln")
    r = invoke("launch", str(exp_file), "--resume", str(cut), "--name", "ln", "--workers", "1",
               "--instance-type", "c5.large", "--ssh-cidr", CIDR, "--yes", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["run"]["run_dir"] == str(cut) and rec["run"]["resumed"] == 1
    np.testing.assert_array_equal(load_run(cut)["metrics"]["rel_error"],
                                  sim_rel_error(exp_file, tmp_path))
    assert nothing_left(aws, "ln")


# ---------------------------------------------------------------- netns, end to end


@pytest.mark.sshd
@pytest.mark.netns
def test_launch_on_emulated_hosts_end_to_end(relufit_home, tmp_path, shared_cache):
    require_emulated_hosts()
    exp_file = tiny(tmp_path, 30, '[sweep]\n"cluster.topology" = ["ps", "allgather"]')
    r = invoke("launch", str(exp_file), "--provider", "netns", "--workers", "1", "--out",
               str(tmp_path / "results"), "--json")
    rec = json.loads(r.stdout) if r.exit_code == 0 else {}
    name = rec.get("cluster", {}).get("name") or next(
        (p.name for p in (relufit_home / "clusters").iterdir()), "")
    try:
        assert r.exit_code == 0, r.stderr[-3000:]
        assert rec["cluster"] == {"name": name, "provider": "netns", "made": True,
                                  "kept": False}
        assert name.startswith("launch-") and no_namespaces_of(name)
        run_dir = Path(rec["run"]["run_dir"])
        assert Path(rec["report"]) == run_dir / "report" / "summary.md"
        assert Path(rec["report"]).exists() and (run_dir / "report" / "report.json").exists()
        got = load_run(run_dir)["metrics"]["rel_error"]
        assert len(got) == 60
        np.testing.assert_array_equal(got, sim_rel_error(exp_file, tmp_path))
        assert rec["cost"] == {"usd_per_hour": None, "spent_usd": None, "prices": None}
        assert f"Run directory: {run_dir}" in r.stderr and "Cost: nothing billed" in r.stderr
        assert "[run " in r.stderr and "trial 2/2" in r.stderr
    finally:
        if name and not no_namespaces_of(name):
            netns.down(name)


@contextmanager
def launch_until(tmp_path: Path, name: str, ready):
    """``relufit launch`` of a long run on 1 + 1 emulated hosts, in a subprocess; yields
    (process, stderr lines so far) once ``ready(line)`` held for a line of its stderr."""
    require_emulated_hosts()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(tiny(tmp_path, 100000)),
         "--provider", "netns", "--workers", "1", "--name", name,
         "--out", str(tmp_path / "results")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if ready(line):
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(180), "".join(lines)[-3000:]
        yield proc, lines
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not no_namespaces_of(name):
            netns.down(name)


def _round_at_least(n: int):
    def ready(line: str) -> bool:  # the display's plain status line "[run  0:12  ...]"
        m = re.match(r"\[run .* round (\d+)/", line)
        return bool(m) and int(m.group(1)) >= n
    return ready


@pytest.mark.sshd
@pytest.mark.netns
def test_ctrl_c_during_the_run_keeps_the_results_and_removes_the_emulated_cluster(
        relufit_home, tmp_path, shared_cache):
    name = "launch-int"
    with launch_until(tmp_path, name, _round_at_least(20)) as (proc, lines):
        proc.send_signal(signal.SIGINT)  # one Ctrl-C
        proc.wait(timeout=120)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert no_namespaces_of(name), err[-3000:]
    kept = [ln for ln in err.splitlines() if "Kept what was fetched: " in ln]
    run_dir = Path(kept[0].split("Kept what was fetched: ")[1])
    run = load_run(run_dir)
    [trial] = run["summary"]["trials"]
    assert trial["status"] == "interrupted" and 20 <= trial["rounds"] < 100000
    assert len(run["metrics"]["rel_error"]) == trial["rounds"]
    assert "-- down" in err and proc.stdout.read() == ""


@pytest.mark.sshd
@pytest.mark.netns
def test_ctrl_c_during_deploy_removes_the_emulated_cluster(relufit_home, tmp_path,
                                                           shared_cache):
    """While the nodes install (deploy's threads busy over SSH), one Ctrl-C: down runs at
    once rather than after the installs, and nothing is left."""
    name = "launch-dep"
    with launch_until(tmp_path, name, lambda line: "; installing" in line) as (proc, lines):
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert no_namespaces_of(name), err[-3000:]
    assert "-- down" in err and "-- run" not in err and "Kept what was fetched" not in err
    assert "ok: relufit" not in err  # interrupted mid-install, not after it
    assert not (tmp_path / "results").exists()


@pytest.mark.sshd
def test_launch_on_a_hosts_file_forgets_the_cluster_and_leaves_the_machine(
        sshd_host, relufit_home, tmp_path, shared_cache):
    """One host runs the master and the agents; `down` of a hosts cluster stops relufit
    there and forgets it, the machine stays."""
    f = hosts_file(tmp_path / "hosts.toml", sshd_host, master_port=free_port())
    exp_file = tiny(tmp_path, 25)
    r = invoke("launch", str(exp_file), "--provider", "hosts", "--hosts-file", str(f),
               "--name", "lab", "--out", str(tmp_path / "results"), "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec["cluster"] == {"name": "lab", "provider": "hosts", "made": True, "kept": False}
    got = load_run(rec["run"]["run_dir"])["metrics"]["rel_error"]
    np.testing.assert_array_equal(got, sim_rel_error(exp_file, tmp_path))
    assert Path(rec["report"]).exists() and "Cost: nothing billed (your own machines)" in r.stderr
    assert model.read_cluster("lab") is None
    assert sshd_host.home(".relufit/venv/bin/relufit").exists()  # the machine is untouched
