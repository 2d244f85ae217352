import pytest
import torch

from pipeline.data.imagenet import verify
from pipeline.data.synthetic import write_synthetic_imagenet


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
