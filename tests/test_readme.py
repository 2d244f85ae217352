"""The README's runnable blocks (``<!-- runnable -->`` before a bash fence) run in order, on a CPU,
in a scratch copy of the project, as a new user would type them with ``.venv`` active."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- runnable(?::\s*(?P<needs>\w+))?\s*-->\n```bash\n(?P<body>.*?)^```", re.M | re.S)
pytestmark = pytest.mark.slow


def runnable_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, what the block needs beyond the project, its commands) for each runnable block."""
    return [(text[:m.start()].count("\n") + 1, m.group("needs") or "", m.group("body")) for m in BLOCK.finditer(text)]


BLOCKS = runnable_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_runnable_blocks_for_each_part_of_the_guide():
    commands = "\n".join(body for _, _, body in BLOCKS)
    for command in ("pipeline.train", "pipeline.data.imagenet verify", "launch.local", "launch.slurm",
                    "launch.slurm status", "--sweep", "pipeline.evaluate", "pipeline.bench", "pipeline.insights"):
        assert command in commands, command


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project's files (tracked or not ignored), with the running environment as .venv."""
    copy = tmp_path_factory.mktemp("readme") / "densenet-pipeline"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(sys.prefix)  # the environment running these tests
    return copy


@pytest.mark.parametrize("line, needs, body", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_runnable_block(project, line, needs, body, request):
    env = {**os.environ, "PATH": f"{project / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(project / ".venv"), "USER": os.environ.get("USER", "densenet")}
    if needs == "slurm":
        env["SLURM_CONF"] = request.getfixturevalue("slurm")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=project, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"README.md:{line}\n{body}\n--- stdout\n{result.stdout[-3000:]}\n" \
                                   f"--- stderr\n{result.stderr[-3000:]}"
