import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from mmtoken.testing import tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def llava():
    return tiny_llava()


@pytest.fixture(scope="session")
def llava_next():
    return tiny_llava(next=True, seed=1)
