"""A module-wide fixture for tests of small tensors on a loaded 2-core machine, where a
second intra-op thread only adds waiting: import it into a test module to apply it there."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
