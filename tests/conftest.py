import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped, never counted as passing, when no CUDA device is present.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none present")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
