"""The int8 classifier for CPU inference: ONNX export, static quantisation, and the record that ties it to its weights.

    python -m scripts.networks.quantize --ckpt models/model.pt --dataset_dir ../data/lidc    # training slices
    python -m scripts.networks.quantize --ckpt models/model.pt --scans /path/to/scans         # or slices of scans

writes ``models/model_int8.onnx`` beside the checkpoint and ``models/model_int8.json``, its record: the checkpoint's
and the model's sha256, the calibration's source and slice count, the ONNX Runtime version and the date. The model
computes ``forward_with_nam`` (logits and the raw NAM) for any batch size and slice size. ``int8_model`` is what
inference calls: it returns the model only when its record matches the checkpoint and the model file, so a retrained
checkpoint is never paired with the quantised copy of the one before.

The recipe (ONNX Runtime's static quantisation): QDQ format, weights int8 per output channel, activations uint8 per
tensor with ranges from the calibration slices (min/max). The convolutions, their ReLUs and the poolings between them
are quantised: the NAM is a weighted sum of the head's activations, and R-NAM compares small differences of it, so it
and the pooled logits stay in float32. Two choices measured in docs/precision.md:

- the ReLUs are among the quantised operators, so each convolution's output is quantised once, on the ReLU's range
  [0, max]; without them ONNX Runtime quantises the convolution's output on its own range, negatives included (half
  the levels spent on what the ReLU then drops) and quantises it again after the ReLU;
- conv1_1 stays float32, so the input keeps its float resolution instead of 256 levels over the HU window (rounding
  the input alone moved the quick start's probabilities by 0.025; conv1_1 is under 1 % of a width-1 forward).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.io import read_json, sha256, write_atomically, write_json
from .checkpoint import inference_classifier, resolve_settings
from .gap_classifier import GAPClassifier

__all__ = [
    "RECIPE",
    "StaleModelError",
    "int8_paths",
    "int8_model",
    "export_onnx",
    "quantize_checkpoint",
    "training_slices",
    "scan_slices",
]

DEFAULT_COUNT = 32
RECIPE = (
    "static QDQ; Conv with its Relu, and MaxPool, but conv1_1 (float32); weights int8 per channel, activations uint8 "
    "per tensor (min/max)"
)
COMMAND = "python -m scripts.networks.quantize --ckpt {ckpt} --dataset_dir <prepared dataset> (or --scans <scans>)"
_ARCHITECTURE_KEYS = ("gap_levels", "width", "in_channels", "head_channels", "batch_norm")


class StaleModelError(ValueError):
    """The int8 model is missing, or was made from other weights than the checkpoint's."""


def int8_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>_int8.onnx, <stem>_int8.json)`` beside the checkpoint ``<stem>.pt``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}_int8.onnx"), path.with_name(f"{path.stem}_int8.json")


def int8_model(checkpoint: str | os.PathLike) -> Path:
    """The int8 model of ``checkpoint``, after checking that its record names this checkpoint's content.

    Raises:
        StaleModelError: the model or its record is missing, the checkpoint changed since it was quantised, the
            model is not the one recorded, or it was made with another recipe than ``RECIPE``; the message names the
            files and the command that makes the model again.
    """
    model, record_path = int8_paths(checkpoint)
    again = "make it with: " + COMMAND.format(ckpt=checkpoint)
    if not model.is_file() or not record_path.is_file():
        raise StaleModelError(
            f"precision int8 needs {model} and its record {record_path}, made from {checkpoint}: {again}"
        )
    record = read_json(record_path)
    actual = sha256(checkpoint)
    if record.get("checkpoint_sha256") != actual:
        raise StaleModelError(
            f"{model} is stale: its record {record_path} says it was quantised from a checkpoint with sha256 "
            f"{record.get('checkpoint_sha256')}, but {checkpoint} now has sha256 {actual} (retrained or replaced); "
            f"{again}"
        )
    if record.get("model_sha256") != sha256(model):
        raise StaleModelError(f"{model} is not the model its record {record_path} describes (replaced?); {again}")
    if record.get("recipe") != RECIPE:
        raise StaleModelError(
            f"{model} was quantised with an older recipe ({record.get('recipe')!r}, in {record_path}); this version "
            f"quantises with {RECIPE!r}, which gives answers closer to float32's: {again}"
        )
    return model


class _WithNAM(nn.Module):
    """``forward_with_nam`` as the forward, which is what ``torch.onnx.export`` traces."""

    def __init__(self, network: GAPClassifier) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.forward_with_nam(x)


def export_onnx(network: GAPClassifier, path: str | os.PathLike, size: int = 64) -> None:
    """Export ``forward_with_nam`` in float32 (inputs ``image``, outputs ``logits`` and ``nam``); batch, height and
    width are dynamic (``size`` is only the traced example's side)."""
    example = torch.zeros(1, network.in_channels, size, size)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        _WithNAM(network.float().cpu().eval()),
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits", "nam"],
        dynamic_axes={"image": dynamic, "logits": {0: "batch"}, "nam": dynamic},
        opset_version=17,
        dynamo=False,  # the TorchScript exporter: no extra dependency, and the recipe measured on this CPU
    )


def _calibration_reader(slices: np.ndarray) -> Any:
    """ONNX Runtime's calibration data reader over ``(N, C, H, W)`` slices, one slice a batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[dict[str, np.ndarray]] = iter({"image": s[None]} for s in slices)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    return Reader()


def _first_conv(path: Path) -> str:
    """The name of the model's first convolution (conv1_1): ONNX graphs list their nodes in topological order."""
    import onnx

    return next(node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Conv")


def load_classifier(checkpoint: str | os.PathLike) -> GAPClassifier:
    """The classifier of a checkpoint, built from its record, in evaluation mode on the CPU."""
    settings = resolve_settings(checkpoint)
    return inference_classifier(GAPClassifier(**{k: settings[k] for k in _ARCHITECTURE_KEYS}), checkpoint)


def quantize_checkpoint(checkpoint: str | os.PathLike, slices: np.ndarray, source: str) -> Path:
    """Quantise the classifier of ``checkpoint`` with ``slices`` ``(N, C, H, W)`` (network input, [0, 1]) as the
    calibration set; write the model and its record beside the checkpoint (``int8_paths``) and return the model's
    path. ``source`` says where the slices came from (recorded)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    slices = np.ascontiguousarray(slices, np.float32)
    if slices.ndim != 4 or not len(slices):
        raise ValueError(f"calibration slices must be (N, C, H, W) with N >= 1, got shape {slices.shape}")
    network = load_classifier(checkpoint)
    model, record = int8_paths(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        exported, prepared, quantised = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        export_onnx(network, exported, size=slices.shape[-1])
        quant_pre_process(str(exported), str(prepared))  # shape inference and graph clean-up ONNX Runtime asks for
        quantize_static(
            str(prepared),
            str(quantised),
            _calibration_reader(slices),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv", "Relu", "MaxPool"],
            nodes_to_exclude=[_first_conv(prepared)],
        )
        write_atomically(model, lambda tmp: shutil.copyfile(quantised, tmp))
    write_json(
        record,
        {
            "checkpoint": Path(checkpoint).name,
            "checkpoint_sha256": sha256(checkpoint),
            "model_sha256": sha256(model),
            "calibration": {"source": source, "slices": int(len(slices)), "shape": list(slices.shape[1:])},
            "recipe": RECIPE,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return model


def _spread(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(n)`` (all of them when ``n <= count``)."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(int))


def training_slices(
    dataset_dir: str | os.PathLike, hu_window: Sequence[float], count: int = DEFAULT_COUNT
) -> np.ndarray:
    """``count`` training slices of a prepared dataset, spread over its datalist, as the network takes them
    ``(N, C, H, W)``: HU mapped to [0, 1] in ``hu_window``, as training did."""
    import nibabel as nib

    from ..data.dataset import load_split

    items = load_split(dataset_dir, "training")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = []
    for index in _spread(len(items), count):
        hu = np.asarray(nib.load(str(items[index]["image"])).dataobj, np.float32)
        hu = hu.transpose(2, 0, 1) if hu.ndim == 3 else hu[None]  # the writer stores 2.5-D as (rows, cols, channels)
        out.append(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))
    return np.stack(out)


def scan_slices(
    scans: Sequence[str | os.PathLike], checkpoint: str | os.PathLike, count: int = DEFAULT_COUNT
) -> np.ndarray:
    """``count`` lung slices of whole scans, prepared as ``configs/inference.json`` prepares them (orientation,
    the model's spacing, HU window, the crop around the lungs, 2.5-D context), spread over the scans' lung slices."""
    from monai.bundle import ConfigParser

    from ..pipeline.context import stack_context
    from ..pipeline.crop import crop, crop_window
    from ..pipeline.scan_inferer import _spacing

    bundle = Path(__file__).resolve().parents[2]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "ckpt_path": str(checkpoint)})
    preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    lo, hi = inferer.segmenter.intensity_range
    per_scan = -(-count // len(scans))  # ceil: every scan contributes
    out = []
    for scan in scans:
        volume = preprocessing({"image": str(scan)})["image"]
        window = volume[0].numpy()
        lungs = np.asarray(inferer.lung_mask_fn(lo + window.astype(np.float64) * (hi - lo), _spacing(volume)), bool)
        with_lung = np.flatnonzero(lungs.any(axis=(0, 1)))
        images = crop(window, crop_window(lungs, inferer.image_size), inferer.image_size, 0.0)
        chosen = with_lung[_spread(len(with_lung), per_scan)]
        inputs = stack_context(images, chosen, inferer.in_channels, _spacing(volume)[2], inferer.context_mm)
        out.append(inputs.transpose(2, 3, 0, 1))
    return np.concatenate(out)[:count].astype(np.float32)


def main(argv: Sequence[str] | None = None) -> Path:
    cli = argparse.ArgumentParser(description="Quantise a classifier checkpoint to int8 for CPU inference.")
    cli.add_argument("--ckpt", required=True, help="the classifier checkpoint (models/model.pt)")
    source = cli.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_dir", help="a prepared dataset: calibrate on its training slices")
    source.add_argument("--scans", nargs="+", help="scans (DICOM folders or volumes): calibrate on their lung slices")
    cli.add_argument("--count", type=int, default=DEFAULT_COUNT, help="calibration slices")
    args = cli.parse_args(argv)
    if args.dataset_dir:
        slices = training_slices(args.dataset_dir, resolve_settings(args.ckpt)["hu_window"], args.count)
        source_text = f"training split of {Path(args.dataset_dir).resolve()}"
    else:
        slices = scan_slices(args.scans, args.ckpt, args.count)
        source_text = "lung slices of " + ", ".join(Path(s).name for s in args.scans)
    model = quantize_checkpoint(args.ckpt, slices, source_text)
    print(f"{model}: int8, calibrated on {len(slices)} slices ({source_text}); record {int8_paths(args.ckpt)[1]}")
    return model


if __name__ == "__main__":
    main()
