"""Autostop on idle: the watchdog's rule and loop (no sleeping: the clock is passed in), what
it reads from the node (pidfiles and /proc through the same shell as remote.py, the stamp),
what `cluster status` makes of its state file, and the checks of --idle-minutes.

The whole path on emulated hosts is in test_autostop_netns.py; the EC2 user-data in
test_ec2.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import autostop
from orchestrator.cli import cli
from orchestrator.cluster import check_idle_minutes
from orchestrator.errors import ConfigError
from worker import watchdog
from worker.watchdog import Facts, judge

IDLE = 600.0
T0 = 1_000_000.0
QUIET = Facts(running=(), stamp=None)


# ---------------------------------------------------------------- the rule


def test_a_node_with_nothing_ever_active_fires_idle_seconds_after_the_start():
    assert not judge(T0 + IDLE - 0.001, T0, QUIET, IDLE).fire
    v = judge(T0 + IDLE, T0, QUIET, IDLE)
    assert v.fire and v.last_active == T0 and v.deadline == T0 + IDLE


def test_a_live_run_is_activity_now_however_long_it_lasts():
    v = judge(T0 + 10 * IDLE, T0, Facts(running=("r1",), stamp=None), IDLE)
    assert not v.fire and v.last_active == T0 + 10 * IDLE and v.deadline == T0 + 11 * IDLE


def test_a_touched_stamp_restarts_the_clock_and_an_old_one_does_not():
    touched = judge(T0 + IDLE, T0, Facts((), stamp=T0 + 100), IDLE)
    assert not touched.fire and touched.deadline == T0 + 100 + IDLE
    old = judge(T0 + 50 + IDLE, T0 + 50, Facts((), stamp=T0 - 5), IDLE)
    assert old.fire and old.last_active == T0 + 50


def test_a_stamp_in_the_future_counts_as_now_not_later():
    v = judge(T0, T0 - 5, Facts((), stamp=T0 + 3600), IDLE)
    assert v.last_active == T0 and v.deadline == T0 + IDLE


def test_the_idle_time_counts_from_the_last_check_that_saw_a_run():
    last = T0
    timeline = [(T0 + 10, ("r1",)), (T0 + 300, ("r1",)), (T0 + 310, ()), (T0 + 300 + IDLE, ()),
                (T0 + 300 + IDLE + 1, ())]
    fired = []
    for now, running in timeline:
        v = judge(now, last, Facts(running, None), IDLE)
        last = v.last_active
        fired.append(v.fire)
    assert fired == [False, False, False, True, True]


def test_checks_are_finer_for_short_limits_and_every_30_s_for_long_ones():
    assert watchdog.check_interval(30 * 60) == 30.0
    assert watchdog.check_interval(6) == pytest.approx(0.3)
    assert watchdog.check_interval(1) == 0.2


# ---------------------------------------------------------------- the loop, on a fake clock


class FakeTime:
    """A clock that only moves when the watchdog sleeps."""

    def __init__(self, start: float):
        self.now, self.slept = start, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_watch_writes_its_state_each_check_and_fires_once_when_idle(tmp_path, monkeypatch):
    t = FakeTime(T0)
    runs_until = T0 + 100  # a run is alive for the first 100 s
    monkeypatch.setattr(watchdog, "gather",
                        lambda home: Facts(("r1",) if t.now < runs_until else (), None))
    seen: list[dict] = []
    real_write = watchdog.write_state

    def write(home, state):
        real_write(home, state)
        seen.append(json.loads((home / watchdog.STATE_FILE).read_text()))
    monkeypatch.setattr(watchdog, "write_state", write)
    fired = []
    monkeypatch.setattr(watchdog, "fire", lambda action, home, idle_s: fired.append(t.now))

    final = watchdog.watch(tmp_path, 60.0, "stop", t.clock, t.sleep)

    # the last check that saw the run is the last activity; it fires 60 s after that
    assert runs_until - watchdog.check_interval(60) <= final.last_active < runs_until
    assert fired == [final.fired] and final.fired == final.last_active + 60
    assert any(s["running"] == ["r1"] for s in seen) and seen[-1]["fired"] == final.fired
    assert all(s["fired"] is None for s in seen[:-1])
    assert max(t.slept) <= watchdog.check_interval(60)
    assert os.stat(tmp_path / watchdog.STATE_FILE).st_mode & 0o777 == 0o644


def test_main_refuses_a_limit_that_is_not_positive(capsys):
    with pytest.raises(SystemExit):
        watchdog.main(["--idle-seconds", "0", "--action", "stop"])
    assert "--idle-seconds must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- the facts, from a real home


@pytest.fixture
def relufit_process():
    """A process group whose command line names relufit, as a run's master has; it exits
    with code 7 on SIGINT (as a master records its interrupted trial and ends)."""
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(7)); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, "relufit"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def make_run(home: Path, run: str, pid: int) -> Path:
    rdir = home / watchdog.RUNS_DIR / run
    rdir.mkdir(parents=True)
    (rdir / "master.pid").write_text(f"{pid}\n")
    return rdir


def test_gather_sees_a_live_run_and_not_a_finished_one(tmp_path, relufit_process):
    make_run(tmp_path, "live", relufit_process.pid)
    dead = subprocess.Popen(["true"], start_new_session=True)
    dead.wait()
    make_run(tmp_path, "done", dead.pid)
    facts = watchdog.gather(tmp_path)
    assert facts.running == ("live",) and facts.stamp is None

    os.killpg(relufit_process.pid, signal.SIGKILL)
    relufit_process.wait()  # reaped: no zombie left to count
    assert watchdog.gather(tmp_path).running == ()


def test_gather_ignores_a_live_process_that_is_not_relufit(tmp_path):
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        make_run(tmp_path, "reused-pid", other.pid)
        assert watchdog.gather(tmp_path).running == ()
    finally:
        other.kill()
        other.wait()


def test_stop_runs_interrupts_the_master_of_a_run(tmp_path, relufit_process):
    make_run(tmp_path, "r1", relufit_process.pid)
    watchdog.stop_runs(tmp_path, ("r1",))
    assert relufit_process.wait(timeout=5) == 7


def test_touch_stamps_and_starts_a_stopped_watchdog_again(tmp_path):
    def touch() -> None:
        subprocess.run(["sh", "-c", watchdog.TOUCH_COMMAND], cwd=tmp_path, check=True)

    touch()  # no watchdog was ever armed here (EC2, idle 0): the stamp only
    stamp = tmp_path / watchdog.STAMP_FILE
    assert watchdog.gather(tmp_path).stamp == stamp.stat().st_mtime
    (tmp_path / watchdog.START_FILE).write_text("echo started >> .relufit/starts\n")
    touch()
    touch()
    assert (tmp_path / ".relufit" / "starts").read_text() == "started\n" * 2


def test_touch_leaves_a_running_watchdog_alone(tmp_path, relufit_process):
    (tmp_path / ".relufit").mkdir()
    (tmp_path / watchdog.PID_FILE).write_text(f"{relufit_process.pid}\n")
    (tmp_path / watchdog.START_FILE).write_text("echo started >> .relufit/starts\n")
    subprocess.run(["sh", "-c", watchdog.TOUCH_COMMAND], cwd=tmp_path, check=True)
    assert not (tmp_path / ".relufit" / "starts").exists()


# ---------------------------------------------------------------- what status says


def state(**over) -> dict:
    base = {"version": 1, "idle_s": 1800.0, "action": "poweroff", "interval_s": 30.0,
            "started": T0, "checked": T0 + 100, "running": [], "last_active": T0 + 50,
            "deadline": T0 + 1850, "fired": None, "pid": 42}
    return {**base, **over}


def test_status_of_a_counting_node_is_the_time_to_its_deadline():
    a = autostop.describe(1, state(), T0 + 110)
    assert a.state == "counting" and a.seconds_left == 1740
    assert a.text == "in 29m 00s (idle limit 30 min)"


def test_status_of_active_fired_stalled_and_absent_watchdogs():
    assert autostop.describe(0, state(running=["r1"]), T0 + 110).state == "active"
    fired = autostop.describe(0, state(fired=T0 + 1850), T0 + 2000)
    assert fired.state == "fired" and "stopped at" in fired.text and "poweroff" in fired.text
    stalled = autostop.describe(0, state(), T0 + 100 + 3 * 30 + 11)
    assert stalled.state == "stalled" and stalled.seconds_left is None
    assert autostop.describe(0, None, T0).state == "off"


def test_status_from_ec2_tags_says_only_what_they_can():
    launched = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    early = autostop.from_tags(2, 30.0, launched, launched + timedelta(minutes=5))
    assert early.state == "unknown" and "not before 12:30:00 UTC" in early.text
    late = autostop.from_tags(2, 30.0, launched, launched + timedelta(hours=2))
    assert "any time now" in late.text
    assert autostop.from_tags(2, 0.0, launched, launched).state == "off"
    assert "not reachable" in autostop.from_tags(2, None, launched, launched).text


# ---------------------------------------------------------------- --idle-minutes


def test_idle_minutes_defaults_to_30_and_0_turns_it_off():
    assert check_idle_minutes(None, "netns") == 30.0
    assert check_idle_minutes(0, "ec2") == 0.0
    assert check_idle_minutes(0.1, "netns") == 0.1  # fractions: tests on emulated hosts


@pytest.mark.parametrize("value, provider, why", [
    (-1, "netns", "between 0"), (2, "ec2", "at least 5 on EC2"), (1e6, "hosts", "between 0"),
    (float("nan"), "hosts", "between 0")])
def test_idle_minutes_out_of_range_is_refused(value, provider, why):
    with pytest.raises(ConfigError, match=why) as e:
        check_idle_minutes(value, provider)
    assert e.value.key == "--idle-minutes"


def test_cluster_up_refuses_a_bad_limit_before_making_anything(relufit_home, monkeypatch):
    from orchestrator.providers import netns

    monkeypatch.setattr(netns, "up", lambda *a, **k: pytest.fail("netns.up was called"))
    r = CliRunner().invoke(cli, ["cluster", "up", "--provider", "netns", "--name", "x",
                                 "--idle-minutes", "-2"])
    assert r.exit_code == 2 and "--idle-minutes: -2" in r.output
    assert not (relufit_home / "clusters").exists()
