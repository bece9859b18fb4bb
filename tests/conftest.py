import os

import pytest

# Tests never talk to wandb's servers; the one test that checks offline logging asks for it explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def chardata():
    """The real dataset on the CPU, loaded once per session (DYNDROP_DATA_DIR, the cache, or a download) and
    shared with every trainer and env the tests build (``gpt.shared_data``)."""
    from gpt import shared_data
    return shared_data()


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """The RL env sets one torch thread per process; give each test module back the setting it found."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
