"""The Model Zoo checks (scripts.integration.verify_bundle): the bundle passes them, and each fails on a broken copy."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from scripts.integration.verify_bundle import CHECKS, SCHEMA_SHA256, main, standin_dataset, verify_bundle

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "meta_schema_20240725.json"
# Small networks and images keep the network checks fast on two CPU cores (features: the U-Net's channels).
SMALL = {"width": 0.0625, "image_size": 64, "features": [4, 4, 8, 16, 32, 4]}


@pytest.fixture
def bundle_copy(bundle_root: Path, tmp_path: Path) -> Path:
    """A copy of the bundle without weights, outputs or caches: the tests break it, never the original."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_root, copy, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "logs", "__pycache__"))
    return copy


def run(root: Path, *checks: str, **kwargs) -> dict:
    results = verify_bundle(root, schema=SCHEMA, override=SMALL, checks=checks, **kwargs)
    assert [r.name for r in results] == list(checks)
    return {r.name: r for r in results}


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=4))


def test_repo_bundle_passes_every_check(bundle_root):
    shipped = (bundle_root / "models" / "model.pt").is_file()
    # the shipped model's record fixes its network: only the U-Net is made smaller then
    override = {"features": SMALL["features"]} if shipped else SMALL
    results = verify_bundle(bundle_root, schema=SCHEMA, override=override)
    assert [r.name for r in results] == list(CHECKS)
    failed = {r.name: r.message for r in results if not r.passed}
    assert not failed, failed
    export = next(r for r in results if r.name == "export")
    assert ("randomly initialised" in export.message) != shipped


def test_schema_copy_is_the_official_file():
    # the copy under schemas/ is the file named in schemas/README.md, byte for byte
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert SCHEMA_SHA256 in (SCHEMA.parent / "README.md").read_text()
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert "^[_a-zA-Z0-9]+_data_format$" in schema["patternProperties"]


def test_metadata_describes_what_the_networks_return(bundle_root):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["value_range"]) == (1, [384, 384], [0, 1])
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["num_channels"], pred["value_range"]) == ("logits", 2, [])
    mask = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert (mask["format"], mask["num_channels"], mask["channel_def"]["1"]) == ("segmentation", 1, "nodule")
    assert meta["unet_data_format"]["outputs"]["pred"]["type"] == "logits"
    assert "monai-label" in meta["supported_apps"]


def test_metadata_missing_required_key_fails(bundle_copy):
    assert run(bundle_copy, "metadata")["metadata"].passed
    edit_json(bundle_copy / "configs" / "metadata.json", lambda m: m.pop("network_data_format"))
    result = run(bundle_copy, "metadata")["metadata"]
    assert not result.passed
    assert "'network_data_format' is a required property" in result.message


@pytest.mark.parametrize(
    "edit, where, reason",
    [
        # a tensor without value_range (the official schema's tensor needs it)
        (
            lambda m: m["network_data_format"]["outputs"]["pred"].pop("value_range"),
            "$.network_data_format.outputs.pred",
            "'value_range' is a required property",
        ),
        # the official schema wants one string of authors (the former stand-in also took a list)
        (lambda m: m.update(authors=["A", "B"]), "$.authors", "['A', 'B'] is not of type 'string'"),
        # the second network's description is validated too (the schema's <name>_data_format)
        (lambda m: m["unet_data_format"].pop("inputs"), "$.unet_data_format", "'inputs' is a required property"),
        (
            lambda m: m["network_data_format"]["post_processed_outputs"]["pred"].update(num_channels="1"),
            "$.network_data_format.post_processed_outputs.pred.num_channels",
            "'1' is not of type 'integer'",
        ),
    ],
    ids=["tensor_without_value_range", "authors_list", "unet_without_inputs", "mask_channels_string"],
)
def test_metadata_breaking_the_official_schema_fails(bundle_copy, edit, where, reason):
    edit_json(bundle_copy / "configs" / "metadata.json", edit)
    result = run(bundle_copy, "metadata")["metadata"]
    assert not result.passed
    assert f"configs/metadata.json at {where}: {reason}" in result.message


def test_only_the_official_schema_validates(bundle_copy, tmp_path):
    # a lenient stand-in under the official name (it requires nothing) is refused before anything validates
    standin = tmp_path / "meta_schema_20240725.json"
    standin.write_text(json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}, indent=4))
    result = verify_bundle(bundle_copy, schema=standin, checks=["metadata"])[0]
    assert not result.passed and "is not the official meta_schema_20240725.json" in result.message
    # the metadata must name the schema it is checked against
    edit_json(
        bundle_copy / "configs" / "metadata.json",
        lambda m: m.update(schema=m["schema"].replace("meta_schema_20240725.json", "meta_schema_20220324.json")),
    )
    result = run(bundle_copy, "metadata")["metadata"]
    assert not result.passed
    assert "meta_schema_20220324.json" in result.message and "must be that file's URL" in result.message


def test_missing_schema_is_named(bundle_copy, tmp_path):
    result = verify_bundle(bundle_copy, schema=tmp_path / "nope.json", checks=["metadata"])[0]
    assert not result.passed and "nope.json" in result.message


def test_json_indented_by_2_fails(bundle_copy):
    assert run(bundle_copy, "json_format")["json_format"].passed
    path = bundle_copy / "configs" / "inference.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2))
    result = run(bundle_copy, "json_format")["json_format"]
    assert not result.passed
    assert "configs/inference.json (line 2)" in result.message


def test_wrong_output_channel_count_fails(bundle_copy):
    result = run(bundle_copy, "net_in_out")["net_in_out"]
    assert result.passed and "unet_data_format (configs/inference_unet.json)" in result.message
    edit_json(
        bundle_copy / "configs" / "metadata.json",
        lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=3),
    )
    result = run(bundle_copy, "net_in_out")["net_in_out"]
    assert not result.passed
    assert "network_data_format vs network_def of configs/inference.json" in result.message
    assert "output channel number `2` doesn't match: `3`" in result.message


def test_second_network_is_checked_against_its_description(bundle_copy):
    meta = bundle_copy / "configs" / "metadata.json"
    edit_json(meta, lambda m: m["unet_data_format"]["outputs"]["pred"].update(num_channels=2))
    result = run(bundle_copy, "net_in_out")["net_in_out"]
    assert not result.passed
    assert "unet_data_format vs network_def of configs/inference_unet.json" in result.message
    assert "output channel number `1` doesn't match: `2`" in result.message
    # a network described without a config to check it against is a failure, not a silent skip
    edit_json(meta, lambda m: m.update(vnet_data_format=m["network_data_format"]))
    result = run(bundle_copy, "net_in_out")["net_in_out"]
    assert not result.passed and "['vnet_data_format']" in result.message and "no config is known" in result.message


def test_config_missing_required_property_fails(bundle_copy):
    def drop_train_inferer(config):
        inferer = config["train"].pop("inferer")
        config["train"]["trainer"]["inferer"] = inferer  # still a working trainer, but no train#inferer property

    edit_json(bundle_copy / "configs" / "train.json", drop_train_inferer)
    result = run(bundle_copy, "train_properties")["train_properties"]
    assert not result.passed
    assert "configs/train.json" in result.message and "train_inferer" in result.message


def test_infer_properties_fail_without_dataset(bundle_copy):
    edit_json(bundle_copy / "configs" / "inference.json", lambda c: c.pop("dataset"))
    result = run(bundle_copy, "infer_properties")["infer_properties"]
    assert not result.passed
    assert "configs/inference.json" in result.message and "dataset" in result.message


def test_export_of_a_trained_checkpoint_and_of_a_mismatched_one(bundle_copy, tmp_path):
    from scripts.networks.gap_classifier import GAPClassifier

    ckpt = bundle_copy / "models" / "model.pt"
    torch.manual_seed(1)
    torch.save(GAPClassifier(width=SMALL["width"]).state_dict(), ckpt)
    result = run(bundle_copy, "export")["export"]
    assert result.passed and str(ckpt) in result.message and "random" not in result.message
    assert "same forward and forward_with_nam" in result.message
    torch.save(GAPClassifier(width=0.125).state_dict(), ckpt)  # another width: the shapes do not fit
    result = run(bundle_copy, "export")["export"]
    assert not result.passed and "size mismatch" in result.message


def record_checkpoint(path: Path, seed: int = 2) -> None:
    """A checkpoint as training saves it: the weights under "model" beside a record of the training settings."""
    from scripts.networks.gap_classifier import GAPClassifier

    torch.manual_seed(seed)
    net = GAPClassifier(width=SMALL["width"])
    record = {**net.config(), "image_size": SMALL["image_size"], "pixel_spacing_mm": None}
    torch.save({"model": net.state_dict(), "config": {**record, "hu_window": [-1000.0, 400.0]}}, path)


def test_exports_of_a_checkpoint_with_its_training_record(bundle_copy, tmp_path):
    ckpt = bundle_copy / "models" / "model.pt"
    record_checkpoint(ckpt)
    results = run(bundle_copy, "export", "onnx", export_dir=tmp_path / "exports")
    for name in ("export", "onnx"):
        assert results[name].passed, results[name].message
        assert str(ckpt) in results[name].message
    scripted = torch.jit.load(str(tmp_path / "exports" / "model.ts"))
    weights = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(scripted.state_dict()["fc.weight"], weights["fc.weight"])
    assert (tmp_path / "exports" / "model.onnx").stat().st_size > 0


def test_onnx_round_trip_gives_the_logits_and_nam(bundle_copy, tmp_path):
    from scripts.networks.gap_classifier import GAPClassifier

    ckpt = bundle_copy / "models" / "model.pt"
    record_checkpoint(ckpt)
    result = run(bundle_copy, "onnx", export_dir=tmp_path)["onnx"]
    assert result.passed, result.message
    assert "same logits and NAM at inputs (1, 1, 384, 384) and (2, 1, 192, 192)" in result.message
    # the file the check kept runs in onnxruntime on its own, with the names and shapes the check promises, and gives
    # the checkpoint's network's own outputs at a size and batch it was not traced at
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x = torch.rand(3, 1, 64, 96)
    logits, nam = session.run(["logits", "nam"], {"image": x.numpy()})
    assert logits.shape == (3, 2) and nam.shape == (3, 1, 64, 96)
    network = GAPClassifier(width=SMALL["width"]).eval()
    network.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    with torch.no_grad():
        expected = network.forward_with_nam(x)
    torch.testing.assert_close((torch.from_numpy(logits), torch.from_numpy(nam)), expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_with_a_size_frozen_by_tracing_fails(bundle_copy, monkeypatch):
    # A realistic export bug: the NAM resized to Python ints, which tracing records as constants. The eager network is
    # right at every size; the ONNX graph returns the traced size, which the check's second input exposes.
    from scripts.networks.gap_classifier import GAPClassifier

    def forward_with_nam_frozen(self, x):
        size = [int(s) for s in x.shape[2:]]
        return self(x), F.interpolate(self.nam(x), size=size, mode="bilinear", align_corners=False)

    monkeypatch.setattr(GAPClassifier, "forward_with_nam", forward_with_nam_frozen)
    result = run(bundle_copy, "onnx")["onnx"]
    assert not result.passed
    assert "nam at input (2, 1, 192, 192) differs from eager mode" in result.message
    assert "shapes (2, 1, 192, 192) and (2, 1, 384, 384)" in result.message


def test_code_style_flags_the_bad_file(bundle_copy):
    scripts = bundle_copy / "scripts"
    for path in scripts.glob("*.py"):
        if path.name not in ("__init__.py", "verify_bundle.py", "dataset.py"):
            path.unlink()
    assert run(bundle_copy, "code_style")["code_style"].passed
    (scripts / "ugly.py").write_text("import sys,os\nx = {'a':1}\n")
    result = run(bundle_copy, "code_style")["code_style"]
    assert not result.passed
    assert "black: would reformat" in result.message and "ugly.py" in result.message
    assert "isort" in result.message and "flake8" in result.message and "E231" in result.message


def test_layout_needs_files_and_readme_sections(bundle_copy):
    docs = bundle_copy / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "data_license.txt").write_text("LIDC-IDRI: CC BY 3.0\n")
    sections = ["Authors", "Tags", "Model Description", "Data", "Performance", "System Configuration"]
    (docs / "README.md").write_text("# Title\n" + "".join(f"## **{s}**\ntext\n" for s in sections))
    assert run(bundle_copy, "layout")["layout"].passed
    (docs / "README.md").write_text("# Title\n" + "".join(f"## **{s}**\ntext\n" for s in sections[:-1]))
    result = run(bundle_copy, "layout")["layout"]
    assert not result.passed and "System Configuration" in result.message
    (bundle_copy / "LICENSE").unlink()
    result = run(bundle_copy, "layout")["layout"]
    assert not result.passed and "LICENSE" in result.message


def test_large_files_must_be_listed(bundle_copy):
    assert run(bundle_copy, "large_files")["large_files"].passed
    big = bundle_copy / "models" / "big.pt"
    with open(big, "wb") as f:
        f.truncate(26 * 1024**2)  # sparse: 26 MB apparent size, no disk used
    result = run(bundle_copy, "large_files")["large_files"]
    assert not result.passed and "models/big.pt" in result.message and "not listed" in result.message
    listing = bundle_copy / "large_files.yml"
    listing.write_text(listing.read_text() + '  - path: "models/big.pt"\n    url: "https://example.org/big.pt"\n')
    assert run(bundle_copy, "large_files")["large_files"].passed


def test_large_files_entry_needs_url(bundle_copy):
    (bundle_copy / "large_files.yml").write_text('large_files:\n  - path: "models/model.pt"\n')
    result = run(bundle_copy, "large_files")["large_files"]
    assert not result.passed and "entry 0 needs 'path' and 'url'" in result.message


def test_version_needs_changelog_entry(bundle_copy):
    assert run(bundle_copy, "version")["version"].passed
    edit_json(bundle_copy / "configs" / "metadata.json", lambda m: m.update(version="9.9.0"))
    result = run(bundle_copy, "version")["version"]
    assert not result.passed and "no entry for the current version 9.9.0" in result.message
    edit_json(bundle_copy / "configs" / "metadata.json", lambda m: m.update(version="0.2"))
    assert "not semantic" in run(bundle_copy, "version")["version"].message


def test_standin_dataset_layout(tmp_path):
    root = standin_dataset(tmp_path / "d", size=32)
    datalist = json.loads((root / "datalist.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 2, "validation": 2, "test": 2}
    for item in datalist["training"]:
        for key in ("image", "label", "lung"):
            assert (root / item[key]).is_file()
    assert [i["class"] for i in datalist["test"]] == [1, 0]


def test_cli_reports_and_exits_nonzero(bundle_copy, capsys):
    args = ["--bundle_root", str(bundle_copy), "--schema", str(SCHEMA), "--checks", "version", "json_format"]
    assert main(args) == 0
    edit_json(bundle_copy / "configs" / "metadata.json", lambda m: m.update(version="9.9.9"))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  version" in out and "PASS  json_format" in out and "1 of 2 checks passed" in out
    with pytest.raises(ValueError, match="not of the form id=value"):
        main(args + ["--override", "width"])
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        verify_bundle(bundle_copy / "configs")


def test_module_entry_point_runs_in_the_bundle(bundle_copy):
    cmd = [
        sys.executable,
        "-m",
        "scripts.integration.verify_bundle",
        "--schema",
        str(SCHEMA),
        "--checks",
        "metadata",
        "version",
    ]
    done = subprocess.run(cmd, cwd=bundle_copy, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 checks passed" in done.stdout


def test_a_listed_file_must_match_its_hash(bundle_copy):
    weights = bundle_copy / "models" / "shipped.pt"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    listing = bundle_copy / "large_files.yml"
    entry = f'  - path: "models/shipped.pt"\n    url: ""\n    hash_val: "{digest}"\n    hash_type: "sha256"\n'
    listing.write_text(listing.read_text() + entry)
    assert run(bundle_copy, "large_files")["large_files"].passed
    weights.write_bytes(b"other weights")
    result = run(bundle_copy, "large_files")["large_files"]
    assert not result.passed and "shipped.pt" in result.message and digest in result.message
