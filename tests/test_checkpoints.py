"""Checkpoints: save/load round trips, fingerprints, layouts, and corrupt input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import (
    load_scheduler,
    load_unet,
    parse_checkpoint_spec,
    resolve_checkpoint,
    save_checkpoint,
    state_dict_sha256,
)
from retrac.errors import CheckpointError


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_keeps_weights_and_fingerprint(tmp_path):
    model, scheduler = make_tiny_unet(), make_scheduler("v_prediction")
    path = save_checkpoint(model, scheduler, tmp_path / "checkpoint-10", weight=0.5, step=10)
    loaded = load_unet(path)
    assert _same_weights(model, loaded)
    assert load_scheduler(path).config.prediction_type == "v_prediction"
    ckpt = resolve_checkpoint(str(path))
    assert ckpt.weight == 0.5 and ckpt.step == 10
    assert ckpt.sha256 == state_dict_sha256(model.state_dict())
    assert resolve_checkpoint(f"{path}=2.5").weight == 2.5


def test_fingerprint_changes_with_any_weight(tmp_path):
    model = make_tiny_unet()
    before = state_dict_sha256(model.state_dict())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert state_dict_sha256(model.state_dict()) != before
    assert state_dict_sha256(make_tiny_unet(seed=5).state_dict()) != state_dict_sha256(
        make_tiny_unet().state_dict()
    )


def test_plain_save_pretrained_and_accelerate_layouts(tmp_path):
    model = make_tiny_unet()
    model.save_pretrained(tmp_path / "plain")
    assert _same_weights(model, load_unet(tmp_path / "plain"))
    # accelerate save_state: checkpoint-N/model.safetensors, config in the run's unet/ folder
    run = tmp_path / "run"
    model.save_pretrained(run / "unet")
    (run / "checkpoint-7").mkdir()
    save_file(model.state_dict(), str(run / "checkpoint-7" / "model.safetensors"))
    assert _same_weights(model, load_unet(run / "checkpoint-7"))
    # .bin files are read with weights_only=True
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "diffusion_pytorch_model.bin")
    assert _same_weights(model, load_unet(tmp_path / "bin"))


def test_checkpoint_spec_parsing():
    assert parse_checkpoint_spec("a/b") == ("a/b", None)
    assert parse_checkpoint_spec("a/b=0.25") == ("a/b", 0.25)
    assert parse_checkpoint_spec("a=b/c") == ("a=b/c", None)
    with pytest.raises(CheckpointError, match="positive"):
        parse_checkpoint_spec("a/b=0")


def test_missing_and_corrupt_checkpoints_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_unet(tmp_path / "empty")
    model = make_tiny_unet()
    model.save_pretrained(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_unet(tmp_path / "corrupt")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        resolve_checkpoint(tmp_path / "corrupt")
    # weights that do not fit the config
    make_tiny_unet(num_class_embeds=3).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "corrupt" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not fit its model config"):
        load_unet(tmp_path / "other")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "other")
    config = json.loads((tmp_path / "corrupt" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
