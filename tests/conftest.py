import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MOR_THREADS=1 when another job shares the two cores (torch's 2 threads then spin, docs/method.md, implementation notes)
torch.set_num_threads(int(os.environ.get("MOR_THREADS") or max(1, min(2, os.cpu_count() or 1))))

import data  # noqa: E402
import models  # noqa: E402


@pytest.fixture(scope="session")
def fed():
    return data.build_federation(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint directory per model family, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: models.build_tiny(f, root / f, seed=0) for f in models.FAMILIES}
