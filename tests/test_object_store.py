"""Stores on object storage (a real S3 implementation, the moto server, on 127.0.0.1) and compact stores.

Relations: a store featurized to ``s3://`` holds the local store's data (same ledger digests), and the
index built from it answers queries with the local store's scores and rows; ``memory://`` and
``file://`` URLs open the same way; an unreachable endpoint is a one-line error. A compact store's
scores equal the full store's for every method, and uses that need per-event features are refused.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.errors import CompactStoreError, DataError, GradientError
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index

N = 10
SMALL = {"events": "stratified:3", "projector": "dense", "dim": 16, "shard_rows": 4, "batch_size": 4}
BUCKET = "retrac-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket, and the AWS_* variables obstore reads;
    skipped, saying why, when it cannot start."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        pytest.skip(
            f"the local S3 server cannot start: moto[server] is not installed ({error}); pip install 'moto[server]'"
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        server.start()
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10
        ).read()
    except Exception as error:  # noqa: BLE001 - any failure to start is a reason to skip, printed
        server.stop()
        pytest.skip(f"the local S3 server (moto) cannot start on {endpoint}: {type(error).__name__}: {error}")
    variables = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    checkpoints = [
        resolve_checkpoint(
            save_checkpoint(make_tiny_unet(seed=k), make_scheduler(), root / f"ckpt-{k}", 0.1, 5 * (k + 1))
        )
        for k in range(2)
    ]
    generator = torch.Generator().manual_seed(2)
    images = torch.rand((N, 1, 8, 8), generator=generator) * 2 - 1
    ImageDataset(images, [f"z{i}" for i in range(N)], source="test").save_npz(root / "train.npz")
    queries = torch.rand((3, 1, 8, 8), generator=generator) * 2 - 1
    local = featurize_dataset(
        checkpoints, root / "train.npz", root / "local", IndexConfig(**SMALL), progress=False
    )
    return {
        "root": root,
        "checkpoints": checkpoints,
        "npz": root / "train.npz",
        "local": local,
        "queries": queries,
    }


def featurize(world, out, **overrides):
    config = IndexConfig(**{**SMALL, **overrides})
    return featurize_dataset(world["checkpoints"], world["npz"], out, config, progress=False)


def ledger(store: FeatureStore) -> list[str]:
    return [
        store.ledger_entry(k, s)["sha256"]
        for k in range(store.num_checkpoints)
        for s in range(store.num_shards)
    ]


def attribute(world, store, out: Path, method: str = "retrac"):
    build_attribution_index(store, out, method, index="flat", progress=False)
    attributor = Attributor(out, store=store.url, query_events=QueryEvents(2, 1), progress=False)
    result = attributor.attribute(world["queries"], k=4)
    return result.scores, result.indices


def test_s3_store_round_trip_equals_the_local_store(world, s3_endpoint, tmp_path):
    url = f"s3://{BUCKET}/stores/round-trip"
    remote = featurize(world, url)
    assert remote.url == url and remote.is_complete and not remote.location.is_local
    assert ledger(remote) == ledger(world["local"])  # the same bytes, digest for digest
    assert not remote.location.list("claims/checkpoint-00")
    reopened = FeatureStore.open(url)
    assert reopened.fingerprint == world["local"].fingerprint
    np.testing.assert_array_equal(reopened.features(1), world["local"].features(1))
    remote_scores, remote_rows = attribute(world, reopened, tmp_path / "remote-index")
    local_scores, local_rows = attribute(world, world["local"], tmp_path / "local-index")
    np.testing.assert_array_equal(remote_rows, local_rows)
    np.testing.assert_array_equal(remote_scores, local_scores)
    # rerunning into the finished store computes nothing and changes nothing
    assert ledger(featurize(world, url)) == ledger(remote)


def test_s3_work_stealing_and_cli(world, s3_endpoint, capsys):
    url = f"s3://{BUCKET}/stores/cli"
    argv = [
        "index",
        "--data",
        str(world["npz"]),
        "--out",
        url,
        "--no-progress",
        "--shard",
        "auto",
        "--threads",
        "1",
    ]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for checkpoint in world["checkpoints"]:
        argv += ["--checkpoint", f"{checkpoint.path}={checkpoint.weight}"]
    assert main(argv) == 0
    assert "complete" in capsys.readouterr().out
    store = FeatureStore.open(url)
    assert ledger(store) == ledger(world["local"])
    assert not store.location.list("claims/checkpoint-00") and not store.location.list("claims/checkpoint-01")
    assert main(["verify", url]) == 0  # every shard's digest checked on the object store
    assert "is whole" in capsys.readouterr().out


def test_memory_and_file_urls_open_like_paths(world, tmp_path):
    in_memory = featurize(world, "memory://retrac-test/store")
    assert ledger(in_memory) == ledger(world["local"])
    by_url = FeatureStore.open(f"file://{world['local'].path}")
    assert by_url.path == world["local"].path and ledger(by_url) == ledger(world["local"])


def test_an_unreachable_store_url_is_a_one_line_error(world, monkeypatch, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens here once the probe is closed
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(name, value)
    argv = ["build", "--store", "s3://nowhere/store", "--out", str(world["root"] / "never"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot be accessed" in err and "AWS_ENDPOINT_URL" in err and "Traceback" not in err
    with pytest.raises(DataError, match="cannot be accessed"):
        FeatureStore.open("s3://nowhere/store")


@pytest.mark.parametrize("method", ["tracin", "retrac", "trak"])
def test_compact_store_scores_equal_the_full_store(world, tmp_path, method):
    compact = featurize(world, tmp_path / "compact", layout="compact")
    full = world["local"]
    assert compact.layout == "compact" and compact.fingerprint != full.fingerprint
    full_bytes = full.num_samples * full.num_events * full.dim * 4
    compact_bytes = compact.num_samples * 2 * compact.dim * 4
    assert full_bytes / compact_bytes == full.num_events / 2  # S / 2 times less feature data
    for k in range(full.num_checkpoints):
        np.testing.assert_array_equal(compact.norms(k), full.norms(k))  # the bias report's inputs are kept
        for kind in ("tracin", "retrac"):
            np.testing.assert_array_equal(compact.train_vectors(k, kind), full.train_vectors(k, kind))
    compact_scores, compact_rows = attribute(world, compact, tmp_path / "compact-index", method)
    full_scores, full_rows = attribute(world, full, tmp_path / "full-index", method)
    np.testing.assert_array_equal(compact_rows, full_rows)
    np.testing.assert_array_equal(compact_scores, full_scores)


def test_a_compact_store_refuses_per_event_uses(world, tmp_path):
    compact = featurize(world, tmp_path / "compact", layout="compact")
    with pytest.raises(CompactStoreError, match="--layout full"):
        compact.features(0)
    assert not (Path(compact.path) / "checkpoint-00" / "features").exists()
    # its shards are digest-checked like a full store's, and a rerun recomputes nothing
    assert all(compact.shard_problem(k, s) is None for k in range(2) for s in range(compact.num_shards))
    before = ledger(compact)
    assert ledger(featurize(world, tmp_path / "compact", layout="compact")) == before
    # reopening it with the full layout names the difference
    with pytest.raises(Exception, match="layout"):
        featurize(world, tmp_path / "compact")


@pytest.mark.filterwarnings("ignore")  # a 2-list IVF over 10 rows: faiss warns about the tiny training set
@pytest.mark.parametrize("kind", ["IVF2,SQ8", "HNSW8,SQ8"])
def test_attributor_rerank_gives_exact_scores_from_the_store(world, tmp_path, kind):
    store = world["local"]
    flat_scores, flat_rows = attribute(world, store, tmp_path / "flat")
    build_attribution_index(store, tmp_path / "sq8", "retrac", index=kind, progress=False)
    attributor = Attributor(tmp_path / "sq8", store=store.url, query_events=QueryEvents(2, 1), progress=False)
    reranked = attributor.attribute(world["queries"], k=4, rerank=N)  # every row a candidate
    np.testing.assert_array_equal(reranked.indices, flat_rows)
    np.testing.assert_allclose(reranked.scores, flat_scores, rtol=1e-5, atol=1e-6)


def test_streamed_train_vectors_name_a_sample_with_a_zero_norm(world, monkeypatch):
    store = FeatureStore.open(world["local"].path)
    block = store.read_shard(0, 1)  # rows 4-7
    block.norms[1, 0] = 0.0
    monkeypatch.setattr(store, "blocks", lambda k, block_rows=None, rows=None: iter([block]))
    with pytest.raises(GradientError, match="'z5'"):  # the ids are read only for this message
        list(store.vector_blocks(0, "retrac"))
    assert len(list(store.vector_blocks(0, "tracin"))) == 1  # TracIn needs no norm
