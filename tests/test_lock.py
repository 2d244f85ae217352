"""The run dir's lock between real processes: who holds it, when a requeued attempt waits, what the launcher says."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lock import RunDirLock, RunDirLocked

ROOT = Path(__file__).resolve().parents[1]


def hold(run_dir: Path, seconds: float, **env) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock for ``seconds``, with these SLURM variables."""
    code = ("import sys, time; from pipeline.lock import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | env
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=environ)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_the_holder_is_named_with_its_slurm_job_and_another_run_of_the_same_job_is_refused_at_once(
        tmp_path, monkeypatch):
    holder = hold(tmp_path, 30, SLURM_JOB_ID="41", SLURM_RESTART_COUNT="0")
    try:
        # a second run inside the same allocation (not a later attempt of the job): no grace
        monkeypatch.setenv("SLURM_JOB_ID", "41")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        began = time.monotonic()
        with pytest.raises(RunDirLocked, match=rf"in use by another run \(pid {holder.pid} on \S+, SLURM job 41, "):
            RunDirLock(tmp_path).acquire(grace_s=20)
        assert time.monotonic() - began < 2
    finally:
        holder.kill()
        holder.wait()


def test_a_requeued_attempt_waits_for_its_earlier_attempt_to_let_go(tmp_path, monkeypatch):
    holder = hold(tmp_path, 3, SLURM_JOB_ID="41", SLURM_RESTART_COUNT="0")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    began = time.monotonic()
    lock = RunDirLock(tmp_path).acquire(grace_s=30)
    waited = time.monotonic() - began
    lock.release()
    holder.wait()
    assert 1 < waited < 20


def test_the_launcher_refuses_a_run_dir_that_a_run_holds(tmp_path):
    from launch.slurm import LaunchError, check_run_dirs_free
    from pipeline.config import load_config

    holder = hold(tmp_path, 30)
    try:
        cfg = load_config(ROOT / "configs/mini.yaml", [f"run.dir={tmp_path}"])
        with pytest.raises(LaunchError, match=rf"run.dir='{tmp_path}' is in use by another run \(pid {holder.pid}"):
            check_run_dirs_free([cfg])
    finally:
        holder.kill()
        holder.wait()


def test_a_requeued_attempt_takes_over_the_lock_its_lost_earlier_attempt_still_holds(tmp_path, monkeypatch, caplog):
    import json
    import signal

    holder = hold(tmp_path, 120, SLURM_JOB_ID="41", SLURM_RESTART_COUNT="0")
    holder.send_signal(signal.SIGSTOP)  # as a lost node: its lock stays, nothing of it runs
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "41")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        began = time.monotonic()
        lock = RunDirLock(tmp_path).acquire(grace_s=3)
        assert 3 <= time.monotonic() - began < 10  # the grace first, then the takeover
        # read by another process: closing a file of the lock in this one would release it (POSIX locks)
        written = json.loads(subprocess.run(["cat", str(tmp_path / "run.lock")], capture_output=True,
                                            check=True).stdout)
        assert (written["pid"], written["slurm_restart"]) == (os.getpid(), 1)
        assert written["took_over"].startswith(f"pid {holder.pid} on ")
        assert f"Took over {tmp_path / 'run.lock'} from the earlier attempt of this job that held it (pid " \
               f"{holder.pid} on " in caplog.text and ", attempt 1): it was not released within 3s" in caplog.text
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
        # the run dir is ours now: another run of any job is refused at once, naming this holder
        monkeypatch.setenv("SLURM_JOB_ID", "42")
        other = subprocess.run([sys.executable, "-c", "import sys; from pipeline.lock import RunDirLock; "
                                "RunDirLock(sys.argv[1]).acquire(grace_s=30)", str(tmp_path)],
                               capture_output=True, text=True, cwd=ROOT, timeout=20)
        assert re.search(rf"RunDirLocked: .* in use by another run \(pid {os.getpid()} on \S+, SLURM job 41,",
                         other.stderr), other.stderr
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_an_earlier_attempt_that_comes_back_after_the_takeover_learns_that_it_lost_the_run_dir(tmp_path,
                                                                                                monkeypatch):
    code = ("import json, sys; from pipeline.lock import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.readline(); print(json.dumps(lock.taken_over()), flush=True)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    earlier = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**environ, "SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "0"})
    try:
        assert earlier.stdout.readline() == "held\n"
        monkeypatch.setenv("SLURM_JOB_ID", "41")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        lock = RunDirLock(tmp_path).acquire(grace_s=1)  # the earlier attempt still runs: a node thought lost
        assert lock.taken_over() is None  # ours
        earlier.stdin.write("\n")
        earlier.stdin.flush()
        import json

        seen = json.loads(earlier.stdout.readline())
        assert (seen["pid"], seen["slurm_restart"]) == (os.getpid(), 1)  # it sees who runs there now
        lock.release()
    finally:
        earlier.kill()
        earlier.wait()
