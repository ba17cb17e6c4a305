"""The demo trainer: `retrac demo --quick` writes loadable checkpoints and a readable event log.

The quick demo itself is the session fixture ``quick_demo`` of conftest.py (shared with test_serve).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrac.checkpoints import load_scheduler, load_unet, resolve_checkpoint
from retrac.data import load_dataset
from retrac.demo import DemoConfig, train_digits_ddpm
from retrac.errors import ConfigError
from retrac.events import TrainingEventLog, noise_from_seed


def test_demo_writes_loadable_checkpoints_with_weights(quick_demo):
    summary = json.loads((quick_demo / "demo.json").read_text())
    assert len(summary["checkpoints"]) == 3
    lr = summary["config"]["learning_rate"]
    previous = 0
    for entry in summary["checkpoints"]:
        ckpt = resolve_checkpoint(entry["path"])
        assert ckpt.weight == pytest.approx(lr * (entry["step"] - previous))
        previous = entry["step"]
        model = load_unet(entry["path"])
        assert load_scheduler(entry["path"]).config.num_train_timesteps == 1000
        assert model.config.sample_size == 8
    hashes = {resolve_checkpoint(e["path"]).sha256 for e in summary["checkpoints"]}
    assert len(hashes) == 3  # training changed the weights between checkpoints


def test_demo_data_and_event_log_cover_every_step(quick_demo):
    train = load_dataset(quick_demo / "train.npz")
    heldout = load_dataset(quick_demo / "heldout.npz")
    assert len(train) + len(heldout) == 1797
    assert not set(train.ids) & set(heldout.ids)
    log = TrainingEventLog.load(quick_demo / "events.npz")
    epochs = 2
    assert len(log) == epochs * len(train)
    # every training sample appears once per epoch, in intervals 0..K-1
    ids, counts = np.unique(log.sample_id, return_counts=True)
    assert set(ids) == set(train.ids) and (counts == epochs).all()
    assert set(log.interval.tolist()) == {0, 1, 2}
    assert (log.timestep >= 0).all() and (log.timestep < 1000).all()
    steps = log.checkpoint_steps
    for k in range(3):
        in_k = log.step[log.interval == k]
        assert in_k.min() > (steps[k - 1] if k else 0) and in_k.max() <= steps[k]


def test_event_log_replays_training_exactly(tmp_path):
    """Re-running training from the logged (sample, t, noise seed) alone reproduces the checkpoint bits."""
    from retrac.checkpoints import state_dict_sha256
    from retrac.demo import build_demo_scheduler, build_demo_unet

    config = DemoConfig(seed=2, epochs=1, num_checkpoints=1)
    summary = train_digits_ddpm(config, tmp_path, progress=False)
    log = TrainingEventLog.load(tmp_path / "events.npz")
    train = load_dataset(tmp_path / "train.npz")
    row_of = {sample_id: row for row, sample_id in enumerate(train.ids)}

    torch.manual_seed(config.seed)
    model, scheduler = build_demo_unet(), build_demo_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    model.train()
    for step in np.unique(log.step):
        at = log.step == step
        rows = [row_of[i] for i in log.sample_id[at]]
        noise = torch.stack([noise_from_seed(int(s), (1, 8, 8)) for s in log.noise_seed[at]])
        timesteps = torch.from_numpy(log.timestep[at])
        x_t = scheduler.add_noise(train.images[rows], noise, timesteps)
        loss = torch.nn.functional.mse_loss(model(x_t, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    replayed = state_dict_sha256(model.state_dict())
    assert replayed == resolve_checkpoint(summary["checkpoints"][0]["path"]).sha256


def test_demo_is_deterministic(tmp_path):
    config = DemoConfig(seed=5, epochs=1, num_checkpoints=1)
    a = train_digits_ddpm(config, tmp_path / "a", progress=False)
    b = train_digits_ddpm(config, tmp_path / "b", progress=False)
    assert (
        resolve_checkpoint(a["checkpoints"][0]["path"]).sha256
        == resolve_checkpoint(b["checkpoints"][0]["path"]).sha256
    )
    assert a["final_loss"] == b["final_loss"]


def test_demo_config_validation():
    with pytest.raises(ConfigError, match="epochs"):
        DemoConfig(epochs=0)
    with pytest.raises(ConfigError, match="num_heldout"):
        DemoConfig(num_heldout=5000)


def test_planted_variants_add_outliers_and_duplicates():
    from retrac.demo import build_training_set

    plain, _, nothing = build_training_set(DemoConfig(seed=1))
    train, heldout, planted = build_training_set(
        DemoConfig(seed=1, planted_outliers=7, duplicated_samples=3, duplicate_copies=4)
    )
    assert nothing == {"outliers": [], "duplicated": {}}
    assert len(train) == len(plain) + 7 + 3 * 3
    assert planted["outliers"] == [f"outlier-{i:03d}" for i in range(7)]
    for original, copies in planted["duplicated"].items():
        assert len(copies) == 3
        source = train.images[train.ids.index(original)]
        assert all(torch.equal(train.images[train.ids.index(c)], source) for c in copies)
    outliers = train.images[[train.ids.index(i) for i in planted["outliers"]]].flatten(1)
    digits = plain.images.flatten(1)
    # out of distribution: every patch is farther from its nearest digit than any of 300 digits is
    between = torch.cdist(digits[:300], digits)
    between[torch.arange(300), torch.arange(300)] = float("inf")
    assert torch.cdist(outliers, digits).min(dim=1).values.min() > between.min(dim=1).values.max()
    assert not set(heldout.ids) & set(train.ids)


def test_label_agreement_counts_same_label_proponents_and_pixel_neighbours():
    from types import SimpleNamespace

    import numpy as np
    import torch

    from retrac.data import ImageDataset
    from retrac.demo import label_agreement

    # training images 0..5 with labels 0,0,1,1,2,2; image i is the constant i/10
    train = ImageDataset(
        torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2) / 10,
        [f"t{i}" for i in range(6)],
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
    )
    heldout = ImageDataset(  # close to images 0 and 5: labels 0 and 2
        torch.tensor([0.01, 0.49]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone(),
        ["h0", "h1"],
        labels=torch.tensor([0, 2]),
    )
    # a third row (a generated query) is ignored
    result = SimpleNamespace(indices=np.array([[0, 2], [4, 5], [0, 0]]))
    share = label_agreement({"m": result}, heldout, train, k=2)
    assert share["m"] == 0.75  # query 0: t0 yes, t2 no; query 1: t4, t5 yes
    assert share["pixel nearest neighbours"] == 1.0  # t0, t1 / t5, t4


def test_demo_builds_the_default_method_from_its_sqnorm_store(quick_demo):
    """The demo's default index is built without naming a method: the sqnorm store's default is dtrak."""
    from retrac.query.index import read_manifest
    from retrac.query.vectors import Method, default_method

    summary = json.loads((quick_demo / "demo.json").read_text())
    assert summary["default_method"] == default_method("sqnorm") == "dtrak"
    assert default_method("loss") == default_method("l1") == "retrac+kernel"
    assert Method.named("retrac+kernel") == Method.named("retrac", kernel=0.1)
    manifest = read_manifest(quick_demo / "index-dtrak")
    assert manifest["method"]["name"] == "dtrak" and manifest["store"]["objective"] == "sqnorm"
    assert set(summary["label_share_top10"]) == {"dtrak", "retrac", "tracin", "pixel nearest neighbours"}
    assert all(0.0 <= v <= 1.0 for v in summary["label_share_top10"].values())
