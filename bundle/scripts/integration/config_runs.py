"""Running this bundle's configs from Python as ``python -m monai.bundle run`` does, for the quick start and the
studies in experiments/: with the bundle's logging config, one progress bar for a whole engine run instead of a line
per iteration, and the notices that do not concern a user of this bundle silenced."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, run
from tqdm import tqdm

__all__ = [
    "BUNDLE_ROOT",
    "CONFIGS",
    "SLICE_INFERENCE",
    "CLASSIFY",
    "StageProgress",
    "quiet_log",
    "quiet_handlers",
    "config_files",
    "run_config",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"
# The configs that run on prepared slices: overlays of configs/inference.json, which holds what they share (the model's
# settings, the networks, the segmenter), merged as ``--config_file "['configs/inference.json', ...]"`` does.
SLICE_INFERENCE = ("inference.json", "inference_slices.json")
CLASSIFY = ("inference.json", "classify.json")

# Warnings that do not concern a user of this bundle, silenced while it runs (messages matched at their start):
# MONAI's notice that a config is evaluated (only this bundle's own configs are run), pylidc's import of
# the deprecated pkg_resources (a dependency's affair; setuptools is pinned below 82 for it), and the DICOM GPU codec
# MONAI looks for when it builds its image readers (the bundle reads NIfTI slices).
QUIET_WARNINGS = (
    "parsing config_file",
    "pkg_resources is deprecated",
    "NvImgCodecPydicomReader",
)
# Loggers whose INFO lines repeat on every config and every epoch (the inputs MONAI echoes, the engines' start, epoch
# and checkpoint lines): WARNING and above still come through. The stage's progress bar says what they said.
# MONAI's get_logger sets INFO on each module's logger, so they are named one by one. The GPU DICOM codec's notice
# (the bundle reads NIfTI) is a WARNING that does not concern the user: ERROR for that one.
QUIET_LOGGERS = {
    "monai.bundle.scripts": logging.WARNING,
    "monai.bundle.workflows": logging.WARNING,
    "ignite.engine.engine": logging.WARNING,
    "monai.data.nvimgcodec_pydicom_plugin": logging.ERROR,
}
# Handlers of the configs that write a line per iteration or a bar per epoch; StageProgress replaces them.
_NOISY_HANDLERS = ("StatsHandler", "ignite.handlers.ProgressBar", "ProgressBar")


class StageProgress:
    """One progress bar for a whole engine run (every epoch), instead of a bar per epoch and a line per iteration.

    On a terminal the bar shows the last loss and the validator's metrics; when the output is not a terminal (a log
    file, CI) there is no bar, one line per epoch of a multi-epoch run, and one line at the end.

    Args:
        desc: the stage's name, printed before the bar.
        validator: the engine run at the end of each epoch (``ValidationHandler``), whose metrics are shown.
    """

    def __init__(self, desc: str, validator: Engine | None = None) -> None:
        self.desc, self.validator = desc, validator
        self.bar: tqdm | None = None
        self.start = 0.0

    def attach(self, engine: Engine) -> None:
        """Register the bar's events on ``engine``."""
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _metrics(self, engine: Engine) -> dict[str, float]:
        metrics = {}
        for source in (engine, self.validator):
            if source is not None:
                metrics.update({k: v for k, v in source.state.metrics.items() if isinstance(v, (int, float))})
        return metrics

    @staticmethod
    def _format(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())

    def _started(self, engine: Engine) -> None:
        self.start = time.perf_counter()
        total = engine.state.max_epochs * (engine.state.epoch_length or 0)
        self.bar = tqdm(
            total=total or None,
            initial=engine.state.iteration,
            desc=self.desc,
            unit="it",
            disable=not sys.stderr.isatty(),  # \r updates in a log file are noise: the epoch lines say it there
            dynamic_ncols=True,
            leave=True,
        )

    def _iteration(self, engine: Engine) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        output = engine.state.output
        if isinstance(output, list) and output and isinstance(output[0], dict) and "loss" in output[0]:
            self.bar.set_postfix_str(f"loss {float(output[0]['loss']):.4f}", refresh=False)

    def _epoch(self, engine: Engine) -> None:
        if engine.state.max_epochs <= 1:
            return
        text = f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {self._format(self._metrics(engine))}"
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"{self.desc}: {text}", flush=True)

    def _completed(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
        line = f"{self.desc}: {engine.state.iteration} iterations in {time.perf_counter() - self.start:.0f} s"
        best = self.validator if self.validator is not None else engine
        name = getattr(best.state, "key_metric_name", None)
        if name and getattr(best.state, "best_metric_epoch", -1) > 0:
            line += f"; best {name} {best.state.best_metric:.4f} at epoch {best.state.best_metric_epoch}"
        print(line, flush=True)


@contextmanager
def quiet_log() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS` and raise :data:`QUIET_LOGGERS` to their levels for the ``with`` block only."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def quiet_handlers(config: dict, desc: str) -> dict[str, list]:
    """Overrides of the config's handler lists: per-iteration loggers and per-epoch bars off, one StageProgress on
    the main engine (the trainer, else the evaluator), given the validator when there is one."""
    lists = {}
    for key in ("train#handlers", "validate#handlers", "handlers"):
        node: Any = config
        for part in key.split("#"):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, list):
            lists[key] = [
                {**h, "_disabled_": True} if isinstance(h, dict) and h.get("_target_") in _NOISY_HANDLERS else h
                for h in node
            ]
    main = "train#handlers" if "train#handlers" in lists else "handlers"
    if main in lists:
        progress = {"_target_": "scripts.integration.config_runs.StageProgress", "desc": desc}
        if main == "train#handlers" and "validate" in config:
            progress["validator"] = "@validate#evaluator"
        lists[main] = lists[main] + [progress]
    return lists


def config_files(config: str | Sequence[str]) -> list[str]:
    """The paths of ``config``: one file name of ``configs/``, or several to merge in order."""
    return [str(CONFIGS / name) for name in ([config] if isinstance(config, str) else config)]


def run_config(run_id: str, config: str | Sequence[str], desc: str | None = None, **overrides: Any) -> None:
    """``python -m monai.bundle run <run_id> --config_file <config>`` with the bundle's logging config, ``config`` one
    file name of ``configs/`` or several merged in order (``["inference.json", "inference_slices.json"]``); with
    ``desc``, one progress bar for the run (see :class:`StageProgress`) instead of the config's own log lines."""
    paths = config_files(config)
    if desc is not None:
        overrides = {**quiet_handlers(ConfigParser.load_config_files(paths), desc), **overrides}
    run(run_id, config_file=paths, logging_file=str(CONFIGS / "logging.conf"), **overrides)
