"""Shared fixtures: tiny diffusers UNets built from configs (no downloads)."""

from __future__ import annotations

import contextlib

import pytest
import torch


def free_port() -> int:
    """A free loopback TCP port (for servers started by the tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(app):
    """Serve ``app`` with uvicorn on a free loopback port, in a daemon thread; yields the port."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_tiny_unet(channels: int = 1, size: int = 8, num_class_embeds: int | None = None, seed: int = 0):
    """A very small UNet2DModel with one attention block, seeded."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    ).eval()


def make_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 100):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)


def weighted_store(root, num_train: int, shard_rows: int, model_seed: int, data_seed: int):
    """A store of ``num_train`` random 8x8 samples ``z0, z1, ...`` over two tiny checkpoints weighted 0.5
    and 1.5 (exact projector on ``conv_out``, 2 stratified events), and the data generator, whose next
    draws give the caller its query images."""
    from retrac.checkpoints import save_checkpoint
    from retrac.data import ImageDataset
    from retrac.indexer import IndexConfig, featurize_dataset

    paths = [
        str(
            save_checkpoint(
                make_tiny_unet(seed=model_seed + k), make_scheduler(), root / f"ckpt-{k}", weight=w
            )
        )
        for k, w in enumerate((0.5, 1.5))
    ]
    generator = torch.Generator().manual_seed(data_seed)
    data = ImageDataset(
        torch.rand(num_train, 1, 8, 8, generator=generator) * 2 - 1, [f"z{i}" for i in range(num_train)]
    )
    config = IndexConfig(
        events="stratified:2", projector="exact", seed=5, include=("conv_out.*",), shard_rows=shard_rows
    )
    return featurize_dataset(paths, data, root / "store", config, progress=False), data, generator


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread for the whole suite: on a 2-core machine shared with other work, a second
    OpenMP thread per process makes gradient-heavy tests many times slower, never faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def scheduler():
    return make_scheduler()


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand((6, 1, 8, 8), generator=generator) * 2 - 1


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`retrac demo --quick --seed 3 --epochs 2`, run once per session and shared (test_demo, test_serve,
    test_serve_browser). Read-only for the tests: nothing may write into it."""
    from retrac.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3", "--epochs", "2", "--no-progress"]) == 0
    return out
