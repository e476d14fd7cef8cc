import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny models gain nothing from intra-op threads, and two threads on a busy 2-core machine spin badly
# (measured ~35x slower per forward). End-to-end tests on the real model raise this themselves.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped, never counted as passing, when no CUDA device is present.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none present")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
