"""experiments/quickstart_rules.py re-segments the six weakly supervised rows of a full quick start with its models:
under the quick start's own rule it gives the run's own rows (the 2-/3-GAP ones only with the right multi-GAP model)."""

import pytest
import quickstart_rules
from scripts.quickstart import WEAK_ROWS, quickstart

TINY = {"cases": 8, "size": 96, "width": 0.0625, "epochs": 1, "batch_size": 8, "max_panels": 1}
TINY_UNET = {"unet_features": (4, 4, 8, 8, 16, 4), "unet_batch_size": 8}


def test_the_quick_starts_own_rule_gives_the_runs_own_rows(tmp_path):
    out = tmp_path / "full"
    methods = quickstart(out=str(out), full=True, **TINY, **TINY_UNET)["metrics"]["methods"]
    variant = "quick start (defaults, fixed cut)"
    rules = quickstart_rules.main([str(out), "--variants", variant, "--out", str(tmp_path / "rules.json")])
    assert list(rules["rows"]) == [f"{variant} {name}" for name in WEAK_ROWS]
    for name in WEAK_ROWS:
        expected = {c: quickstart_rules._value(methods[name], key) for c, key in quickstart_rules.COLUMNS.items()}
        assert rules["rows"][f"{variant} {name}"] == pytest.approx(expected), name
