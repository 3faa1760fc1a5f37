"""Shared test set-up: the bundle's scripts on the path, one torch thread, the real scans' location."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
LIDC_ROOT = Path(os.environ.get("LIDC_ROOT", REPO.parent / "shared" / "data" / "lidc")).resolve()

sys.path.insert(0, str(BUNDLE))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE


@pytest.fixture(scope="session")
def lidc_root() -> Path:
    if not (LIDC_ROOT / "LIDC-IDRI-0001").is_dir():
        pytest.fail(f"the real LIDC-IDRI scans are missing: {LIDC_ROOT}")
    return LIDC_ROOT
