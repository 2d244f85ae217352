import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.data.imagenet import verify
from pipeline.data.synthetic import write_synthetic_imagenet

CLUSTER = Path(__file__).parent / "slurm" / "cluster.sh"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """The mini config's generated 10-class JPEG tree (640 train, 160 val images), verified."""
    root = write_synthetic_imagenet(tmp_path_factory.mktemp("mini") / "data", 10, 64, 16, 40, 96)
    verify(root)
    return root


@pytest.fixture(scope="session")
def slurm():
    """The test cluster, started if it is not running; SLURM_CONF points the clients at it."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        if os.environ.get("CI"):
            pytest.fail("SLURM is not installed: .ci/run installs it with tests/slurm/cluster.sh install")
        pytest.skip("needs SLURM: run tests/slurm/cluster.sh install (as root)")
    out = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    conf = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
