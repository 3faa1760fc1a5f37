"""The MONAI Model Zoo's checks of this bundle: ``python -m scripts.integration.verify_bundle`` (run in ``bundle/``).

Each check runs MONAI's own tool where one exists (``verify_metadata`` against an offline copy of the official
``meta_schema_20240725.json``, ``verify_net_in_out`` for every network the metadata describes, ``ckpt_export``,
``convert_to_onnx``, ``ConfigWorkflow.check_properties``) and the zoo's rules otherwise (JSON indented by 4,
black/isort/flake8 on ``scripts/``, the required files, ``large_files.yml`` and the 25 MB limit, version and
changelog). The exported TorchScript and ONNX models are run (the ONNX one by onnxruntime) and compared with the
eager network. Every check is reported as PASS or FAIL with its reason; the exit status is non-zero when any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jsonschema
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from monai.networks.utils import convert_to_onnx
from monai.utils import OptionalImportError, optional_import
from torch import nn

from ..data.dataset import slice_affine
from ..utils.io import file_hash, sha256, write_atomically, write_json, write_nifti

__all__ = [
    "CheckContext",
    "CheckResult",
    "CHECKS",
    "README_SECTIONS",
    "MAX_FILE_MB",
    "SCHEMA_NAME",
    "SCHEMA_SHA256",
    "NETWORK_CONFIGS",
    "LogitsAndNAM",
    "check_metadata",
    "check_net_in_out",
    "check_export",
    "check_onnx",
    "check_train_properties",
    "check_infer_properties",
    "check_json_format",
    "check_code_style",
    "check_layout",
    "check_large_files",
    "check_version",
    "standin_dataset",
    "verify_bundle",
    "main",
]

# The zoo's file size limit: larger files are downloaded through large_files.yml, never committed.
MAX_FILE_MB = 25.0
# Sections of the Model Zoo's docs/readme_template.md that are not marked optional.
README_SECTIONS = ("Authors", "Tags", "Model Description", "Data", "Performance", "System Configuration")
REQUIRED_FILES = ("LICENSE", "docs/README.md", "docs/data_license.txt", "large_files.yml")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
SCHEMA_NAME = "meta_schema_20240725.json"
DEFAULT_SCHEMA = f"../schemas/{SCHEMA_NAME}"
# sha256 of the official schema (Project-MONAI/project-monai.github.io, public/schema/; see schemas/README.md): a
# stand-in or an edited copy under that name must not pass for it.
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
# The config that defines ``network_def`` for each network the metadata describes (``network_data_format`` and the
# schema's ``<name>_data_format``); a described network without an entry here fails the net_in_out check.
NETWORK_CONFIGS = {"network_data_format": "inference.json", "unet_data_format": "inference_unet.json"}
DATA_FORMAT_KEY = re.compile(r"^[_a-zA-Z0-9]+_data_format$")  # the official schema's pattern for further networks
# onnxruntime must give the eager outputs within this, relative to each output's largest magnitude (at least 1).
ONNX_TOLERANCE = 1e-4


class BundleCheckError(ValueError):
    """A check found the bundle in breach of a rule; the message says which file and what."""


@dataclass
class CheckResult:
    """The outcome of one check: ``message`` says what was verified, or why it failed."""

    name: str
    passed: bool
    message: str
    seconds: float = 0.0


@dataclass
class CheckContext:
    """What every check may need, resolved once by ``verify_bundle``."""

    root: Path
    schema: Path
    ckpt: Path | None
    dataset_dir: Path | None
    override: dict[str, Any]
    device: str
    work: Path
    export_dir: Path | None = None

    @property
    def meta_file(self) -> str:
        return str(self.root / "configs" / "metadata.json")

    def config(self, name: str) -> str:
        path = self.root / "configs" / name
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        return str(path)

    def bundle_override(self) -> dict[str, Any]:
        return {"bundle_root": str(self.root), **self.override}


def _checkpoint(ctx: CheckContext) -> tuple[Path, str]:
    """The checkpoint to export and to run the inference workflow with; a random one when none is trained yet."""
    ckpt = ctx.ckpt if ctx.ckpt is not None else ctx.root / "models" / "model.pt"
    if ctx.ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if ckpt.is_file():
        return ckpt, f"checkpoint {ckpt}"
    random_ckpt = ctx.work / "random_init.pt"
    if not random_ckpt.is_file():
        parser = ConfigParser()
        parser.read_config(ctx.config("inference.json"))
        parser.update(ctx.bundle_override())
        torch.save(parser.get_parsed_content("network_def").state_dict(), random_ckpt)
    return random_ckpt, f"randomly initialised network ({ckpt} is absent)"


def _load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a checkpoint and its key: a plain state dict (key ``""``) or ``{"model": state_dict, ...}``.

    Training checkpoints may carry more than the weights (``"config"``, the settings they were trained with), so the
    weights are read as ``checkpoint.get("model", checkpoint)``, as MONAI Label does.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"], "model"
    if not isinstance(checkpoint, dict):
        raise BundleCheckError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(checkpoint)}")
    return checkpoint, ""


def _network(ctx: CheckContext, ckpt: Path) -> tuple[ConfigParser, nn.Module]:
    """``network_def`` of ``inference.json`` (with the metadata read) holding the weights of ``ckpt``, in eval mode."""
    parser = ConfigParser()
    parser.read_config(ctx.config("inference.json"))
    parser.read_meta(ctx.meta_file)
    parser.update({**ctx.bundle_override(), "ckpt_path": str(ckpt)})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(_load_weights(ckpt)[0])
    return parser, net.eval()


def _input_shape(parser: ConfigParser) -> tuple[int, list[int]]:
    image = parser["_meta_"]["network_data_format"]["inputs"]["image"]
    return int(image["num_channels"]), [int(s) for s in image["spatial_shape"]]


def _keep(ctx: CheckContext, exported: Path) -> str:
    """Copy a verified export to ``ctx.export_dir`` (atomically); the phrase for the check's message."""
    if ctx.export_dir is None:
        return ""
    target = ctx.export_dir / exported.name
    write_atomically(target, lambda tmp: shutil.copyfile(exported, tmp))
    return f"; written to {target}"


def _schema_error_path(ctx: CheckContext) -> str:
    """Where the metadata breaks the schema, as " at $.key.key" (jsonschema's best match), or "" if not found."""
    schema = json.loads(ctx.schema.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(Path(ctx.meta_file).read_text())))
    return "" if error is None else f" at {error.json_path}"


def check_metadata(ctx: CheckContext) -> str:
    """``configs/metadata.json`` against the official ``meta_schema_20240725.json`` with MONAI's ``verify_metadata``.

    The schema is an offline copy passed as ``verify_metadata``'s ``filepath`` (MONAI downloads nothing when the file
    is there) together with the official file's sha256, so only that file validates; the metadata's ``schema`` URL
    must name the same schema.
    """
    if not ctx.schema.is_file():
        raise FileNotFoundError(f"metadata schema not found: {ctx.schema} (pass --schema)")
    url = json.loads(Path(ctx.meta_file).read_text()).get("schema")
    if not isinstance(url, str) or url.rsplit("/", 1)[-1] != SCHEMA_NAME:
        raise BundleCheckError(
            f"{ctx.meta_file}: 'schema' is {url!r}; the offline check validates against {SCHEMA_NAME}, so 'schema' "
            "must be that file's URL"
        )
    digest = sha256(ctx.schema)
    if digest != SCHEMA_SHA256:
        raise BundleCheckError(
            f"{ctx.schema} is not the official {SCHEMA_NAME} (sha256 {digest}, expected {SCHEMA_SHA256}); "
            "get it from Project-MONAI/project-monai.github.io, public/schema/ (see schemas/README.md)"
        )
    try:
        verify_metadata(meta_file=ctx.meta_file, filepath=str(ctx.schema), hash_val=SCHEMA_SHA256, hash_type="sha256")
    except ValueError as error:  # MONAI's message drops where in the file the error is: find it again
        reason = str(error).replace("\n\n", "; ")  # one line: MONAI puts the schema's URL after a blank line
        raise BundleCheckError(f"configs/metadata.json{_schema_error_path(ctx)}: {reason}") from error
    return f"configs/metadata.json is valid against the official {SCHEMA_NAME} (verify_metadata, offline copy)"


def check_net_in_out(ctx: CheckContext) -> str:
    """Every network the metadata describes, on a random input of its described shape, gives its described output.

    ``network_data_format`` is checked on ``network_def`` of ``inference.json``; each ``<name>_data_format`` (the
    official schema's form for further networks) on ``network_def`` of its config in ``NETWORK_CONFIGS``, by running
    MONAI's ``verify_net_in_out`` on a copy of the metadata whose ``network_data_format`` is that description.
    """
    meta = json.loads(Path(ctx.meta_file).read_text())
    described = [k for k in meta if k == "network_data_format" or DATA_FORMAT_KEY.match(k)]
    unknown = [k for k in described if k not in NETWORK_CONFIGS]
    if unknown:
        raise BundleCheckError(
            f"configs/metadata.json describes {unknown}, but no config is known for them (NETWORK_CONFIGS in "
            "scripts/integration/verify_bundle.py names the config whose network_def each describes)"
        )
    checked = []
    for key in described:
        meta_file = ctx.meta_file
        if key != "network_data_format":
            meta_file = str(ctx.work / f"metadata_{key}.json")
            write_json(meta_file, {**meta, "network_data_format": meta[key]})
        try:
            verify_net_in_out(
                net_id="network_def",
                meta_file=meta_file,
                config_file=ctx.config(NETWORK_CONFIGS[key]),
                device=ctx.device,
                **ctx.bundle_override(),
            )
        except Exception as error:  # name the description and config that disagree, whatever MONAI raised
            raise BundleCheckError(
                f"{key} vs network_def of configs/{NETWORK_CONFIGS[key]}: {type(error).__name__}: {error}"
            ) from error
        checked.append(f"{key} (configs/{NETWORK_CONFIGS[key]})")
    return f"network_def's input and output match {', '.join(checked)}"


def _compare(name: str, expected: torch.Tensor, got: torch.Tensor, atol: float, what: str) -> None:
    if tuple(expected.shape) != tuple(got.shape) or not torch.allclose(expected, got, rtol=0.0, atol=atol):
        diff = float((expected - got).abs().max()) if tuple(expected.shape) == tuple(got.shape) else float("nan")
        raise BundleCheckError(
            f"{what}: {name} differs from eager mode: shapes {tuple(expected.shape)} and {tuple(got.shape)}, "
            f"max difference {diff:.3g} (tolerance {atol:.3g})"
        )


def check_export(ctx: CheckContext, atol: float = 1e-5) -> str:
    """Export the checkpoint to TorchScript with ``ckpt_export``, reload it and compare its outputs with eager mode.

    ``forward`` is compared, and ``forward_with_nam`` too when the network has it (it survives scripting as a
    ``@torch.jit.export`` method).
    """
    ckpt, source = _checkpoint(ctx)
    exported = ctx.work / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(ckpt),
        key_in_ckpt=_load_weights(ckpt)[1],
        meta_file=ctx.meta_file,
        config_file=ctx.config("inference.json"),
        **{**ctx.bundle_override(), "ckpt_path": str(ckpt)},
    )
    parser, net = _network(ctx, ckpt)
    scripted = torch.jit.load(str(exported), map_location="cpu")
    channels, shape = _input_shape(parser)
    x = torch.rand(1, channels, *shape, generator=torch.Generator().manual_seed(0))
    what = f"TorchScript export of {source} after reload"
    compared = ["forward"]
    with torch.no_grad():
        _compare("forward", net(x), scripted(x), atol, what)
        if hasattr(net, "forward_with_nam"):
            if not hasattr(scripted, "forward_with_nam"):
                raise BundleCheckError(
                    f"{what}: forward_with_nam did not survive scripting (mark it @torch.jit.export)"
                )
            for name, a, b in zip(("logits", "NAM"), net.forward_with_nam(x), scripted.forward_with_nam(x)):
                _compare(f"forward_with_nam's {name}", a, b, atol, what)
            compared.append("forward_with_nam")
    same = " and ".join(compared)
    return f"exported {source} to TorchScript; the reloaded model gives the same {same}{_keep(ctx, exported)}"


class LogitsAndNAM(nn.Module):
    """The classifier as ONNX sees it: ``forward`` returns ``network.forward_with_nam(x)``, logits and raw NAM.

    ONNX exports one method, ``forward``; this wrapper makes it the one that also gives the NAM, from one backbone
    pass, as the bundle's inferers use it.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.forward_with_nam(x)


def _other_shape(shape: list[int], multiple: int = 16) -> list[int]:
    """A second spatial size, about half of ``shape`` and a multiple of ``multiple`` (the classifier's NAM stride)."""
    return [max(multiple, s // 2 // multiple * multiple) for s in shape]


def check_onnx(ctx: CheckContext, tolerance: float = ONNX_TOLERANCE) -> str:
    """Export the checkpoint's classifier to ONNX (logits and NAM) and run it with onnxruntime against eager mode.

    The export is MONAI's ``convert_to_onnx`` (traced, TorchScript-based ``torch.onnx.export``) of
    :class:`LogitsAndNAM` (of ``forward`` alone for a network without ``forward_with_nam``), with the batch and both
    spatial sizes dynamic. It is traced on the metadata's input shape and then compared on that shape and on a batch
    of 2 at about half the size, so a size or batch frozen by tracing fails. Each output must agree within
    ``tolerance`` times its largest eager magnitude (at least 1).
    """
    ort, has_ort = optional_import("onnxruntime")
    _, has_onnx = optional_import("onnx")
    if not (has_ort and has_onnx):
        raise BundleCheckError("the ONNX check needs onnx and onnxruntime (pip install -r requirements.txt)")
    ckpt, source = _checkpoint(ctx)
    parser, net = _network(ctx, ckpt)
    with_nam = hasattr(net, "forward_with_nam")
    model = LogitsAndNAM(net) if with_nam else net
    names = ["logits", "nam"] if with_nam else ["logits"]
    channels, shape = _input_shape(parser)
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    if with_nam:
        dynamic["nam"] = {0: "batch", 2: "height", 3: "width"}
    exported = ctx.work / "model.onnx"
    x = torch.rand(1, channels, *shape, generator=torch.Generator().manual_seed(0))
    convert_to_onnx(
        model,
        inputs=[x],
        input_names=["image"],
        output_names=names,
        dynamic_axes=dynamic,
        filename=str(exported),
        use_trace=True,
        dynamo=False,  # the TorchScript-based exporter: the dynamo one needs onnxscript, not a dependency here
    )
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    what = f"ONNX export of {source} in onnxruntime"
    worst = 0.0
    second = torch.rand(2, channels, *_other_shape(shape), generator=torch.Generator().manual_seed(1))
    for inputs in (x, second):
        with torch.no_grad():
            expected = model(inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(names, {"image": inputs.numpy()})
        for name, a, b in zip(names, expected, got):
            atol = tolerance * max(1.0, float(a.abs().max()))
            b = torch.from_numpy(b)
            _compare(f"{name} at input {tuple(inputs.shape)}", a, b, atol, what)
            worst = max(worst, float((a - b).abs().max()))
    outputs = "logits and NAM" if with_nam else "logits (the network has no forward_with_nam)"
    return (
        f"exported {source} to ONNX; onnxruntime gives the same {outputs} at inputs {tuple(x.shape)} and "
        f"{tuple(second.shape)} (max difference {worst:.2g}){_keep(ctx, exported)}"
    )


def standin_dataset(out_dir: str | os.PathLike, size: int = 64, spacing: float = 0.7) -> Path:
    """Write a 6-slice dataset in the format of ``scripts.data.dataset`` (one slice with, one without nodule per split).

    ``check_properties`` instantiates the workflows' components, and their datasets read the datalist: this
    stand-in lets the check run before any real data is prepared. Slices are noise in HU with a disc as nodule.
    Beside them lies one small CT volume, ``standin-scan.nii.gz`` (the slices stacked, 2.5 mm apart), for an
    inference config that reads whole scans from the folder.
    """
    out_dir = Path(out_dir)
    for sub in ("images", "labels", "lungs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 8) ** 2
    datalist: dict[str, list[dict[str, Any]]] = {}
    for split in ("training", "validation", "test"):
        datalist[split] = []
        for positive in (1, 0):
            stem = f"standin-{split}_{positive:04d}"
            label = disc & bool(positive)
            hu = rng.normal(-850.0, 50.0, (size, size)) + 800.0 * label
            affine = slice_affine((spacing, spacing))
            write_nifti(out_dir / "images" / f"{stem}.nii.gz", hu.astype(np.int16), affine)
            write_nifti(out_dir / "labels" / f"{stem}.nii.gz", label.astype(np.uint8), affine)
            write_nifti(out_dir / "lungs" / f"{stem}.nii.gz", np.ones((size, size), np.uint8), affine)
            datalist[split].append(
                {
                    "image": f"images/{stem}.nii.gz",
                    "label": f"labels/{stem}.nii.gz",
                    "lung": f"lungs/{stem}.nii.gz",
                    "class": positive,
                    "subject": f"standin-{split}",
                    "slice": positive,
                    "nodules": positive,
                    "diameters_mm": [round(size / 4 * spacing, 2)] if positive else [],
                    "label_pixels": int(label.sum()),
                    "crop_origin": [0, 0],
                    "spacing_mm": [spacing, spacing],
                }
            )
    write_json(out_dir / "datalist.json", datalist)
    volume = np.stack(
        [nib.load(str(out_dir / item["image"])).get_fdata() for split in datalist.values() for item in split], axis=-1
    ).astype(np.int16)
    scan = nib.Nifti1Image(volume, np.diag([spacing, spacing, 2.5, 1.0]))
    scan.header.set_xyzt_units("mm")
    write_atomically(out_dir / "standin-scan.nii.gz", lambda tmp: nib.save(scan, tmp))
    return out_dir


def _check_properties(ctx: CheckContext, config: str, workflow_type: str, override: dict[str, Any]) -> str:
    dataset_dir = ctx.dataset_dir
    if dataset_dir is None:
        dataset_dir = ctx.work / "standin_dataset"
        if not dataset_dir.is_dir():
            standin_dataset(dataset_dir)
    workflow = ConfigWorkflow(
        config_file=ctx.config(config),
        meta_file=ctx.meta_file,
        logging_file=False,
        workflow_type=workflow_type,
        **{**ctx.bundle_override(), "dataset_dir": str(dataset_dir), **override},
    )
    workflow.initialize()
    try:
        missing = workflow.check_properties()
    except Exception as error:  # a property that fails to instantiate fails the check, whatever the library raised
        raise BundleCheckError(f"configs/{config}: a {workflow_type} property fails to instantiate: {error}") from error
    if missing:
        raise BundleCheckError(
            f"configs/{config}: missing or wrongly referenced {workflow_type} properties {missing} "
            "(see monai.bundle.properties)"
        )
    where = "the stand-in dataset" if ctx.dataset_dir is None else str(dataset_dir)
    return f"configs/{config} has every {workflow_type} property (instantiated on {where})"


def check_train_properties(ctx: CheckContext) -> str:
    """``ConfigWorkflow(train.json, workflow_type="train").check_properties()`` finds nothing missing."""
    return _check_properties(ctx, "train.json", "train", {})


def check_infer_properties(ctx: CheckContext) -> str:
    """``ConfigWorkflow(inference.json, workflow_type="infer").check_properties()`` finds nothing missing."""
    ckpt, _ = _checkpoint(ctx)
    return _check_properties(ctx, "inference.json", "infer", {"ckpt_path": str(ckpt)})


def check_json_format(ctx: CheckContext) -> str:
    """Every JSON file under ``configs/`` is exactly ``json.dumps(content, indent=4)``."""
    files = sorted((ctx.root / "configs").rglob("*.json"))
    bad = []
    for path in files:
        text = path.read_text()
        try:
            expected = json.dumps(json.loads(text), indent=4)
        except json.JSONDecodeError as error:
            raise BundleCheckError(f"{path}: not valid JSON: {error}") from None
        if text.rstrip("\n") != expected:
            line = next(
                (i + 1 for i, (a, b) in enumerate(zip(text.splitlines(), expected.splitlines())) if a != b),
                min(len(text.splitlines()), len(expected.splitlines())) + 1,
            )
            bad.append(f"{path.relative_to(ctx.root)} (line {line})")
    if bad:
        raise BundleCheckError(f"not formatted as json.dumps(indent=4): {', '.join(bad)}")
    return f"{len(files)} JSON files under configs/ are indented by 4"


def check_code_style(ctx: CheckContext) -> str:
    """black (line 120), isort (profile black) and flake8 (line 120) are clean on ``scripts/``."""
    scripts = str(ctx.root / "scripts")
    tools = {
        "black": ["black", "--check", "-l", "120", scripts],
        "isort": ["isort", "--profile", "black", "-l", "120", "--check-only", "--quiet", scripts],
        "flake8": ["flake8", "--max-line-length", "120", scripts],
    }
    failures = []
    for name, args in tools.items():
        run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
        if run.returncode != 0:
            details = [line for line in (run.stdout + run.stderr).splitlines() if line.strip() and "Oh no" not in line]
            failures.append(f"{name}: " + "; ".join(details[:5]))
    if failures:
        raise BundleCheckError(" | ".join(failures))
    return "black, isort and flake8 are clean on scripts/"


def check_layout(ctx: CheckContext) -> str:
    """The files the zoo requires exist, and ``docs/README.md`` has the template's sections."""
    missing = [name for name in REQUIRED_FILES if not (ctx.root / name).is_file()]
    if missing:
        raise BundleCheckError(f"missing required files in {ctx.root}: {missing}")
    headings = {
        re.sub(r"[*_`]", "", line.lstrip("#")).strip().lower()
        for line in (ctx.root / "docs" / "README.md").read_text().splitlines()
        if line.startswith("#")
    }
    absent = [s for s in README_SECTIONS if not any(h.startswith(s.lower()) for h in headings)]
    if absent:
        raise BundleCheckError(f"docs/README.md lacks the Model Zoo template's sections {absent}")
    return f"{', '.join(REQUIRED_FILES)} present; docs/README.md has the template's sections"


def _tracked_files(root: Path) -> list[Path] | None:
    """Files under ``root`` tracked by git, or None when ``root`` is not in a git work tree."""
    try:
        run = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if run.returncode != 0:
        return None
    return [root / name for name in run.stdout.split("\0") if name]


def check_large_files(ctx: CheckContext) -> str:
    """``large_files.yml`` is well formed and lists every file over 25 MB under ``models/``; none is committed."""
    path = ctx.root / "large_files.yml"
    if not path.is_file():
        raise BundleCheckError(f"missing {path}")
    try:
        entries = ConfigParser.load_config_file(path).get("large_files")
    except OptionalImportError:
        raise BundleCheckError(f"{path}: reading it needs PyYAML (pip install pyyaml)") from None
    except Exception as error:  # yaml's parser errors all mean the file cannot be read
        raise BundleCheckError(f"{path}: cannot be read as YAML: {error}") from error
    if not isinstance(entries, list):
        raise BundleCheckError(f"{path}: needs a top-level list 'large_files'")
    listed = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"path", "url"} <= set(entry):
            raise BundleCheckError(f"{path}: entry {i} needs 'path' and 'url'")
        if entry.get("hash_val") and entry.get("hash_type", "md5") not in HASH_TYPES:
            raise BundleCheckError(f"{path}: entry {i} has hash_type {entry['hash_type']!r}, not one of {HASH_TYPES}")
        listed.add(os.path.normpath(entry["path"]))
        local = ctx.root / entry["path"]
        if entry.get("hash_val") and local.is_file():
            kind = entry.get("hash_type", "md5")
            digest = file_hash(local, kind)
            if digest != entry["hash_val"]:
                raise BundleCheckError(f"{local}: its {kind} is {digest}, large_files.yml lists {entry['hash_val']}")
    limit = MAX_FILE_MB * 1024**2
    models = ctx.root / "models"
    big = [p for p in models.rglob("*") if p.is_file() and p.stat().st_size > limit] if models.is_dir() else []
    unlisted = [str(p.relative_to(ctx.root)) for p in big if os.path.normpath(p.relative_to(ctx.root)) not in listed]
    if unlisted:
        raise BundleCheckError(f"files over {MAX_FILE_MB:g} MB not listed in large_files.yml: {unlisted}")
    tracked = _tracked_files(ctx.root)
    if tracked is None:
        return f"large_files.yml lists {len(listed)} file(s), covers models/; not a git work tree, commits not checked"
    committed = [str(p.relative_to(ctx.root)) for p in tracked if p.is_file() and p.stat().st_size > limit]
    if committed:
        raise BundleCheckError(f"files over {MAX_FILE_MB:g} MB are committed to git: {committed}")
    return f"large_files.yml lists {len(listed)} file(s), covers models/; no committed file over {MAX_FILE_MB:g} MB"


def check_version(ctx: CheckContext) -> str:
    """``version`` is semantic (X.Y.Z) and is the newest entry of ``changelog``."""
    meta = json.loads(Path(ctx.meta_file).read_text())
    version, changelog = meta.get("version"), meta.get("changelog")
    if not isinstance(version, str) or not SEMVER.match(version):
        raise BundleCheckError(f"configs/metadata.json: version {version!r} is not semantic (X.Y.Z)")
    if not isinstance(changelog, dict) or version not in changelog:
        raise BundleCheckError(f"configs/metadata.json: changelog has no entry for the current version {version}")
    entries = [k for k in changelog if SEMVER.match(k)]
    newest = max(entries, key=lambda k: tuple(int(p) for p in k.split(".")))
    if newest != version:
        raise BundleCheckError(f"configs/metadata.json: version {version} is older than changelog entry {newest}")
    return f"version {version} is semantic and has a changelog entry"


CHECKS: dict[str, Callable[[CheckContext], str]] = {
    "metadata": check_metadata,
    "net_in_out": check_net_in_out,
    "export": check_export,
    "onnx": check_onnx,
    "train_properties": check_train_properties,
    "infer_properties": check_infer_properties,
    "json_format": check_json_format,
    "code_style": check_code_style,
    "layout": check_layout,
    "large_files": check_large_files,
    "version": check_version,
}


def verify_bundle(
    bundle_root: str | os.PathLike = ".",
    schema: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    override: dict[str, Any] | None = None,
    checks: Sequence[str] | None = None,
    device: str = "cpu",
    export_dir: str | os.PathLike | None = None,
) -> list[CheckResult]:
    """Run the checks on a bundle and return one result per check; a failing check does not stop the others.

    Args:
        bundle_root: the bundle folder (holding ``configs/``, ``scripts/``, ``models/``, ``docs/``).
        schema: the metadata schema file; default ``<bundle_root>/../schemas/meta_schema_20240725.json``.
        ckpt: the checkpoint to export; default ``models/model.pt``, or a randomly initialised network if absent.
        dataset_dir: a prepared dataset for the property checks; default a stand-in written to a temp folder.
        override: config id -> value, applied to every config read (e.g. ``{"width": 0.0625}``).
        checks: names of the checks to run (keys of ``CHECKS``); default all.
        device: device for the network checks.
        export_dir: where the export and onnx checks copy the files they verified (``model.ts``, ``model.onnx``);
            default nowhere (they are written to a temporary folder and removed).
    """
    root = Path(bundle_root).resolve()
    if not (root / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"not a bundle (no configs/metadata.json): {root}")
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the configs reach the bundle's own package, scripts
    results = []
    with tempfile.TemporaryDirectory(prefix="verify_bundle_") as work:
        ctx = CheckContext(
            root=root,
            schema=Path(schema).resolve() if schema is not None else (root / DEFAULT_SCHEMA).resolve(),
            ckpt=Path(ckpt).resolve() if ckpt is not None else None,
            dataset_dir=Path(dataset_dir).resolve() if dataset_dir is not None else None,
            override=dict(override or {}),
            device=device,
            work=Path(work),
            export_dir=Path(export_dir).resolve() if export_dir is not None else None,
        )
        for name in names:
            start = time.perf_counter()
            try:
                passed, message = True, CHECKS[name](ctx)
            except Exception as error:  # every failure, whatever raised it, is reported and the next check runs
                passed, message = False, f"{type(error).__name__}: {error}"
            results.append(CheckResult(name, passed, message, time.perf_counter() - start))
    return results


def _parse_override(items: Sequence[str]) -> dict[str, Any]:
    override = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form id=value")
        try:
            override[key] = json.loads(value)
        except json.JSONDecodeError:
            override[key] = value  # a bare string
    return override


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print one line per check and return 1 if any failed."""
    cli = argparse.ArgumentParser(
        prog="python -m scripts.integration.verify_bundle", description=__doc__.splitlines()[0]
    )
    cli.add_argument("--bundle_root", default=".", help="the bundle folder (default: the current folder)")
    cli.add_argument("--schema", default=None, help=f"metadata schema file (default: <bundle_root>/{DEFAULT_SCHEMA})")
    cli.add_argument("--ckpt", default=None, help="checkpoint to export (default: models/model.pt or random weights)")
    cli.add_argument("--dataset_dir", default=None, help="prepared dataset for the property checks")
    cli.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="config override (JSON)")
    cli.add_argument("--checks", nargs="+", default=None, choices=list(CHECKS), help="run only these checks")
    cli.add_argument("--device", default="cpu")
    cli.add_argument("--export_dir", default=None, help="keep the verified model.ts and model.onnx in this folder")
    args = cli.parse_args(argv)
    override = _parse_override(args.override)
    results = verify_bundle(
        args.bundle_root, args.schema, args.ckpt, args.dataset_dir, override, args.checks, args.device, args.export_dir
    )
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.seconds:6.1f} s  {r.message}")
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
