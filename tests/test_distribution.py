"""What deploy ships, from any install (orchestrator/distribution.py): the bootstrap script as
package data, and a wheel of the installed relufit when there is no source tree (the wheel it
was installed from, or one written from the installed files). The full path, a fresh venv
with relufit installed from a wheel, is in test_installed.py."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from orchestrator import distribution

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RELUFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built once, the way deploy builds one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELUFIT_CACHE", str(tmp_path_factory.mktemp("build-cache")))
        return distribution.build_wheel(distribution.source_tree())


@pytest.fixture
def source_wheel(built_wheel, tmp_path, cache) -> Path:
    """A copy of ``built_wheel`` of this test's own (tests may change it), outside the cache."""
    copy = tmp_path / "dist" / built_wheel.name
    copy.parent.mkdir()
    copy.write_bytes(built_wheel.read_bytes())
    return copy


def pip_install(wheel: Path, target: Path) -> importlib.metadata.Distribution:
    """Install ``wheel`` with pip into ``target`` (bytecode compiled, as pip does by default);
    the installed distribution."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    (info,) = target.glob("relufit-*.dist-info")
    return importlib.metadata.Distribution.at(info)


def members(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_the_bootstrap_script_is_package_data_and_has_one_copy(source_wheel):
    path = distribution.bootstrap_path()
    assert path == ROOT / "orchestrator" / "data" / "bootstrap.sh"
    assert distribution.bootstrap_script().startswith("#!/bin/sh\n")
    assert members(source_wheel)["orchestrator/data/bootstrap.sh"] == path.read_bytes()
    assert not (ROOT / "ami" / "bootstrap.sh").exists()  # one source of truth
    # the Packer template finds it where it now lives
    assert '"${path.root}/../orchestrator/data/bootstrap.sh"' in \
        (ROOT / "ami" / "relufit.pkr.hcl").read_text()


def test_a_wheel_rebuilt_from_installed_files_equals_the_original(source_wheel, tmp_path):
    dist = pip_install(source_wheel, tmp_path / "site")
    assert any(f.suffix == ".pyc" for f in dist.files)  # pip's additions must be left out
    rebuilt = distribution.rebuild_wheel(dist)
    assert rebuilt.name == source_wheel.name
    got, want = members(rebuilt), members(source_wheel)
    info = next(n.split("/")[0] for n in want if ".dist-info/" in n)
    record = f"{info}/RECORD"
    assert sorted(got) == sorted(want)
    assert {n: b for n, b in got.items() if n != record} == \
        {n: b for n, b in want.items() if n != record}
    for line in got[record].decode().splitlines():  # a RECORD pip can verify
        name, digest, size = line.split(",")
        if name == record:
            assert digest == size == ""
            continue
        data = got[name]
        assert digest == "sha256=" + base64.urlsafe_b64encode(
            hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert int(size) == len(data)
    assert distribution.rebuild_wheel(dist) == rebuilt  # same files: the cached wheel

    # and pip installs it, console script included
    again = pip_install(rebuilt, tmp_path / "site2")
    assert [e.name for e in again.entry_points] == ["relufit"]
    out = subprocess.run([sys.executable, "-c", "import orchestrator.cli, sys; "
                          "print(orchestrator.cli.__file__)"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site2")}, check=True,
                         cwd=tmp_path)  # not the checkout, which python -c would import
    assert out.stdout.strip().startswith(str(tmp_path / "site2"))


def test_the_original_wheel_is_shipped_only_while_nothing_changed(source_wheel, tmp_path,
                                                                monkeypatch):
    dist = pip_install(source_wheel, tmp_path / "site")
    monkeypatch.setattr(distribution, "source_tree", lambda: None)
    monkeypatch.setattr(distribution, "installed_distribution", lambda: dist)

    shipped = distribution.relufit_wheel()
    assert shipped == distribution.ShippedWheel(source_wheel,
                                                "the wheel relufit was installed from")

    # someone edits the installed code: that code is what runs here, so that is what ships
    node = tmp_path / "site" / "worker" / "node.py"
    node.write_text(node.read_text() + "# edited in site-packages\n")
    assert not distribution.installed_files_intact(dist)
    shipped = distribution.relufit_wheel()
    assert shipped.origin.startswith("rebuilt from the installed files ")
    assert members(shipped.path)["worker/node.py"] == node.read_bytes()

    # the wheel it came from is gone (or changed): rebuilt too
    node.write_text(node.read_text().replace("# edited in site-packages\n", ""))
    assert distribution.installed_files_intact(dist)
    source_wheel.write_bytes(source_wheel.read_bytes() + b"\0")
    assert distribution.original_wheel(dist) is None
    rebuilt = distribution.relufit_wheel()
    assert rebuilt.origin.startswith("rebuilt from the installed files ")
    assert rebuilt.path != shipped.path  # a different set of files, a different cache entry


def test_an_incomplete_install_is_a_clear_error(source_wheel, tmp_path):
    dist = pip_install(source_wheel, tmp_path / "site")
    (tmp_path / "site" / "worker" / "qsgd.py").unlink()
    with pytest.raises(distribution.RunError, match=r"incomplete: .*qsgd.py is missing"):
        distribution.shipped_files(dist)


def test_metadata_of_other_files_than_the_running_code_is_refused(source_wheel, tmp_path,
                                                                monkeypatch):
    """The first relufit metadata on sys.path may belong to other files than the code that
    runs (here: the checkout runs, an install elsewhere is found): never ship those."""
    elsewhere = pip_install(source_wheel, tmp_path / "site")
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: elsewhere)
    with pytest.raises(distribution.RunError, match="not that of the code running here"):
        distribution.installed_distribution()
