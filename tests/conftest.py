import os

import pytest
import torch

os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped cleanly without one")
    config.addinivalue_line("markers", "slow: a multi-second end-to-end test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
