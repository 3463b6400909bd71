"""Test-wide setup: Triton runs in its interpreter when there is no GPU."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the sweeper's pure-Python tests need no torch
    _HAS_CUDA = False

if not _HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


from tests.slurm import slurm_cluster  # noqa: E402,F401 - a real one-node SLURM cluster, for any test
