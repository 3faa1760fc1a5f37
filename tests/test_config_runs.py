"""Running the bundle's configs quietly (scripts.integration.config_runs): the noisy handlers off and one progress
bar on, notices silenced only inside the block, one line per epoch when the output is not a terminal."""

import logging
import warnings

from ignite.engine import Engine
from scripts.integration.config_runs import StageProgress, quiet_handlers, quiet_log


def test_quiet_handlers_replace_per_iteration_output():
    config = {
        "train": {
            "handlers": [
                {"_target_": "LrScheduleHandler"},
                {"_target_": "StatsHandler", "tag_name": "train_loss"},
                {"_target_": "ignite.handlers.ProgressBar", "persist": True},
            ]
        },
        "validate": {
            "handlers": [{"_target_": "StatsHandler", "iteration_log": False}, {"_target_": "CheckpointSaver"}]
        },
    }
    lists = quiet_handlers(config, "train x")
    train, validate = lists["train#handlers"], lists["validate#handlers"]
    assert [h.get("_disabled_") for h in train] == [None, True, True, None]
    assert train[-1] == {
        "_target_": "scripts.integration.config_runs.StageProgress",
        "desc": "train x",
        "validator": "@validate#evaluator",
    }
    assert [h.get("_disabled_") for h in validate] == [True, None]
    assert config["train"]["handlers"][1] == {"_target_": "StatsHandler", "tag_name": "train_loss"}  # not mutated
    inference = quiet_handlers({"handlers": [{"_target_": "PredictionWriter"}]}, "segment")
    assert inference["handlers"][-1] == {"_target_": "scripts.integration.config_runs.StageProgress", "desc": "segment"}
    assert quiet_handlers({"run": []}, "evaluate") == {}


def test_quiet_log_silences_only_inside():
    logger = logging.getLogger("monai.bundle.workflows")
    before = logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_log():
            assert logger.level == logging.WARNING
            warnings.warn("parsing config_file configs/train.json: any ...")
            warnings.warn("pkg_resources is deprecated as an API.")
            warnings.warn("a warning that concerns the user")
        warnings.warn("parsing config_file again, outside")
    assert [str(w.message) for w in caught] == [
        "a warning that concerns the user",
        "parsing config_file again, outside",
    ]
    assert logger.level == before


def test_stage_progress_prints_one_line_per_epoch(capsys):
    engine = Engine(lambda engine, batch: [{"loss": 0.5}])
    StageProgress("train toy").attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train toy: epoch 1/2") and lines[1].startswith("train toy: epoch 2/2")
    assert lines[2].startswith("train toy: 6 iterations in") and len(lines) == 3
