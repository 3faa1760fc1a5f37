"""What a checkpoint records, and loading it: by the record, by flags for old checkpoints, and clear refusals."""

import pytest
import torch
from monai.bundle import ConfigParser
from scripts.networks.checkpoint import (
    TrainingRecord,
    load_checkpoint,
    read_checkpoint,
    resolve_settings,
    warm_start,
)
from scripts.networks.gap_classifier import GAPClassifier


def _save(tmp_path, model, record=None, name="model.pt"):
    path = tmp_path / name
    torch.save(model.state_dict() if record is None else {"model": model.state_dict(), "config": record}, path)
    return path


def _record(model, spacings=((0.7, 0.7), (0.8, 0.8)), size=64):
    items = [{"image": "unused", "spacing_mm": list(s)} for s in spacings]
    return TrainingRecord(model, items, image_size=size, hu_window=(-1000, 400)).state_dict()


@pytest.mark.parametrize("width", [0.1, 0.3, 0.0625])
def test_widths_that_are_not_multiples_of_1_64_load(tmp_path, width):
    # width 0.1 gives 6-channel first convs: a width reconstructed as 6 / 64 = 0.09375 used to be refused
    trained = GAPClassifier(width=width, head_channels=64)
    path = _save(tmp_path, trained, _record(trained))
    settings = resolve_settings(path)
    assert settings["width"] == width and settings["head_channels"] == 64
    model = load_checkpoint(GAPClassifier(width=settings["width"], head_channels=settings["head_channels"]), path)
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model(x), trained(x))


def test_record_holds_the_training_settings(tmp_path):
    trained = GAPClassifier(gap_levels=2, width=0.0625, head_channels=128, batch_norm=True)
    record = _record(trained)
    assert record["gap_levels"] == 2 and record["batch_norm"] is True and record["in_channels"] == 1
    assert record["image_size"] == 64 and record["pixel_spacing_mm"] == [0.7, 0.8]
    assert record["hu_window"] == [-1000.0, 400.0] and record["bundle_version"] != ""
    path = _save(tmp_path, trained, record)
    state, saved = read_checkpoint(path)
    assert saved == record and "features.0.weight" in state


def test_given_value_contradicting_the_record_is_an_error(tmp_path):
    trained = GAPClassifier(width=0.0625, head_channels=64)
    path = _save(tmp_path, trained, _record(trained))
    with pytest.raises(ValueError, match=r"model\.pt was trained with image_size=64, but image_size=384 was given"):
        resolve_settings(path, image_size=384)
    with pytest.raises(ValueError, match="width=0.0625, but width=1.0 was given"):
        resolve_settings(path, width=1.0)
    with pytest.raises(ValueError, match="unknown model settings"):
        resolve_settings(path, widht=1.0)
    # the same value, or none, is fine
    assert resolve_settings(path, image_size=64, width=None)["image_size"] == 64


def test_old_bare_state_dict_loads_with_flags(tmp_path):
    trained = GAPClassifier(gap_levels=2, width=0.0625, head_channels=256)
    path = _save(tmp_path, trained)
    settings = resolve_settings(path, gap_levels=2, width=0.0625, head_channels=256)
    assert settings["image_size"] == 384 and settings["pixel_spacing_mm"] is None
    model = GAPClassifier(**{k: settings[k] for k in ("gap_levels", "width", "head_channels")})
    load_checkpoint(model, path)
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model.forward_with_nam(x), trained.forward_with_nam(x))
    # without the flags the defaults do not match the weights: the message describes both networks
    with pytest.raises(ValueError, match=r"holds a network with 2 GAP head\(s\) of 16 channels.*this model"):
        load_checkpoint(GAPClassifier(gap_levels=1, width=1.0), path)


def test_state_dict_from_before_the_normalisation_buffers_loads(tmp_path):
    trained = GAPClassifier(width=0.0625, head_channels=64)
    state = {k: v for k, v in trained.state_dict().items() if k not in ("input_mean", "input_std")}
    torch.save(state, tmp_path / "old.pt")
    model = load_checkpoint(GAPClassifier(width=0.0625, head_channels=64), tmp_path / "old.pt")
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model(x), trained(x))


def test_last_checkpoint_and_bad_files(tmp_path):
    trained = GAPClassifier(width=0.0625, head_channels=64)
    torch.save({"model": trained.state_dict(), "optimizer": {}}, tmp_path / "last.pt")
    model = load_checkpoint(GAPClassifier(width=0.0625, head_channels=64), tmp_path / "last.pt")
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model(x), trained(x))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(GAPClassifier(), tmp_path / "nothing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "broken.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a GAPClassifier checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def _logit_difference(model, x):
    logits = model.eval()(x)
    return logits[:, 1] - logits[:, 0]


def test_warm_start_from_fewer_gap_levels_keeps_what_was_learned(tmp_path):
    # the full quick start's 3-GAP classifier starts from its 2-GAP one: backbone, conv5_3 and conv4_3 heads shared
    torch.manual_seed(0)
    settings = {"width": 0.0625, "head_channels": 64, "batch_norm": True, "in_channels": 3}
    trained = GAPClassifier(gap_levels=2, **settings)
    with torch.no_grad():
        trained.fc.weight[0] = torch.randn_like(trained.fc.weight[0])  # rows not opposite (a checkpoint before 0.6.0)
        trained.fc.bias.copy_(torch.tensor([0.3, -0.2]))
    path = _save(tmp_path, trained)
    torch.manual_seed(1)
    fresh = GAPClassifier(gap_levels=3, **settings)
    torch.manual_seed(1)
    grown = warm_start(GAPClassifier(gap_levels=3, **settings), path)
    for key, value in trained.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(grown.state_dict()[key], value)
    torch.testing.assert_close(grown.heads[2].state_dict(), fresh.heads[2].state_dict())  # the conv3_3 head is new
    torch.testing.assert_close(grown.fc.weight[0], -grown.fc.weight[1])
    torch.testing.assert_close(grown.fc.bias[0], -grown.fc.bias[1])
    # with the new head's fc columns silenced the grown network gives the checkpoint's logit difference
    with torch.no_grad():
        grown.fc.weight[:, 2 * 4 :] = 0  # 4 channels per head at width 0.0625
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(_logit_difference(grown, x), _logit_difference(trained, x))
    # a checkpoint of the same levels loads whole; another backbone is refused as before
    torch.testing.assert_close(warm_start(GAPClassifier(gap_levels=2, **settings), path).fc.weight, trained.fc.weight)
    with pytest.raises(ValueError, match="holds a network with 2 GAP head"):
        warm_start(GAPClassifier(gap_levels=3, **{**settings, "width": 0.125}), path)


def test_inference_configs_classifier_uses_its_running_statistics(tmp_path, bundle_root):
    """``configs/inference.json``'s ``network`` is in evaluation mode for whoever takes it: a batch-norm model's
    slice gives the trained model's answer alone and beside other slices (batch statistics would change both)."""
    torch.manual_seed(0)
    trained = GAPClassifier(width=0.0625, head_channels=64, batch_norm=True)
    with torch.no_grad():  # running statistics far from any batch's, as a trained model's are
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    trained.eval()
    path = _save(tmp_path, trained, _record(trained, size=32))
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "ckpt_path": str(path), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    assert not any(module.training for module in network.modules())
    slices = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = trained(slices)
        torch.testing.assert_close(network(slices), expected)
        torch.testing.assert_close(network(slices[:1]), expected[:1])
