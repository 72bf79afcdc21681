import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest

from tests.toy import LAUNCH_ENVIRONMENT

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _fresh_launch_environment(monkeypatch):
    """Lightning's launchers export MASTER_PORT, LOCAL_RANK, … into the parent; each test starts without them."""
    for key in LAUNCH_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
