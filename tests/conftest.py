import os

import pytest

# Tests never talk to wandb's servers; the one test that checks offline logging asks for it explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def chardata():
    """The real dataset on the CPU, loaded once (DYNDROP_DATA_DIR, the cache, or a download)."""
    from gpt import CharData
    return CharData.load()
