"""CurveZMQ keys of a run: make them, load them, put them on sockets. No other I/O.

Both sides import this (``worker/`` imports nothing from ``orchestrator/``, and the master
must not depend on the agent). Key files are in the format ``zmq.auth.create_certificates``
writes; a secret key file readable by group or others is refused, as OpenSSH refuses such
a private key. Keys are never printed or logged.

A run has two key pairs. The master's (``server``) secures the master's ROUTER; the agents
share the ``client`` pair. Between agents (the ``allreduce`` topology) the ``client`` pair
serves both ends: each agent's peer ROUTER is a Curve server with that pair and admits only
that public key, so only a process holding the run's agent keys can connect to a peer.

Directories: the master's holds ``server.key_secret`` and ``client.key`` (every ``*.key``
in it is an admitted client); an agent's holds ``server.key`` and ``client.key_secret``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq

SERVER_SECRET, SERVER_PUBLIC = "server.key_secret", "server.key"
CLIENT_SECRET, CLIENT_PUBLIC = "client.key_secret", "client.key"


class KeyFileError(Exception):
    """A key file that is missing, unreadable, too open, or not a certificate."""


def load_key(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; ``secret=True`` checks its mode first."""
    import zmq.auth

    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file (make keys with "
                           "zmq.auth.create_certificates)")
    if secret and path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path}: secret key readable by others; chmod 600 {path}")
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate ({type(e).__name__})") from None


def _key_pair(path: Path) -> tuple[bytes, bytes]:
    public, secret = load_key(path, secret=True)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key")
    return public, secret


def create_keys(curve_dir: str | Path) -> Path:
    """A fresh server and client key pair in ``curve_dir`` (secret files mode 0600)."""
    import zmq.auth

    path = Path(curve_dir)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        _, secret = zmq.auth.create_certificates(str(path), name)
        Path(secret).chmod(0o600)
    return path


def set_server(sock: zmq.Socket, ctx: zmq.Context, curve_dir: Path) -> Any:
    """The master's ROUTER: our pair from ``server.key_secret``; only clients whose public
    key is a ``*.key`` file in ``curve_dir`` may connect. Returns the running authenticator."""
    pair = _key_pair(curve_dir / SERVER_SECRET)
    return _serve(sock, ctx, pair, "relufit.master.auth",
                  lambda auth: auth.configure_curve(domain="*", location=str(curve_dir)))


def _serve(sock: zmq.Socket, ctx: zmq.Context, pair: tuple[bytes, bytes], log_name: str,
           admit: Any) -> Any:
    """Make ``sock`` a Curve server with ``pair``, behind an authenticator that ``admit``
    configures (one per context: ZAP is a context-wide endpoint)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger(log_name))
    auth.start()
    admit(auth)
    sock.curve_publickey, sock.curve_secretkey = pair
    sock.curve_server = True
    return auth


def set_client(sock: zmq.Socket, curve_dir: Path) -> None:
    """An agent's connection to the master: the master's public key (``server.key``) and
    the agents' pair (``client.key_secret``)."""
    server_public, _ = load_key(curve_dir / SERVER_PUBLIC, secret=False)
    public, secret = _key_pair(curve_dir / CLIENT_SECRET)
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = server_public


class _OnlyKey:
    """ZAP credentials provider admitting exactly one public key (both in Z85, as
    ``load_certificate`` returns it and the authenticator passes it)."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


def set_peer_server(sock: zmq.Socket, ctx: zmq.Context, curve_dir: Path) -> Any:
    """An agent's peer ROUTER: a Curve server with the agents' pair that admits only the
    agents' public key. Returns the running authenticator."""
    pair = _key_pair(curve_dir / CLIENT_SECRET)
    return _serve(sock, ctx, pair, "relufit.agent.auth", lambda auth: auth.configure_curve_callback(
        domain="*", credentials_provider=_OnlyKey(pair[0])))


def set_peer_client(sock: zmq.Socket, curve_dir: Path) -> None:
    """An agent's connection to another agent's peer ROUTER (whose key is the agents')."""
    public, secret = _key_pair(curve_dir / CLIENT_SECRET)
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = public
