"""The hosts provider: the hosts file's validation (pure), and `cluster up/down --provider
hosts` + deploy + run against a real sshd on 127.0.0.1 (the ``sshd_host`` fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import free_port

from orchestrator import __version__
from orchestrator import cluster as model
from orchestrator.cli import cli
from orchestrator.config import load_experiment
from orchestrator.errors import ConfigError
from orchestrator.providers import hosts
from orchestrator.results import load_run
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool


@pytest.fixture
def key(tmp_path) -> str:
    path = tmp_path / "id_test"
    path.write_text("not checked by the parser\n")
    path.chmod(0o600)
    return str(path)


def parse(data: dict, name: str = "lab"):
    return hosts.parse_hosts(data, name)


def test_a_valid_hosts_file(key):
    c = parse({"user": "ubuntu", "key": key, "host": [
        {"address": "10.0.0.5"},
        {"address": "box-2.lab.example", "port": 2222, "user": "admin",
         "private_address": "192.168.1.7"},
    ]})
    assert c.provider == "hosts" and c.key_path == str(Path(key).resolve())
    m, w = c.nodes
    assert (m.rank, m.role, m.address, m.private_address, m.port, m.user) == \
        (0, "master", "10.0.0.5", "10.0.0.5", 22, "ubuntu")
    assert (w.rank, w.role, w.address, w.private_address, w.port, w.user) == \
        (1, "worker", "box-2.lab.example", "192.168.1.7", 2222, "admin")
    assert c.extra["master_port"] == 5555


@pytest.mark.parametrize("data, key_named, why", [
    ({"host": [{"address": "h"}]}, "key", "missing"),
    ({"key": "KEY", "host": []}, "host", "no hosts"),
    ({"key": "KEY"}, "host", "no hosts"),
    ({"key": "KEY", "hosts": [{"address": "h"}]}, "hosts", "did you mean 'host'"),
    ({"key": "KEY", "host": [{"adress": "h"}]}, "host[0].adress", "did you mean 'address'"),
    ({"key": "KEY", "host": [{"port": 22}]}, "host[0].address", "missing"),
    ({"key": "KEY", "host": [{"address": "h", "port": 70000}]}, "host[0].port", "1-65535"),
    ({"key": "KEY", "host": [{"address": "h", "port": "22"}]}, "host[0].port", "1-65535"),
    ({"key": "KEY", "host": [{"address": "bad host!"}]}, "host[0].address", "not a host name"),
    ({"key": "KEY", "host": [{"address": "h"}, {"address": "h"}]}, "host[1].address",
     "listed twice"),
    ({"key": "KEY", "user": "", "host": [{"address": "h"}]}, "user", "not a user name"),
    ({"key": "KEY", "master_port": 80, "host": [{"address": "h"}]}, "master_port", "1024"),
    ({"key": "KEY", "host": ["h"]}, "host[0]", "must be a table"),
])
def test_bad_hosts_files_name_the_key(data, key_named, why, key):
    data = {k: (key if v == "KEY" else v) for k, v in data.items()}
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert e.value.key == key_named and why in e.value.why


def test_key_file_must_exist_and_be_private(tmp_path, key):
    with pytest.raises(ConfigError, match="no such file"):
        parse({"key": str(tmp_path / "nope"), "host": [{"address": "h"}]})
    Path(key).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        parse({"key": key, "host": [{"address": "h"}]})


def test_not_toml_and_missing_file(tmp_path):
    bad = tmp_path / "hosts.toml"
    bad.write_text("user = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        hosts.load_hosts_file(bad, "lab")
    with pytest.raises(ConfigError, match="no such file"):
        hosts.load_hosts_file(tmp_path / "none.toml", "lab")


def test_cli_hosts_needs_a_hosts_file(relufit_home):
    res = CliRunner().invoke(cli, ["cluster", "up", "--provider", "hosts", "--name", "lab"])
    assert res.exit_code == 2 and "--hosts-file" in res.output
    res = CliRunner().invoke(cli, ["cluster", "up", "--provider", "hosts", "--name", "lab",
                                   "--hosts-file", "x.toml", "--workers", "3"])
    assert res.exit_code == 2 and "--workers" in res.output


def hosts_file(path: Path, h, key: str | None = None, master_port: int | None = None) -> Path:
    port = f"master_port = {master_port}\n" if master_port else ""
    path.write_text(f'user = "{h.user}"\nkey = "{key or h.key_path}"\n{port}'
                    f'[[host]]\naddress = "{h.host}"\nport = {h.port}\n')
    return path


@pytest.mark.sshd
def test_up_pins_host_keys_and_down_forgets(sshd_host, relufit_home, tmp_path):
    f = hosts_file(tmp_path / "hosts.toml", sshd_host)
    res = CliRunner().invoke(cli, ["cluster", "up", "--provider", "hosts", "--hosts-file",
                                   str(f), "--name", "lab"])
    assert res.exit_code == 0, res.output
    c = model.load_cluster("lab")
    assert c.provider == "hosts" and c.nodes[0].port == sshd_host.port
    pinned = Path(c.known_hosts).read_text().split()
    assert pinned[0] == f"[127.0.0.1]:{sshd_host.port}"
    assert pinned[2] == sshd_host.host_key.split()[1]
    res = CliRunner().invoke(cli, ["cluster", "status", "lab"])
    assert res.exit_code == 0 and f"root@127.0.0.1:{sshd_host.port}" in res.output
    res = CliRunner().invoke(cli, ["cluster", "down", "lab"])
    assert res.exit_code == 0, res.output
    assert model.read_cluster("lab") is None and not model.cluster_dir("lab").exists()


@pytest.mark.sshd
def test_up_with_a_wrong_key_fails_and_saves_nothing(sshd_host, relufit_home, tmp_path):
    f = hosts_file(tmp_path / "hosts.toml", sshd_host, key=sshd_host.new_key("wrong"))
    res = CliRunner().invoke(cli, ["cluster", "up", "--provider", "hosts", "--hosts-file",
                                   str(f), "--name", "lab"])
    assert res.exit_code == 1
    assert f"[node0 127.0.0.1:{sshd_host.port}] authentication failed" in res.output
    assert not model.cluster_dir("lab").exists()


@pytest.mark.sshd
def test_one_host_deploy_and_run(sshd_host, relufit_home, tmp_path, monkeypatch):
    """A lone host runs the master and every agent; results come home and match sim."""
    monkeypatch.setenv("RELUFIT_CACHE", os.environ.get("RELUFIT_CACHE") or
                       str(Path.home() / ".cache" / "relufit-tests"))
    monkeypatch.chdir(tmp_path)
    port = free_port()  # sshd_host shares this machine's network: no fixed port
    f = hosts_file(tmp_path / "hosts.toml", sshd_host, master_port=port)
    run = CliRunner().invoke
    assert run(cli, ["cluster", "up", "--provider", "hosts", "--hosts-file", str(f),
                     "--name", "one"]).exit_code == 0
    res = run(cli, ["deploy", "one"])
    assert res.exit_code == 0 and f"relufit, version {__version__}" in res.output, res.output
    venv = sshd_host.home(".relufit/venv")  # the node's system python3, no package index
    assert (venv / "lib/python3.11/site-packages/numpy").is_dir()
    # idempotent: a second deploy uploads only the relufit wheel and keeps the venv
    first = float(res.output.split(" MB")[0].split()[-1])
    res = run(cli, ["deploy", "one"])
    assert res.exit_code == 0 and float(res.output.split(" MB")[0].split()[-1]) < first / 10
    assert "already installed from this wheel" in res.output
    exp = tmp_path / "exp.toml"
    exp.write_text('[problem]\nd = 30\nn = 600\n[train]\nrounds = 40\ntarget_rel_error = 0\n'
                   '[compress]\nscheme = "none"\n[cluster]\nworkers = 2\n')
    res = run(cli, ["run", str(exp), "--cluster", "one", "--out", "results"])
    assert res.exit_code == 0, res.output
    dest = Path(res.output.strip().splitlines()[-1])
    got = load_run(dest)["metrics"]["rel_error"]
    sim = run_experiment(load_experiment(exp), SimPool(), tmp_path / "sim", "sim",
                         progress=lambda line: None)
    np.testing.assert_allclose(got, load_run(sim)["metrics"]["rel_error"], rtol=1e-9)
    placement = json.loads((dest / "nodes" / "placement.json").read_text())
    assert placement == {"master": f"node0 127.0.0.1:{sshd_host.port}",
                         "0": f"node0 127.0.0.1:{sshd_host.port}",
                         "1": f"node0 127.0.0.1:{sshd_host.port}"}
    assert f"tcp://0.0.0.0:{port}" in (dest / "nodes" / "master" / "master.log").read_text()
    shutil.rmtree(dest)

    # bootstrap on a python3 without ensurepip (Debian without python3-venv) and no way to
    # install it: a venv without pip, then pip from the shipped pip wheel
    script = ('mkdir -p fake/bin fake/py/ensurepip && printf "exit 1\\n" > fake/bin/apt-get && '
              'chmod +x fake/bin/apt-get && echo "raise ImportError" > fake/py/ensurepip/'
              '__init__.py && PATH=$HOME/fake/bin:$PATH PYTHONPATH=$HOME/fake/py '
              'RELUFIT_VENV=$HOME/v2 sh .relufit/bootstrap.sh install --wheelhouse '
              '.relufit/wheelhouse --wheel .relufit/wheels/*.whl && v2/bin/relufit --version')
    out = subprocess.run(sshd_host.ssh(script), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "could not install python3-venv" in out.stdout
    assert out.stdout.strip().endswith(f"relufit, version {__version__}")


@pytest.mark.sshd
def test_run_before_deploy_names_the_fix(sshd_host, relufit_home, tmp_path):
    f = hosts_file(tmp_path / "hosts.toml", sshd_host)
    run = CliRunner().invoke
    assert run(cli, ["cluster", "up", "--provider", "hosts", "--hosts-file", str(f),
                     "--name", "fresh"]).exit_code == 0
    exp = tmp_path / "exp.toml"
    exp.write_text("[cluster]\nworkers = 1\n")
    res = run(cli, ["run", str(exp), "--cluster", "fresh", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "relufit is not installed; run `relufit deploy fresh` first" in res.output
    assert "wrote no run directory" not in res.output  # nothing started: nothing to fetch
    res = run(cli, ["run", str(exp), "--cluster", "fresh", "--backend", "local"])
    assert res.exit_code == 2 and "not with --cluster" in res.output


def test_unknown_cluster_is_a_clear_error(relufit_home):
    for args in (["deploy", "nope"], ["logs", "nope"], ["stop", "nope"],
                 ["fetch", "nope", "20260101-000000-x"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and "no cluster 'nope'" in res.output, args
