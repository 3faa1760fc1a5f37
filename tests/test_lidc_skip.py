"""Without the real LIDC-IDRI scans the tests that need them skip, saying why, unless CI=true requires them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LIDC_PATIENTS, find_lidc_root

REPO = Path(__file__).resolve().parents[1]
# the modules with tests that read the real scans (conftest marks each of those tests `lidc`)
LIDC_MODULES = [
    "tests/test_lidc.py",
    "tests/test_lidc_stats.py",
    "tests/test_monailabel.py",
    "tests/test_scan.py",
    "tests/test_scan_cli.py",
    "tests/test_weak_labels.py",
]


def test_lidc_tests_only_skip_without_the_scans(tmp_path):
    """The LIDC tests in a fresh pytest, LIDC_ROOT an empty folder and CI unset: every one skips, with the reason."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["LIDC_ROOT"] = str(tmp_path)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "lidc", *LIDC_MODULES]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout[-4000:]
    assert result.returncode == 0, output
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", result.stdout.strip().splitlines()[-1])}
    # 11 tests in test_lidc.py, 2 in test_lidc_stats.py, 1 in test_monailabel.py and the whole-scan ones read the scans
    assert set(counts) <= {"skipped", "deselected", "warnings"} and counts["skipped"] >= 30, output
    reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(f"are not in {tmp_path}: put the two scans there" in line for line in reasons), output


def test_missing_scans_fail_in_ci(tmp_path, monkeypatch):
    (tmp_path / LIDC_PATIENTS[0]).mkdir()  # one of the two is not enough
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{LIDC_PATIENTS[1]} are not in {tmp_path}"):
        find_lidc_root(tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires them"):
        find_lidc_root(tmp_path)
    (tmp_path / LIDC_PATIENTS[1]).mkdir()
    assert find_lidc_root(tmp_path) == tmp_path
