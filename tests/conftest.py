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
    # DELTATUNE_GPU_TESTS_ON_CPU=1 runs them anyway, with their DEVICE falling back to "cpu": a dry run
    # of the test logic (imports, API use, shapes, the CPU-side tolerances), so a scarce GPU session
    # is not spent on a typo. Such a run compares CPU with CPU and proves nothing about CUDA.
    if not torch.cuda.is_available() and os.environ.get("DELTATUNE_GPU_TESTS_ON_CPU") != "1":
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none present")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# The versions a run tested: the lock's (make test) or the newest allowed (make test-latest).
REPORTED_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "peft", "bitsandbytes", "trl")


def pytest_terminal_summary(terminalreporter):
    # printed at the end even under -q, so a CI log says which versions were tested
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    terminalreporter.write_line("versions: " + ", ".join(f"{name} {v(name)}" for name in REPORTED_PACKAGES))
