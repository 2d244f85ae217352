"""Every command of pipeline/ and launch/ answers a person's mistake with one message that names the thing and a
non-zero exit status, never a traceback. The commands are found, not listed: every module with a ``__main__``
guard, each subcommand of ``pipeline.bench``, and the console scripts of pyproject.toml; a command without a case
below fails the first test."""

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pipeline import bench
from pipeline.data.imagenet import verify

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
MINI = str(REPO / "configs" / "mini.yaml")
FAST_BENCH = ("pipeline.bench loader", "pipeline.bench train")  # the two crashes of issue 29


def entry_points() -> dict[str, list[str]]:
    """Each command's name and how to start it (the words after ``python``)."""
    found = {}
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "launch").rglob("*.py")]):
        if re.search(r'^if __name__ == "__main__":', path.read_text(), re.MULTILINE):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[module] = ["-m", module]
    del found["pipeline.bench"]
    subparsers = next(a for a in bench.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in subparsers.choices:
        found[f"pipeline.bench {name}"] = ["-m", "pipeline.bench", name]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script, target in scripts.items():
        module, function = target.split(":")
        found[script] = ["-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    return found


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEG trees without an index and verified, a recipe with an unknown key, a run's config and weights, junk."""
    tmp = tmp_path_factory.mktemp("mistakes")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp / "tree" / split / cls).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp / "tree" / split / cls / "0.JPEG")
    shutil.copytree(tmp / "tree", tmp / "verified")
    verify(tmp / "verified", decoder="pillow", workers=1)
    (tmp / "bad.yaml").write_text("train:\n  nope: 1\n")
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("{}\n")
    (tmp / "run" / "model_final.pt").write_bytes(b"")
    (tmp / "junk.pt").write_bytes(b"not a torch file")
    return tmp


def cases(t: Path) -> dict[str, list[tuple[list[str], list[str], dict]]]:
    """Per command: (its words, what stderr must name, extra environment); the first case is the fast one."""
    swapped = [str(t / "run" / "model_final.pt"), str(t / "run" / "config.yaml")]
    return {
        "pipeline.train": [([MINI, "train.nope=1"], ["train.nope"], {}),
                           ([str(t / "missing.yaml")], ["missing.yaml"], {})],
        "densenet-train": [([str(t / "bad.yaml")], ["train.nope", "bad.yaml"], {})],
        "pipeline.evaluate": [(swapped, ["swapped", "config.yaml", "CONFIG WEIGHTS"], {}),
                              ([MINI, str(t / "junk.pt")], ["junk.pt"], {}),
                              ([MINI, str(t / "junk.pt"), "model.nope=1"], ["model.nope"], {})],
        "pipeline.insights": [([str(t / "run" / "model_final.pt")], ["model_final.pt", "empty"], {}),
                              ([str(t / "missing.pt")], ["missing.pt", "does not exist"], {}),
                              (swapped[::-1], ["swapped", "WEIGHTS [CONFIG]"], {}),
                              ([str(t / "junk.pt")], ["junk.pt"], {})],
        "pipeline.perf": [(["nokind", "{}"], ["nokind"], {}), (["loader", "[1]"], ["spec"], {})],
        "pipeline.bench model": [(["--model", "nonsense"], ["nonsense"], {})],
        "pipeline.bench loader": [(["--root", str(t / "tree")], ["no dataset index", "verify", str(t / "tree")], {}),
                                  (["--root", str(t / "nowhere")], ["nowhere", "train/"], {}),
                                  (["--root", str(t / "verified"), "--batch", "8"], ["2 train images", "--batch"],
                                   {})],
        "pipeline.bench feed": [(["--images", "4", "--batch", "8"], ["--images", "--batch"], {})],
        "pipeline.bench index": [(["--samples", "0"], ["--samples", "at least 1"], {})],
        "pipeline.bench train": [(["--steps", "10", "--epochs", "1"], ["--steps 10", "--epochs 1", "at least 20"], {}),
                                 (["--window", "0"], ["--window", "at least 1"], {})],
        "pipeline.bench checkpoint": [(["--dir", str(t / "nowhere")], ["--dir", "nowhere"], {})],
        "pipeline.bench boundary": [(["--world-size", "0"], ["--world-size"], {})],
        "pipeline.bench tracking": [(["--json", str(t / "nowhere" / "x.json")], ["--json", "nowhere"], {}),
                                    (["--epochs", "0"], ["--epochs"], {})],
        "pipeline.data.imagenet": [(["pack", str(t / "tree"), "--out", str(t / "packed")], ["no dataset index",
                                                                                           "verify"], {}),
                                   (["verify", str(t / "nowhere")], ["nowhere", "does not exist"], {}),
                                   (["prepare", "--train-tar", str(t / "train.tar"), "--val-tar", "v", "--devkit",
                                     "d", "--out", str(t / "out")], ["train.tar"], {})],
        "launch.local": [([str(t / "bad.yaml")], ["train.nope"], {})],
        "launch.slurm": [([MINI, "slurm.time_min=abc", "--dry-run"], ["slurm.time_min"], {}),
                         (["status", str(t / "nowhere")], ["nowhere"], {})],
        "launch.requeue": [([str(t / "nowhere"), "1"], ["runs.json", "nowhere"], {"SLURM_JOB_ID": "7"}),
                           ([str(t / "nowhere"), "1"], ["SLURM_JOB_ID"], {})],
    }


def problem(start: list[str], words: list[str], names: list[str], env: dict) -> str | None:
    """What is wrong with the command's answer to the mistake, or None."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, *start, *words], cwd=REPO, env={**clean, **env}, capture_output=True,
                            text=True, timeout=300)
    missing = [n for n in [*names, "error:"] if n not in result.stderr]  # each refusal is an "error:" line
    if result.returncode != 0 and "Traceback" not in result.stderr and not missing:
        return None
    return (f"{' '.join(start[-2:] if start[0] == '-m' else start[:1])} {' '.join(words)}: exit "
            f"{result.returncode}, missing {missing} in stderr:\n{result.stderr[-2000:]}")


def run_all(todo: list) -> list[str]:
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return [p for p in pool.map(lambda case: problem(*case), todo) if p]


def split_cases(t: Path) -> tuple[list, list]:
    """(fast, slow): the fast part is one mistake per module (torch's import costs seconds a process); bench's
    other subcommands and the other mistakes are slow."""
    starts, fast, slow = entry_points(), [], []
    for name, tried in cases(t).items():
        first = name.count(" ") == 0 or name in FAST_BENCH
        fast += [(starts[name], *tried[0])] if first else []
        slow += [(starts[name], *case) for case in (tried[1:] if first else tried)]
    return fast, slow


def test_every_command_has_a_case():
    found, tried = set(entry_points()), set(cases(Path("/x")))
    assert not found - tried, f"commands without a bad-input case in cases(): {sorted(found - tried)}"
    assert not tried - found, f"cases for commands that are gone: {sorted(tried - found)}"


@pytest.mark.slow  # 11 processes that import torch: 45 s on 2 cores
def test_each_command_refuses_a_mistake_in_one_line(files):
    problems = run_all(split_cases(files)[0])
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
def test_each_command_refuses_every_mistake_tried_in_one_line(files):
    problems = run_all(split_cases(files)[1])
    assert not problems, "\n\n".join(problems)
