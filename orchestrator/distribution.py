"""What relufit ships to its nodes: a wheel of exactly the relufit running here, and the node
bootstrap script. Both work from any install, not only from a checkout.

- ``bootstrap_script``: ``orchestrator/data/bootstrap.sh``, package data read with
  importlib.resources (EC2 user-data embeds it; deploy uploads it).
- ``relufit_wheel``: the wheel ``deploy`` uploads, by where this relufit runs from:
  - a source tree (a checkout: ``pip install -e .`` or PYTHONPATH): a wheel built from a copy
    of exactly the hashed source files, cached by that hash;
  - an ordinary install (a wheel, an index, ``pip install .``): the wheel it was installed
    from, when pip recorded a local one (``direct_url.json``) whose sha256 still matches and
    whose installed files are unchanged (their RECORD hashes); else a wheel written from the
    installed files themselves (``importlib.metadata``'s file list), cached by their hash.

Caches live under ``cache_dir()`` (``$RELUFIT_CACHE``, default ``$RELUFIT_HOME``):
``wheels/<hash>/``.
"""

from __future__ import annotations

import base64
import email.parser
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cluster import relufit_home
from orchestrator.errors import RunError

DIST_NAME = "relufit"
BOOTSTRAP = "bootstrap.sh"
PACKAGES = ("orchestrator", "worker")
# Written by the installer, not part of a wheel (RECORD is written afresh).
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # same files, same wheel bytes


def bootstrap_path() -> Path:
    """The node bootstrap script, a file of relufit's package data."""
    res = importlib.resources.files("orchestrator") / "data" / BOOTSTRAP
    if not isinstance(res, Path) or not res.is_file():  # installed as files by any pip
        raise RunError(f"relufit's package data has no data/{BOOTSTRAP} ({res}): "
                       "reinstall relufit")
    return res


def bootstrap_script() -> str:
    """The text of the node bootstrap script."""
    return bootstrap_path().read_text()


def cache_dir() -> Path:
    """Built wheels and wheelhouses: $RELUFIT_CACHE, default $RELUFIT_HOME (~/.relufit)."""
    return Path(os.environ.get("RELUFIT_CACHE") or relufit_home()).expanduser()


@dataclass(frozen=True)
class ShippedWheel:
    """The wheel deploy uploads, and where it came from (shown to the user)."""

    path: Path
    origin: str


def relufit_wheel() -> ShippedWheel:
    """A wheel of exactly the relufit this process runs (see the module docstring)."""
    root = source_tree()
    if root is not None:
        wheel = build_wheel(root)
        return ShippedWheel(wheel, f"source tree {wheel.parent.name}")
    dist = installed_distribution()
    files = shipped_files(dist)
    original = original_wheel(dist)
    if original is not None and installed_files_intact(dist):
        return ShippedWheel(original, "the wheel relufit was installed from")
    wheel = rebuild_wheel(dist, files)
    return ShippedWheel(wheel, f"rebuilt from the installed files {wheel.parent.name}")


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel, without the extras' requirements."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    return [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]


def _digest(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over each file's relative name and bytes, in the order given."""
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _cached(digest: str) -> Path | None:
    found = sorted((cache_dir() / "wheels" / digest[:16]).glob(f"{DIST_NAME}-*.whl"))
    return found[0] if found else None


def _store(wheel: Path, digest: str) -> Path:
    """Copy ``wheel`` into the cache under ``digest``, atomically (never half a wheel)."""
    cache = cache_dir() / "wheels" / digest[:16]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{wheel.name}.tmp"
    shutil.copy2(wheel, tmp)
    os.replace(tmp, cache / wheel.name)
    return cache / wheel.name


# ------------------------------------------------------------------------------ source tree

def source_tree() -> Path | None:
    """The checkout this orchestrator runs from (editable install, PYTHONPATH), or None when
    it runs from an ordinary install."""
    import orchestrator

    root = Path(orchestrator.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and f'name = "{DIST_NAME}"' in pyproject.read_text():
        return root
    return None


def _source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml", root / "README.md"]
    for pkg in PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return [f for f in files if f.exists()]


def source_hash(root: Path) -> str:
    return _digest((str(f.relative_to(root)), f) for f in _source_files(root))


def build_wheel(root: Path) -> Path:
    """A wheel of the exact source in ``root``, cached by the content hash of that source.

    Built from a copy of the hashed files, so the wheel holds exactly what was hashed and
    the checkout gets no build/ or egg-info litter."""
    digest = source_hash(root)
    found = _cached(digest)
    if found:
        return found
    with tempfile.TemporaryDirectory(prefix="relufit-build-") as tmp:
        src = Path(tmp) / "src"
        for f in _source_files(root):
            dst = src / f.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        out = Path(tmp) / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps",
             "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
            capture_output=True, text=True)
        wheels = sorted(out.glob(f"{DIST_NAME}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RunError(f"building the relufit wheel failed: {proc.stderr.strip()[-500:]}")
        return _store(wheels[0], digest)


# ------------------------------------------------------------------------------ installed

def installed_distribution() -> importlib.metadata.Distribution:
    """The installed relufit distribution whose files are the code running here."""
    import orchestrator

    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise RunError("relufit runs from neither a source tree nor an installed distribution "
                       "(no relufit metadata found): install it with pip") from None
    running = Path(orchestrator.__file__).resolve()
    if Path(dist.locate_file("orchestrator/__init__.py")).resolve() != running:
        raise RunError(f"the installed relufit metadata ({dist.locate_file('')}) is not that "
                       f"of the code running here ({running.parent}): reinstall relufit")
    return dist


def shipped_files(dist: importlib.metadata.Distribution) -> list[tuple[str, Path]]:
    """(name in the wheel, installed path) of every file a wheel of ``dist`` holds, in wheel
    order: the packages, then the .dist-info files pip did not add itself. Console scripts
    (outside site-packages) and compiled bytecode are left out: the installer makes them."""
    if not dist.files:
        raise RunError("the installed relufit lists no files (no RECORD): reinstall relufit")
    pkgs, meta = [], []
    for f in dist.files:
        if ".." in f.parts or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        is_meta = f.parts[0].endswith(".dist-info")
        if is_meta and f.name in INSTALLER_FILES:
            continue
        path = Path(dist.locate_file(f))
        if not path.is_file():
            raise RunError(f"the installed relufit is incomplete: {path} is missing; "
                           "reinstall relufit")
        (meta if is_meta else pkgs).append((f.as_posix(), path))
    return sorted(pkgs) + sorted(meta)


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def installed_files_intact(dist: importlib.metadata.Distribution) -> bool:
    """Every installed package file still has the sha256 its RECORD gives (nobody edited
    site-packages since the install)."""
    for f in dist.files or ():
        if f.hash is None or ".." in f.parts or f.parts[0].endswith(".dist-info"):
            continue
        path = Path(dist.locate_file(f))
        if not path.is_file() or _record_hash(path.read_bytes()) != f.hash.value:
            return False
    return True


def original_wheel(dist: importlib.metadata.Distribution) -> Path | None:
    """The local wheel file ``dist`` was installed from, if pip recorded it and its sha256
    still matches; else None."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    url = urllib.parse.urlparse(info.get("url", ""))
    want = info.get("archive_info", {}).get("hashes", {}).get("sha256")
    if url.scheme != "file" or not url.path.endswith(".whl") or not want:
        return None
    path = Path(urllib.request.url2pathname(url.path))
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != want:
        return None
    return path


def _wheel_name(dist: importlib.metadata.Distribution, files: list[tuple[str, Path]]) -> str:
    """``<name>-<version>-<tag>.whl``, the tag from the installed WHEEL file."""
    info_dir = next(rel.split("/")[0] for rel, _ in files if "dist-info/" in rel)
    wheel_meta = email.parser.Parser().parsestr(dist.read_text("WHEEL") or "")
    tag = wheel_meta.get("Tag") or "py3-none-any"
    return f"{info_dir.removesuffix('.dist-info')}-{tag}.whl"


def rebuild_wheel(dist: importlib.metadata.Distribution,
                  files: list[tuple[str, Path]] | None = None) -> Path:
    """A wheel written from the installed files of ``dist``, cached by their hash.

    The archive is made here with zipfile (no build backend: the installed files are the
    built result already), with a fresh RECORD; dates are fixed, so the same files give
    the same bytes."""
    files = files if files is not None else shipped_files(dist)
    digest = _digest(files)
    found = _cached(digest)
    if found:
        return found
    name = _wheel_name(dist, files)
    record_name = f"{files[-1][0].split('/')[0]}/RECORD"
    with tempfile.TemporaryDirectory(prefix="relufit-rewheel-") as tmp:
        out = Path(tmp) / name
        record = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for rel, path in files:
                data = path.read_bytes()
                _write(z, rel, data, path.stat().st_mode & 0o777)
                record.append(f"{rel},sha256={_record_hash(data)},{len(data)}")
            record.append(f"{record_name},,")
            _write(z, record_name, ("\n".join(record) + "\n").encode(), 0o644)
        return _store(out, digest)


def _write(z: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.external_attr = (0o100000 | mode) << 16  # a regular file with its permission bits
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, data)
