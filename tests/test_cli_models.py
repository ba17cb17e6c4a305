"""Models found the way diffusers saves them (issue 13, items 1 and 2): a DDPMPipeline.save_pretrained
folder, a bare UNet with --scheduler (recorded, so queries need not repeat it), an accelerate layout,
unet/ beside unet_ema/, and an unsupported model class named plainly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import load_unet, state_dict_sha256
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.indexer import FeatureStore

FAST = ["--events", "stratified:1", "--projector", "dense", "--dim", "16", "--no-progress", "--threads", "1"]
SPEC = "DDPMScheduler:num_train_timesteps=100,beta_schedule=linear"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-data")
    generator = torch.Generator().manual_seed(3)
    ImageDataset(torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1, [f"t{i}" for i in range(6)]).save_npz(
        root / "train.npz"
    )
    ImageDataset(torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1, ["q0", "q1"]).save_npz(root / "q.npz")
    return root


def _index(capsys, checkpoint, data, out, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(
        [
            "index",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data / "train.npz"),
            "--out",
            str(out),
            *FAST,
            *extra,
        ]
    )
    return code, capsys.readouterr().err


def _build_and_query(capsys, store, tmp_path, data, *extra) -> dict:
    assert main(["build", "--store", str(store), "--out", str(tmp_path / "index"), "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["query", "--index", str(tmp_path / "index"), "--images", str(data / "q.npz"), "--k", "2"]
    assert main([*argv, "--query-events", "fast", "--json", *extra]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_ddpm_pipeline_folder(data, tmp_path, capsys):
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=make_tiny_unet(seed=8), scheduler=make_scheduler()).save_pretrained(
        tmp_path / "pipeline"
    )
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    code, err = _index(capsys, tmp_path / "pipeline", data, tmp_path / "store")
    assert code == 0, err
    assert _build_and_query(capsys, tmp_path / "store", tmp_path, data)["results"]["retrac+kernel"]["k"] == 2


def test_bare_unet_needs_and_records_a_scheduler(data, tmp_path, capsys):
    unet = make_tiny_unet(seed=9)
    unet.save_pretrained(tmp_path / "bare")
    code, err = _index(capsys, tmp_path / "bare", data, tmp_path / "refused")
    assert code == 2 and "--scheduler" in err and "no scheduler_config.json" in err
    code, err = _index(capsys, tmp_path / "bare", data, tmp_path / "store", "--scheduler", SPEC)
    assert code == 0, err
    attrs = FeatureStore.open(tmp_path / "store").attrs
    assert attrs["task"]["scheduler_class"] == "DDPMScheduler"
    assert attrs["checkpoints"][0]["scheduler"]["num_train_timesteps"] == 100
    # the query rebuilds the scheduler from the store's record: no --scheduler needed there
    assert _build_and_query(capsys, tmp_path / "store", tmp_path, data)["query_ids"] == ["q0", "q1"]
    # a scheduler folder works as well, and a class that is not a scheduler is named
    make_scheduler().save_pretrained(tmp_path / "sched")
    code, err = _index(
        capsys, tmp_path / "bare", data, tmp_path / "store2", "--scheduler", str(tmp_path / "sched")
    )
    assert code == 0, err
    code, err = _index(capsys, tmp_path / "bare", data, tmp_path / "store3", "--scheduler", "UNet2DModel")
    assert code == 2 and "'UNet2DModel'" in err and "not a diffusers scheduler" in err


def test_accelerate_layout_and_unet_ema(data, tmp_path, capsys):
    from safetensors.torch import save_file

    # accelerator.save_state: output/checkpoint-N/model.safetensors, the config in output/unet/
    output = tmp_path / "output"
    unet = make_tiny_unet(seed=10)
    unet.save_pretrained(output / "unet")
    (output / "checkpoint-5").mkdir()
    save_file(unet.state_dict(), str(output / "checkpoint-5" / "model.safetensors"))
    code, err = _index(capsys, output / "checkpoint-5", data, tmp_path / "no-scheduler")
    assert code == 2 and "--scheduler" in err
    make_scheduler().save_pretrained(output / "scheduler")  # what the training script saves at the end
    code, err = _index(capsys, output / "checkpoint-5", data, tmp_path / "acc")
    assert code == 0, err

    # diffusers' training scripts with --use_ema: checkpoint-N/unet/ and checkpoint-N/unet_ema/
    ema = make_tiny_unet(seed=11)
    unet.save_pretrained(output / "checkpoint-9" / "unet")
    ema.save_pretrained(output / "checkpoint-9" / "unet_ema")
    code, err = _index(capsys, output / "checkpoint-9", data, tmp_path / "plain")
    assert code == 0 and "retrac index: warning:" in err and "unet_ema" in err
    code, err = _index(capsys, output / "checkpoint-9" / "unet_ema", data, tmp_path / "ema")
    assert code == 0 and "unet_ema/ (EMA weights)" not in err
    sha = {
        name: FeatureStore.open(tmp_path / name).attrs["checkpoints"][0]["sha256"]
        for name in ("plain", "ema")
    }
    assert sha["plain"] == state_dict_sha256(unet.state_dict())
    assert sha["ema"] == state_dict_sha256(load_unet(output / "checkpoint-9" / "unet_ema").state_dict())
    assert sha["ema"] != sha["plain"]


def test_unsupported_model_class_is_named(data, tmp_path, capsys):
    from diffusers import UNet1DModel

    UNet1DModel(
        sample_size=16,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 8, 8),
        down_block_types=("DownBlock1D", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1D"),
        mid_block_type="UNetMidBlock1D",
        extra_in_channels=16,
    ).save_pretrained(tmp_path / "unet1d")
    make_scheduler().save_pretrained(tmp_path / "unet1d")
    code, err = _index(capsys, tmp_path / "unet1d", data, tmp_path / "store")
    assert code == 2
    assert "UNet1DModel" in err and "not a supported denoiser" in err and "UNet2DModel" in err
    assert len(err.strip().splitlines()) == 1  # the message is the whole output: no traceback
