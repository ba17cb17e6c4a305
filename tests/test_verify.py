"""Store integrity: every kind of damage is found by `retrac verify`, refused by the build (naming the
checkpoint, the shard and the command that repairs it), and recomputed by a resumed `retrac index`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError, StoreDamagedError, StoreMismatchError
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.indexer.integrity import shard_digest
from retrac.query.attribution import Attributor, build_attribution_index
from retrac.verify import verify, verify_index, verify_store

N = 10
SETTINGS = {"events": "stratified:2", "projector": "dense", "dim": 16, "shard_rows": 4, "batch_size": 5}
ARRAYS = ("features", "norms", "timesteps", "valid")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny checkpoints, ``N`` images and one complete store (3 shards per checkpoint)."""
    root = tmp_path_factory.mktemp("verify")
    checkpoints = [
        save_checkpoint(make_tiny_unet(seed=k), make_scheduler(), root / f"ckpt-{k}", 0.5, 10 * (k + 1))
        for k in range(2)
    ]
    generator = torch.Generator().manual_seed(4)
    ImageDataset(torch.rand(N, 1, 8, 8, generator=generator) * 2 - 1, [f"z{i}" for i in range(N)]).save_npz(
        root / "train.npz"
    )
    store = featurize_dataset(
        [str(c) for c in checkpoints],
        root / "train.npz",
        root / "store",
        IndexConfig(**SETTINGS),
        progress=False,
    )
    return {"root": root, "checkpoints": checkpoints, "store": store.path}


def copy_store(world, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(world["store"], target)
    return target


def chunk(store: Path, k: int, name: str, shard: int) -> Path:
    """The file holding shard ``shard`` of array ``name`` of checkpoint ``k`` (one chunk per shard here)."""
    suffix = "0/0" if name == "features" else "0"
    return store / f"checkpoint-{k:02d}" / name / "c" / str(shard) / suffix


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def all_arrays(store: FeatureStore) -> dict[tuple[int, str], np.ndarray]:
    return {(k, n): np.asarray(store._array(k, n)[:]) for k in range(store.num_checkpoints) for n in ARRAYS}


def forge_entry(store: Path, k: int, shard: int) -> None:
    """A ledger entry for a shard whose data was never written (rows and sha256 well formed)."""
    entry = json.loads((store / "ledger" / "checkpoint-00" / "shard-000000.json").read_text())
    start, stop = shard * SETTINGS["shard_rows"], min((shard + 1) * SETTINGS["shard_rows"], N)
    entry.update({"checkpoint": k, "shard": shard, "rows": [start, stop]})
    folder = store / "ledger" / f"checkpoint-{k:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"shard-{shard:06d}.json").write_text(json.dumps(entry))


# every way a shard can be damaged: (name, make(store) -> (checkpoint, shard) damaged)
def _flip(name, k, shard):
    def make(store):
        flip_byte(chunk(store, k, name, shard))
        return k, shard

    return make


def _delete(name, k, shard):
    def make(store):
        chunk(store, k, name, shard).unlink()
        return k, shard

    return make


def _truncate(name, k, shard):
    def make(store):
        path = chunk(store, k, name, shard)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return k, shard

    return make


def _forge_over_deleted(store):
    # shard 1 of checkpoint 1 "never computed": its data removed, a well-formed entry left in place
    for name in ARRAYS:
        chunk(store, 1, name, 1).unlink()
    return 1, 1


def _misfiled_entry(store):
    ledger = store / "ledger" / "checkpoint-00"
    (ledger / "shard-000002.json").write_text((ledger / "shard-000001.json").read_text())
    return 0, 2


def _corrupt_entry(store):
    (store / "ledger" / "checkpoint-01" / "shard-000000.json").write_text('{"checkpoint": 1, "sha')
    return 1, 0


DAMAGES = {
    **{f"flip-{name}": _flip(name, 1, 1) for name in ARRAYS},
    **{f"delete-{name}": _delete(name, 0, 2) for name in ARRAYS},
    "truncate-features": _truncate("features", 0, 0),
    "truncate-valid": _truncate("valid", 1, 2),
    "entry-for-data-never-written": _forge_over_deleted,
    "entry-of-another-shard": _misfiled_entry,
    "corrupt-entry": _corrupt_entry,
}


def test_whole_store_verifies_and_streams_the_same_data(world, capsys):
    report = verify(world["store"])
    assert report.kind == "store" and report.whole and report.checked == 2 * 3
    assert main(["verify", str(world["store"]), "--no-progress"]) == 0
    assert "is whole (6 shards checked)" in capsys.readouterr().out
    store = FeatureStore.open(world["store"])
    for block_rows in (1, 3, 4, 7, 100):  # verified blocks of any size hold exactly the stored rows
        blocks = list(store.blocks(0, block_rows))
        assert [b.stop - b.start for b in blocks][:-1] == [block_rows] * (len(blocks) - 1)
        for name in ARRAYS:
            joined = np.concatenate([getattr(b, name) for b in blocks])
            assert np.array_equal(joined, getattr(store, name)(0))


def test_shard_digest_matches_what_write_shard_recorded(world):
    store = FeatureStore.open(world["store"])
    for k in range(2):
        for shard in range(3):
            start, stop = store.shard_range(shard)
            raw = {name: np.asarray(store._array(k, name)[start:stop]) for name in ARRAYS}
            assert shard_digest(raw) == store.ledger_entry(k, shard)["sha256"]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damage_is_reported_refused_and_recomputed(world, tmp_path, damage, capsys):
    store_path = copy_store(world, tmp_path)
    k, shard = DAMAGES[damage](store_path)
    where = f"shard {shard} (rows {shard * 4}-{min(shard * 4 + 4, N)}) of checkpoint-{k:02d}"

    report = verify_store(store_path)
    assert [p.where for p in report.problems] == [where]
    assert main(["verify", str(store_path), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert where in out and "rerun `retrac index` with the same arguments" in out

    with pytest.raises(StoreDamagedError, match=f"shard {shard} of checkpoint-{k:02d} will be recomputed"):
        build_attribution_index(store_path, tmp_path / "index", "retrac", progress=False)
    assert main(["build", "--store", str(store_path), "--out", str(tmp_path / "idx"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert where in err and f"--out {store_path}" in err and "Traceback" not in err

    # resume: the same featurization recomputes the damaged shard, bit for bit
    with pytest.warns(UserWarning, match=f"recomputing shard {shard} of checkpoint {k}"):
        featurize_dataset(
            [str(c) for c in world["checkpoints"]],
            world["root"] / "train.npz",
            store_path,
            IndexConfig(**SETTINGS),
            progress=False,
        )
    assert verify_store(store_path).whole
    repaired, original = (
        all_arrays(FeatureStore.open(store_path)),
        all_arrays(FeatureStore.open(world["store"])),
    )
    assert all(np.array_equal(repaired[key], original[key]) for key in original)


@pytest.mark.parametrize("damage", ["delete", "rewrite"])
def test_damaged_ids_are_refused_and_repaired(world, tmp_path, damage):
    store_path = copy_store(world, tmp_path)
    if damage == "delete":
        (store_path / "ids" / "c" / "0").unlink()  # read back as empty strings
    else:
        import zarr

        zarr.open_array(str(store_path / "ids"), mode="r+")[:] = np.asarray([f"x{i}" for i in range(N)])
    assert [p.where for p in verify_store(store_path).problems] == ["ids"]
    with pytest.raises(StoreDamagedError, match="ids do not match their recorded sha256"):
        _ = FeatureStore.open(store_path).ids
    featurize_dataset(
        [str(c) for c in world["checkpoints"]],
        world["root"] / "train.npz",
        store_path,
        IndexConfig(**SETTINGS),
        progress=False,
    )
    assert verify_store(store_path).whole
    assert FeatureStore.open(store_path).ids == [f"z{i}" for i in range(N)]


def test_entry_for_a_checkpoint_never_computed_is_refused(world, tmp_path):
    """A store half made (--shard 0/2) whose missing ledger entries were forged looks complete."""
    out = tmp_path / "half"
    featurize_dataset(
        [str(c) for c in world["checkpoints"]],
        world["root"] / "train.npz",
        out,
        IndexConfig(**SETTINGS),
        shard="0/2",
        progress=False,
    )
    assert FeatureStore.open(out).missing() == [(0, 1), (1, 1)]
    for k in range(2):
        forge_entry(out, k, 1)
    assert FeatureStore.open(out).is_complete  # the ledger alone is fooled
    assert {p.where for p in verify_store(out).problems} == {
        "shard 1 (rows 4-8) of checkpoint-00",
        "shard 1 (rows 4-8) of checkpoint-01",
    }
    with pytest.raises(StoreDamagedError, match="shard 1 of checkpoint-00 will be recomputed"):
        build_attribution_index(out, tmp_path / "index", "tracin", progress=False)


def test_stray_ledger_files_are_noted_not_read(world, tmp_path):
    store_path = copy_store(world, tmp_path)
    forge_entry(store_path, 7, 0)  # a checkpoint the store does not have
    report = verify_store(store_path)
    assert report.whole and any("checkpoint-07" in note for note in report.notes)


def test_incomplete_store_lists_the_shards_not_computed(world, tmp_path):
    store_path = copy_store(world, tmp_path)
    (store_path / "ledger" / "checkpoint-01" / "shard-000002.json").unlink()
    report = verify_store(store_path)
    assert [(p.where, p.message) for p in report.problems] == [
        ("shard 2 (rows 8-10) of checkpoint-01", "it has no ledger entry (it was never computed)")
    ]


def test_old_format_store_is_refused_with_the_reason(world, tmp_path):
    store_path = copy_store(world, tmp_path)
    meta = json.loads((store_path / "zarr.json").read_text())
    meta["attributes"]["format"]["version"] = 1
    meta["attributes"].pop("integrity")
    (store_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="version 1 recorded no digest of the ids"):
        FeatureStore.open(store_path)
    assert main(["verify", str(store_path)]) == 2


def test_verify_refuses_a_folder_that_is_neither(tmp_path):
    with pytest.raises(ConfigError, match="neither a feature store"):
        verify(tmp_path)


def test_scheduler_is_recorded_and_a_changed_one_refused(world, tmp_path):
    store = FeatureStore.open(world["store"])
    recorded = store.checkpoints[0].scheduler
    assert recorded["prediction_type"] == "epsilon" and recorded["num_train_timesteps"] == 100
    assert not any(key.startswith("_") for key in recorded)
    # a store and index over a copy of checkpoint 0, whose scheduler is then edited
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["checkpoints"][0], ckpt)
    featurize_dataset(
        [str(ckpt)], world["root"] / "train.npz", tmp_path / "store", IndexConfig(**SETTINGS), progress=False
    )
    build_attribution_index(tmp_path / "store", tmp_path / "index", "retrac", progress=False)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["checkpoints"][0]["scheduler"] == resolve_checkpoint_scheduler(ckpt)
    Attributor(tmp_path / "index", progress=False)  # unchanged: loads
    config_file = ckpt / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(prediction_type="v_prediction", beta_end=0.03)
    config_file.write_text(json.dumps(config))
    with pytest.raises(StoreMismatchError, match="beta_end: recorded 0.02, now 0.03; prediction_type"):
        Attributor(tmp_path / "index", progress=False)
    with pytest.raises(StoreMismatchError, match="prediction_type"):  # nor can the store be resumed with it
        featurize_dataset(
            [str(ckpt)],
            world["root"] / "train.npz",
            tmp_path / "store",
            IndexConfig(**SETTINGS),
            progress=False,
        )


def resolve_checkpoint_scheduler(path: Path) -> dict:
    from retrac.checkpoints import with_scheduler

    return with_scheduler(resolve_checkpoint(path)).scheduler


def test_verify_index_checks_sizes_and_recorded_digests(world, tmp_path):
    build_attribution_index(world["store"], tmp_path / "index", "tracin", progress=False)
    index = tmp_path / "index"
    assert verify_index(index).whole
    manifest_path = index / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("digests"):  # record digests as a manifest of this kind would
        from retrac._io import file_sha256

        manifest["digests"] = {manifest.get("index_file", "index.faiss"): file_sha256(index / "index.faiss")}
        manifest_path.write_text(json.dumps(manifest))
    assert verify_index(index).whole
    flip_byte(index / manifest.get("index_file", "index.faiss"), offset=-3)  # same size, other bytes
    problems = verify_index(index).problems
    assert len(problems) == 1 and "sha256" in problems[0].message
