"""relufit as a user who installed it from a wheel has it: no source tree anywhere in sight.

How the install is made, and why it is honest and still fast:

- A wheel of this checkout is built the way deploy builds one, and copied next to the test.
- A fresh venv is made with ``python -m venv`` (no ``--system-site-packages``: the editable
  relufit of the development venv, and anything else installed there, cannot leak in).
- relufit is installed into it with ``pip install --no-index --find-links WHEELHOUSE
  relufit.whl``: a real, non-editable install with every dependency resolved by pip; the
  wheels come from the wheelhouse that deploy gathers for this machine's own platform
  (cached under $RELUFIT_CACHE, shared with the deploy tests), so no index is needed and
  the install takes seconds, not minutes of downloads.
- Every command runs the venv's ``relufit`` script with PYTHONPATH unset and the working
  directory a temporary one, so neither the checkout nor the worktree can be imported; the
  fixture checks that ``orchestrator`` resolves inside the venv and that no source tree is
  found.

Then: ``cluster up --provider ec2 --dry-run`` against moto_server (the bootstrap script is
package data), and ``deploy`` + ``run --cluster`` on a hosts cluster over an emulated sshd
host: first shipping the wheel relufit was installed from, then, with that wheel deleted, one
rebuilt from the installed files. The run's rel_error equals ``--backend sim``'s.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, moto_client, relufit_image
from test_hosts import hosts_file

from orchestrator import deploy, distribution
from orchestrator.results import load_run

pytestmark = pytest.mark.slow

TEST_CACHE = Path.home() / ".cache" / "relufit-tests"


class Installed:
    """A venv with relufit installed non-editable from ``wheel``."""

    def __init__(self, venv: Path, wheel: Path, cwd: Path, cache: Path):
        self.venv, self.wheel, self.cwd, self.cache = venv, wheel, cwd, cache

    def env(self, **more: str) -> dict[str, str]:
        """The environment of a user: no PYTHONPATH, no AWS settings of this machine."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and
               not k.startswith("AWS_")}
        env["RELUFIT_CACHE"] = str(self.cache)
        env.update(more)
        return env

    def relufit(self, *args: str, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "relufit"), *args], cwd=self.cwd,
                              env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def python(self, code: str) -> str:
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", code], cwd=self.cwd,
                              env=self.env(), capture_output=True, text=True, check=True,
                              timeout=60).stdout


def local_platform() -> deploy.NodePlatform:
    """This machine's python, as deploy would probe a node's."""
    try:  # the glibc running here ("glibc 2.36"), not the oldest the interpreter links to
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        libc, version = "", ""
    return deploy.NodePlatform(f"{sys.version_info[0]}.{sys.version_info[1]}",
                               platform.python_version(), platform.machine(),
                               version if libc == "glibc" else "")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    cache = Path(os.environ.get("RELUFIT_CACHE") or TEST_CACHE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELUFIT_CACHE", str(cache))
        built = distribution.build_wheel(distribution.source_tree())
        house = deploy.build_wheelhouse(local_platform(),
                                        distribution.wheel_requirements(built))
    wheel = base / "dist" / built.name  # the file pip records; a test deletes it later
    wheel.parent.mkdir()
    shutil.copy2(built, wheel)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    cwd = base / "work"
    cwd.mkdir()
    inst = Installed(venv, wheel, cwd, cache)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(house),
                    str(wheel)], check=True, timeout=300, cwd=cwd, env=inst.env())
    where = json.loads(inst.python(
        "import json, orchestrator, worker; from orchestrator import distribution as d; "
        "print(json.dumps([orchestrator.__file__, worker.__file__, str(d.source_tree())]))"))
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert where[0] == str(site / "orchestrator" / "__init__.py"), where
    assert where[1] == str(site / "worker" / "__init__.py"), where
    assert where[2] == "None", where  # no checkout: deploy must ship the installed files
    return inst


def test_cluster_up_dry_run_on_moto_from_a_wheel_install(installed, aws_env):
    relufit_image(moto_client(aws_env))
    env = installed.env(**{k: v for k, v in aws_env.items()
                           if k.startswith("AWS_") or k in ("RELUFIT_HOME", "RELUFIT_EC2_POLL_S")})
    r = installed.relufit("cluster", "up", "--provider", "ec2", "--name",
                          f"inst-{secrets.token_hex(3)}", "--workers", "1", "--ssh-cidr",
                          "198.51.100.4/32", "--dry-run", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run: allowed to launch rank 1" in r.stderr
    assert "Dry run passed: nothing was created." in r.stderr
    assert "is missing" not in r.stderr + r.stdout


EXPERIMENT = """[problem]
d = 30
n = 600
seed = 5
[train]
rounds = 40
target_rel_error = 0
[compress]
scheme = "qsgd"
levels = 4
[cluster]
workers = 2
"""


@pytest.mark.sshd
def test_deploy_and_run_from_a_wheel_install(installed, sshd_host, tmp_path):
    env = installed.env(RELUFIT_HOME=str(tmp_path / "home"))
    hosts = hosts_file(tmp_path / "hosts.toml", sshd_host, master_port=free_port())
    r = installed.relufit("cluster", "up", "--provider", "hosts", "--hosts-file", str(hosts),
                          "--name", "inst", env=env)
    assert r.returncode == 0, r.stderr

    r = installed.relufit("deploy", "inst", env=env)
    assert r.returncode == 0, r.stderr
    assert f"wheel {installed.wheel.name} " in r.stderr
    assert "the wheel relufit was installed from" in r.stderr
    assert "relufit, version 0.1.0" in r.stderr
    wheels = sshd_host.home(".relufit/wheels")
    assert (wheels / installed.wheel.name).read_bytes() == installed.wheel.read_bytes()

    installed.wheel.unlink()  # gone, as a pip cache's temporary wheel would be
    r = installed.relufit("deploy", "inst", env=env)
    assert r.returncode == 0, r.stderr
    assert "rebuilt from the installed files " in r.stderr, r.stderr

    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT)
    runs = {}
    for how in (["--cluster", "inst"], ["--backend", "sim"]):
        r = installed.relufit("run", str(exp), *how, "--out", str(tmp_path / how[1]), env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[how[1]] = load_run(Path(r.stdout.strip().splitlines()[-1]))
    assert [t["status"] for t in runs["inst"]["summary"]["trials"]] == ["completed"]
    got, ref = runs["inst"]["metrics"]["rel_error"], runs["sim"]["metrics"]["rel_error"]
    assert len(got) == len(ref) == 40
    np.testing.assert_array_equal(got, ref)
    r = installed.relufit("cluster", "down", "inst", env=env)
    assert r.returncode == 0, r.stderr
