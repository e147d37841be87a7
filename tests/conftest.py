import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parent.parent / "conf")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny tensors: threads only add synchronisation cost (and stall on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """Compose the real Hydra configs with overrides; outputs go to a temporary directory. Fine-tunes one after
    another (finetune.workers=1: pytest-xdist already runs a test per core; tests/test_finetune_workers.py runs
    workers), unless an override says otherwise."""

    def _make(*overrides: str):
        workers = [] if any(o.startswith("finetune.workers=") for o in overrides) else ["finetune.workers=1"]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("config", overrides=[f"paths.root={tmp_path}", f"paths.data={data_dir}", *workers,
                                                *overrides])

    return _make
