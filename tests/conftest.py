import os
from pathlib import Path

import pytest
import torch

# Tests are small; more threads than cores only adds contention on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs set train.threads (torch's process-wide thread count); give every test the suite's own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shakespeare_path() -> Path:
    """tiny Shakespeare from ../shared beside the repo; tests using it skip when it is absent."""
    p = SHARED / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
