"""What a new user sees while ``make smoke`` sets up ``.venv`` on a fresh machine."""

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_says_what_it_installs_at_once_and_names_the_cpu_build(tmp_path):
    """The first lines come before any download (a laptop may then wait minutes for ~7 GB): they name the
    build, the size and the CPU-only choice; pip then runs without --quiet, so its progress shows."""
    venv = tmp_path / "venv"
    make = subprocess.Popen(["make", "--no-print-directory", "venv", f"VENV={venv}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines, started = [], time.monotonic()
    try:
        while len(lines) < 3:
            lines.append(make.stdout.readline())
        waited = time.monotonic() - started
    finally:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait()
    first = "".join(lines)
    assert waited < 10, f"make printed its first lines after {waited:.1f} s"
    assert "torch==" in first and "GB" in first, first
    assert "make TORCH=" in first and "/whl/cpu" in first, first
    recipe = subprocess.run(["make", "-n", "venv", f"VENV={venv}"], cwd=ROOT, text=True, capture_output=True,
                            check=True).stdout
    installs = [line for line in recipe.splitlines() if " install " in line]
    assert len(installs) == 2 and not any("--quiet" in line or " -q" in line for line in installs), recipe
