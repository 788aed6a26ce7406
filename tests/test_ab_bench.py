"""benchmarks/peer_header.py and the pieces of benchmarks/versus.py that need no long run:
the baseline code is the given commit's, loaded from git, not the working tree's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import peer_header, versus  # noqa: E402
from worker import protocol  # noqa: E402

# A stand-in for protocol 5's module: JSON headers padded to ``pad``. The project's own
# history has the real one (peer_header.py's default rev); a test cannot count on a clone
# deep enough to hold it.
FAKE_V5 = '''
import json
from dataclasses import dataclass
VERSION = 5
PART = "PART"

@dataclass
class Message:
    header: dict

    def get(self, k):
        return self.header.get(k)

def build(type_, payloads, pad=0, **fields):
    return [json.dumps({"v": VERSION, "type": type_, **fields}).encode().ljust(pad), *payloads]

def parse(frames):
    return Message(json.loads(frames[0]))
'''


@pytest.fixture()
def repo(tmp_path):
    """A git repository whose commit holds FAKE_V5, and whose working tree holds another."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "protocol.py").write_text(FAKE_V5)
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v5")
    (tmp_path / "worker" / "protocol.py").write_text("VERSION = 6\n")  # not what is loaded
    return tmp_path


def test_the_peer_header_baseline_is_the_commits_code(repo):
    old = peer_header.old_protocol("HEAD", repo)
    assert old.VERSION == 5
    frames = old.build(old.PART, [b"x"], pad=96, trial=1, round=2, epoch=0, rank=3)
    assert len(frames[0]) == 96 and old.parse(frames).get("rank") == 3
    with pytest.raises(protocol.ProtocolError):  # this tree no longer reads it
        protocol.parse_peer(frames)
    peer_header.round_trip(old, "parse")
    peer_header.round_trip(protocol, "parse_peer")
    (repo / "worker" / "protocol.py").write_text(FAKE_V5.replace("VERSION = 5", "VERSION = 4"))
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qam", "v4"], check=True)
    with pytest.raises(SystemExit, match="not 5"):
        peer_header.old_protocol("HEAD", repo)


def test_the_peer_header_script_prints_both_paths(repo, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peer_header.py", "--repeats", "1", "--n", "20",
                                      "--baseline-rev", "HEAD", "--repo", str(repo)])
    peer_header.main()
    out = capsys.readouterr().out
    assert "| json (protocol 5) |" in out and "| binary (protocol 6) | " in out
    assert "binary / json:" in out


def test_versus_imports_the_tree_it_is_given(tmp_path):
    assert versus.protocol_version(ROOT) == protocol.VERSION
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "__init__.py").write_text("")
    (tmp_path / "worker" / "protocol.py").write_text("VERSION = 41\n")
    assert versus.protocol_version(tmp_path) == 41
