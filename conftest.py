"""Test set-up shared by tests/ and experiments/: one torch thread, the real scans' location. ``scripts`` is importable
through setup.cfg's ``pythonpath = bundle``."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent
BUNDLE = REPO / "bundle"
LIDC_ROOT = Path(os.environ.get("LIDC_ROOT", REPO.parent / "shared" / "data" / "lidc")).resolve()
CHEST_CT_ROOT = Path(os.environ.get("CHEST_CT_ROOT", REPO.parent / "shared" / "data" / "chest_ct")).resolve()

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE


LIDC_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
CHEST_CT_SCANS = ("Lung_Dx-A0001", "Lung_Dx-A0002", "CPTAC-C3N-00247")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lidc: needs the two real LIDC-IDRI scans (LIDC_ROOT); set automatically")
    config.addinivalue_line("markers", "chest_ct: needs the three real chest CTs (CHEST_CT_ROOT); set automatically")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # every test that reads the real scans is marked, so `-m lidc` runs them alone (and `-m "not lidc"` the rest)
    for item in items:
        if "lidc_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lidc)
        if "chest_ct_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chest_ct)


def missing_real_data(reason: str) -> None:
    """Skip the test for want of real data, or fail it in CI (``CI=true``), which must have the data."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires them", pytrace=False)
    pytest.skip(reason)


def find_lidc_root(root: Path) -> Path:
    """``root`` when it holds the two real LIDC-IDRI scans; else skip, or fail in CI (``CI=true``), which needs them."""
    missing = [p for p in LIDC_PATIENTS if not (root / p).is_dir()]
    if missing:
        missing_real_data(
            f"the real LIDC-IDRI scans {', '.join(missing)} are not in {root}: put the two scans there "
            "(README, 'Tests') or point LIDC_ROOT at them"
        )
    return root


@pytest.fixture(scope="session")
def lidc_root() -> Path:
    """The folder of the two real LIDC-IDRI scans (``LIDC_ROOT``, default ``../shared/data/lidc`` beside the repo)."""
    return find_lidc_root(LIDC_ROOT)


@pytest.fixture(scope="session")
def chest_ct_root() -> Path:
    """The folder of the three real chest CTs (``CHEST_CT_ROOT``, default ``../shared/data/chest_ct`` beside the
    repo); skips when they are missing, or fails in CI (``CI=true``), which needs them."""
    missing = [s for s in CHEST_CT_SCANS if not (CHEST_CT_ROOT / s / "ct").is_dir()]
    if missing:
        missing_real_data(
            f"the real chest CTs {', '.join(missing)} are not in {CHEST_CT_ROOT}: put them there "
            "(bundle/docs/real_ct.md) or point CHEST_CT_ROOT at them"
        )
    return CHEST_CT_ROOT


@pytest.fixture(scope="module")
def isolated_home(tmp_path_factory):
    """``HOME`` in a temporary folder for a module: pylidc may write a template ``~/.pylidcrc``, kept out of the real
    home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        yield
