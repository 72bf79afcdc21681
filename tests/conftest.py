import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _fresh_launch_environment(monkeypatch):
    """Lightning's launchers export MASTER_PORT, LOCAL_RANK, … into the parent; each test starts without them."""
    for key in (
        "MASTER_PORT",
        "MASTER_ADDR",
        "NODE_RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "RANK",
        "OMP_NUM_THREADS",
    ):
        monkeypatch.delenv(key, raising=False)
