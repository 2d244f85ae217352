"""Installs this project into a base image that already ships PyTorch, torchvision and DALI.

Run from the project root inside the image build (``python docker/install.py``). The dependency set
is ``pyproject.toml``'s, read here: what the base image already has must meet its requirement and is
kept at its installed version, as is every other package of the base, so pip never replaces the
base's CUDA builds; the rest is installed; then the project itself (``--no-deps``), and every
dependency is imported once to prove the image whole.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# a dependency whose distribution name differs between PyPI and the base image, by the module it provides
IMPORTS = {"nvidia-dali-cuda130": "nvidia.dali", "nvidia-dali-cuda120": "nvidia.dali", "pillow": "PIL",
           "nvidia-ml-py": "pynvml"}


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (``"omegaconf>=2.3"`` -> ``omegaconf``)."""
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def dependencies(pyproject: Path) -> list[str]:
    """``[project].dependencies`` of a pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dev dependency)
        import tomli as tomllib
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


class BaseImageError(RuntimeError):
    """The base image ships a dependency older than pyproject.toml allows."""


def satisfies(requirement: str, version: str) -> bool:
    """Whether ``version`` (pre-releases such as NGC's ``2.10.0a0+...`` included) meets ``requirement``."""
    from packaging.requirements import Requirement

    return Requirement(requirement).specifier.contains(version, prereleases=True)


def plan(requirements: list[str], installed: dict[str, str], importable: set[str]) -> tuple[list[str], list[str]]:
    """(pins of what the base has, requirements to install): together exactly ``requirements``' names.

    ``installed`` maps distribution names to versions; a requirement whose distribution is absent but
    whose module (``IMPORTS``) is importable counts as provided under another name and is left alone.
    A base version that does not meet its requirement is an error: replacing the base's CUDA builds
    from PyPI would break the image, so a newer base is the fix.
    """
    pins, install = [], []
    for requirement in requirements:
        name = requirement_name(requirement)
        if name in installed:
            if not satisfies(requirement, installed[name]):
                raise BaseImageError(f"The base image ships {name} {installed[name]}, but pyproject.toml asks for "
                                     f"'{requirement}': build on a newer base image (docker/README.md).")
            pins.append(f"{name}=={installed[name]}")
        elif IMPORTS.get(name) not in importable:
            install.append(requirement)
    return pins, install


def _installed() -> dict[str, str]:
    return {requirement_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def _importable(modules: set[str]) -> set[str]:
    found = set()
    for module in modules:
        if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0:
            found.add(module)
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    requirements = dependencies(root / "pyproject.toml")
    installed = _installed()
    try:
        pins, install = plan(requirements, installed, _importable(set(IMPORTS.values())))
    except BaseImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("provided by the base image:", " ".join(pins) or "nothing")
    print("installing:", " ".join(install) or "nothing")
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        # every package of the base stays as it is, not only our dependencies: what mlflow pulls in
        # (numpy, pandas, protobuf, ...) must not replace the base's builds either
        constraints.write("\n".join(f"{name}=={version}" for name, version in sorted(installed.items())) + "\n")
        constraints.flush()
        if install:
            subprocess.run([*pip, "--constraint", constraints.name, *install], check=True)
    subprocess.run([*pip, "--no-deps", str(root)], check=True)
    modules = [IMPORTS.get(requirement_name(r), requirement_name(r).replace("-", "_")) for r in requirements]
    subprocess.run([sys.executable, "-c", f"import {', '.join(sorted(set(modules)))}, pipeline.train, launch.slurm"],
                   check=True, cwd=tempfile.gettempdir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
