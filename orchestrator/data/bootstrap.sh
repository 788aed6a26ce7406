#!/bin/sh
# relufit node bootstrap: idempotent, POSIX sh, root only where it must be.
#
#   bootstrap.sh [prepare]     system python3 + venv support (apt-get, as root or via sudo -n)
#                              and the relufit venv; what EC2 user-data and the AMI build run.
#   bootstrap.sh PIP-ARGS...   prepare, then `pip install PIP-ARGS` into the venv (the EC2
#                              user-data form, e.g. bootstrap.sh /tmp/relufit-0.1.0-py3-none-any.whl)
#   bootstrap.sh probe         prepare, then print the system python3's platform as one JSON line
#   bootstrap.sh install --wheel FILE [--wheelhouse DIR | --index]
#                              the relufit venv ($RELUFIT_VENV, default ~/.relufit/venv) with
#                              relufit and its dependencies: from the shipped wheelhouse
#                              (--no-index: no package index needed) or from the index (--index).
#                              Skipped when this very wheel (by sha256) is already installed.
#
# Never prints secrets; logs only what it installs.
set -eu

VENV="${RELUFIT_VENV:-$HOME/.relufit/venv}"
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3 || echo /usr/bin/python3)"

say() { echo "bootstrap: $*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
  else return 1
  fi
}

has_venv() { [ -x "$PY" ] && "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; }

prepare() {
  if has_venv; then return 0; fi
  say "installing python3 and python3-venv"
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # cloud-init may still hold the apt lock at first boot: wait for it rather than fail
    as_root apt-get -o DPkg::Lock::Timeout=300 update -qq \
      && as_root apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3 python3-venv >/dev/null \
      || say "could not install python3-venv (no root?); will try a venv without ensurepip"
  elif command -v dnf >/dev/null 2>&1; then
    as_root dnf install -y -q python3 || true
  fi
  PY="$(command -v python3 || echo /usr/bin/python3)"
  [ -x "$PY" ] || { say "no python3 on this node and no way to install it"; exit 3; }
}

probe() {
  prepare
  "$PY" -c "import json, platform, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'full_version': platform.python_version(), 'machine': platform.machine(), 'glibc': platform.libc_ver()[1] if platform.libc_ver()[0] == 'glibc' else ''}))"
}

make_venv() {  # $1: wheelhouse ("" when installing from the index)
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  if has_venv; then
    "$PY" -m venv "$VENV"
  else  # no ensurepip (Debian without python3-venv, no root): pip from the shipped pip wheel
    pipwhl="$(ls "$1"/pip-*.whl 2>/dev/null | head -n 1 || true)"
    [ -n "$pipwhl" ] || { say "python3 has no venv/ensurepip and no pip wheel was shipped"; exit 3; }
    "$PY" -m venv --without-pip "$VENV"
    "$VENV/bin/python" "$pipwhl/pip" install -q --no-index "$pipwhl"
  fi
  say "venv $VENV ($("$VENV/bin/python" --version 2>&1))"
}

install() {
  wheel="" house="" index=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --wheel) wheel="$2"; shift 2 ;;
      --wheelhouse) house="$2"; shift 2 ;;
      --index) index=1; shift ;;
      *) say "unknown option $1"; exit 2 ;;
    esac
  done
  [ -f "$wheel" ] || { say "no such wheel: $wheel"; exit 2; }
  [ "$index" = 1 ] || [ -d "$house" ] || { say "give --wheelhouse DIR or --index"; exit 2; }
  prepare
  make_venv "$house"
  sum="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [ -f "$VENV/.relufit-wheel" ] && [ "$(cat "$VENV/.relufit-wheel")" = "$sum" ] \
     && "$VENV/bin/relufit" --version >/dev/null 2>&1; then
    say "relufit already installed from this wheel"
    return 0
  fi
  # --no-compile: byte-code is written on first import instead; installs in half the time
  pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
  if [ "$index" = 1 ]; then
    $pip install --no-compile "$wheel"
  else
    $pip install --no-compile --no-index --find-links "$house" "$wheel"
  fi
  if [ -f "$VENV/.relufit-wheel" ]; then
    # a new build may keep the version number: replace relufit itself, whatever pip thinks
    $pip install --no-compile --no-index --no-deps --force-reinstall "$wheel"
  fi
  echo "$sum" > "$VENV/.relufit-wheel"
  say "installed $("$VENV/bin/relufit" --version)"
}

case "${1:-prepare}" in
  prepare) prepare; make_venv ""; say "venv ready at $VENV" ;;
  probe) probe ;;
  install) shift; install "$@" ;;
  -h|--help) sed -n '2,16p' "$0" ;;
  *) prepare; make_venv ""; "$VENV/bin/python" -m pip install -q "$@"; say "venv ready at $VENV" ;;
esac
