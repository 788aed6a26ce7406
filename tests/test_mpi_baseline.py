"""The MPI baseline's pure helpers (benchmarks/mpi_baseline.py); no MPI, no namespaces needed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import RunError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mpi_baseline.py"
_spec = importlib.util.spec_from_file_location("mpi_baseline", _PATH)
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

HOSTS = {"10.213.7.3": "rf-c-1", "10.213.7.4": "rf-c-2"}


def _agent(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run the generated agent with a fake ``ip`` on PATH that prints what it was asked."""
    agent = tmp_path / "agent.sh"
    agent.write_text(mb.agent_script(HOSTS))
    agent.chmod(0o755)
    fake_ip = tmp_path / "ip"
    fake_ip.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done\n')
    fake_ip.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    return subprocess.run([str(agent), *argv], capture_output=True, text=True, env=env,
                          timeout=10)


def test_agent_runs_the_command_in_the_hosts_namespace(tmp_path):
    out = _agent(tmp_path, "10.213.7.4", "orted", "-mca", "a b", ";", "echo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[netns][exec][rf-c-2][unshare][-u][/bin/sh][-c]")
    assert out.stdout.endswith("[agent][rf-c-2][orted -mca a b ; echo]")  # joined, as ssh does


def test_agent_skips_options_before_the_host(tmp_path):
    out = _agent(tmp_path, "-x", "-T", "10.213.7.3", "orted")
    assert "[rf-c-1]" in out.stdout and out.stdout.endswith("[orted]")


def test_agent_refuses_an_unknown_host(tmp_path):
    out = _agent(tmp_path, "10.213.7.9", "orted")
    assert out.returncode == 255 and "unknown host 10.213.7.9" in out.stderr
    assert out.stdout == ""


def test_mpirun_command_puts_one_rank_on_each_worker_over_tcp():
    cmd = mb.mpirun_command("/usr/bin/mpirun", "rf-c-0", list(HOSTS), "10.213.7.0/24",
                            "/tmp/agent.sh", ["python3", "rank.py"])
    assert cmd[:5] == ["ip", "netns", "exec", "rf-c-0", "/usr/bin/mpirun"]
    assert cmd[cmd.index("-np") + 1] == "2"
    assert cmd[cmd.index("--host") + 1] == "10.213.7.3:1,10.213.7.4:1"
    mca = {cmd[i + 1]: cmd[i + 2] for i, a in enumerate(cmd) if a == "--mca"}
    assert mca["btl"] == "tcp,self" and mca["plm_rsh_agent"] == "/tmp/agent.sh"
    assert mca["btl_tcp_if_include"] == mca["oob_tcp_if_include"] == "10.213.7.0/24"
    assert cmd[-2:] == ["python3", "rank.py"]


def _rank(rank: int, compute: list[float], allreduce: list[float], end: list[float],
          tx: list[int], err: float = 5e-7) -> dict:
    return {"rank": rank, "compute_s": compute, "allreduce_s": allreduce, "end_s": end,
            "tx": tx, "rel_error": err}


def test_summary_takes_the_network_time_of_the_slowest_rank():
    ranks = [
        _rank(1, [0.5, 0.1, 0.1, 0.1], [0.5, 0.2, 0.3, 0.3], [1.0, 1.3, 1.7, 2.1], [1, 2, 3, 40]),
        _rank(0, [0.4, 0.2, 0.3, 0.3], [0.6, 0.1, 0.1, 0.1], [1.0, 1.3, 1.7, 2.1], [1, 2, 3, 60]),
    ]
    s = mb.summarize(ranks, d=10, target=1e-6)
    assert s["rounds"] == 4 and s["ranks"] == 2
    assert s["compute_ms"] == pytest.approx(300.0)  # rounds 2, 3: rank 0 is slowest
    assert s["network_ms"] == pytest.approx(100.0)  # ... and its Allreduce took 0.1 s
    assert s["round_ms"] == pytest.approx(400.0)
    assert s["t_target"] == pytest.approx(1.1)  # end of round 0 to end of the last round
    assert s["t_target_from_start"] == pytest.approx(2.1)
    assert s["mb"] == pytest.approx(100 / 1e6)
    assert s["mb_ring_estimate"] == pytest.approx(4 * 2 * mb.ring_bytes(10, 2) / 1e6)


def test_summary_of_a_run_that_missed_the_target():
    ranks = [_rank(0, [0.1] * 3, [0.1] * 3, [0.2, 0.4, 0.6], [1, 2, 3], err=0.3)]
    s = mb.summarize(ranks, d=10, target=1e-6)
    assert s["t_target"] is None and s["final"] == 0.3


def test_summary_refuses_ranks_that_ran_different_rounds():
    ranks = [_rank(0, [0.1] * 3, [0.1] * 3, [0.2, 0.4, 0.6], [1, 2, 3]),
             _rank(1, [0.1] * 2, [0.1] * 2, [0.2, 0.4], [1, 2])]
    with pytest.raises(RunError, match="different numbers of rounds"):
        mb.summarize(ranks, d=10, target=1e-6)


def test_ring_bytes():
    assert mb.ring_bytes(10_000, 4) == 60_000.0  # 2 * 3/4 of 40 kB
    assert mb.ring_bytes(10_000, 1) == 0.0


def test_missing_mpirun_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mb.shutil, "which", lambda _: None)
    with pytest.raises(RunError, match="apt-get install -y openmpi-bin.*pip install mpi4py"):
        mb.check_tools()
