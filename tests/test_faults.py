"""Bad inputs and injected faults, table-driven: each is refused with a clean, one-line error.

Each row says how to make the bad input (or inject the fault), which error class must be raised and a
phrase of its message. Rows run ``retrac.cli.main`` in-process: the exit code must be 2, stderr one
``retrac VERB: error: ...`` line with the phrase and no traceback, and the error raised inside must be
of the expected class (every ``RetracError`` made during the run is recorded; the printed one is
checked). ``OSError`` rows are faults of the machine (a full disk) that the CLI reports as one line.

One tiny store and index are shared by the whole module; rows that damage something work on a copy
in their own ``tmp_path``, or edit a shared file that is restored when the row ends.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset, load_dataset
from retrac.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IndexDamagedError,
    RetracError,
    StoreDamagedError,
    StoreMismatchError,
)

N = 12
STORE_OPTIONS = ["--events", "stratified:1", "--projector", "dense", "--dim", "16", "--shard-rows", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ckpt = save_checkpoint(make_tiny_unet(seed=3), make_scheduler(), root / "ckpt", weight=0.5)
    generator = torch.Generator().manual_seed(5)
    train = ImageDataset(torch.rand(N, 1, 8, 8, generator=generator) * 2 - 1, [f"t{i}" for i in range(N)])
    train.save_npz(root / "train.npz")
    np.save(root / "queries.npy", (torch.rand(2, 8, 8, generator=generator) * 255).to(torch.uint8).numpy())
    index_args = ["--checkpoint", str(ckpt), "--data", str(root / "train.npz"), *STORE_OPTIONS]
    assert main(["index", *index_args, "--out", str(root / "store"), "--no-progress", "--threads", "1"]) == 0
    build = ["build", "--store", str(root / "store"), "--method", "retrac", "--no-progress"]
    assert main([*build, "--out", str(root / "retrac")]) == 0
    return World(root, ckpt, index_args)


@dataclass
class World:
    root: Path
    ckpt: Path
    index_args: list[str]

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def index(self) -> Path:
        return self.root / "retrac"

    @property
    def train(self) -> Path:
        return self.root / "train.npz"

    @property
    def queries(self) -> Path:
        return self.root / "queries.npy"


@dataclass
class Case:
    """What a row's ``make`` gets: the shared world, a private folder and the monkeypatch fixture."""

    w: World
    tmp: Path
    mp: pytest.MonkeyPatch
    restore: list[tuple[Path, bytes]]

    def edit(self, path: Path, data: bytes | str) -> None:
        """Change a shared file for this row only (restored when the row ends)."""
        self.restore.append((path, path.read_bytes()))
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    def copy(self, source: Path, name: str | None = None) -> Path:
        target = self.tmp / (name or source.name)
        shutil.copytree(source, target)
        return target

    def ckpt_copy(self) -> Path:
        return self.copy(self.w.ckpt, "ckpt")

    def store_copy(self) -> Path:
        return self.copy(self.w.store, "store")

    def npy(self, array: np.ndarray, name: str = "bad.npy") -> Path:
        np.save(self.tmp / name, array)
        return self.tmp / name

    def index_cmd(
        self, checkpoint: str | Path | None = None, *extra: str, data: Path | None = None
    ) -> list[str]:
        ckpt = str(self.w.ckpt if checkpoint is None else checkpoint)
        args = ["index", "--checkpoint", ckpt, "--data", str(data or self.w.train), *STORE_OPTIONS]
        return [*args, "--out", str(self.tmp / "out"), "--no-progress", *extra]

    def build_cmd(self, store: Path | None = None, *extra: str) -> list[str]:
        return [
            "build",
            "--store",
            str(store or self.w.store),
            "--out",
            str(self.tmp / "idx"),
            "--no-progress",
            *extra,
        ]

    def query_cmd(self, index: Path | None = None, *extra: str, images: Path | None = None) -> list[str]:
        return [
            "query",
            "--index",
            str(index or self.w.index),
            "--images",
            str(images or self.w.queries),
            "--query-events",
            "fast",
            "--k",
            "2",
            *extra,
        ]

    def report_cmd(self, *extra: str) -> list[str]:
        return [
            "report",
            "--index",
            str(self.w.index),
            "--images",
            str(self.w.queries),
            "--out",
            str(self.tmp / "report"),
            "--query-events",
            "fast",
            "--k",
            "2",
            "--no-progress",
            *extra,
        ]

    def audit_cmd(self, *extra: str, index: Path | None = None) -> list[str]:
        return [
            "audit",
            "--index",
            str(index or self.w.index),
            "--out",
            str(self.tmp / "audit"),
            "--query-events",
            "fast",
            "--k",
            "2",
            "--neighbours",
            "3",
            "--no-progress",
            *extra,
        ]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def flip(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _overwrite_head(path: Path) -> None:
    """Same size, garbage header: FAISS cannot parse it."""
    data = path.read_bytes()
    path.write_bytes(b"garbage!" * 2 + data[16:])


def chunk(store: Path, name: str, shard: int, k: int = 0) -> Path:
    return store / f"checkpoint-{k:02d}" / name / "c" / str(shard) / ("0/0" if name == "features" else "0")


def json_edit(path: Path, **changes) -> str:
    record = json.loads(path.read_text())
    record.update(changes)
    return json.dumps(record)


@dataclass(frozen=True)
class Row:
    name: str
    make: Callable[[Case], list[str]]  # returns the argv of `retrac`
    error: type[Exception]
    phrase: str  # a regular expression searched in the message
    fault: bool = False  # an injected fault (damaged file, full disk) rather than a bad argument


def _ckpt_with(file: str, content: str | None):
    """A checkpoint copy whose ``file`` holds ``content`` (``None``: removed)."""

    def make(c: Case) -> list[str]:
        ckpt = c.ckpt_copy()
        if content is None:
            (ckpt / file).unlink()
        else:
            (ckpt / file).write_text(content)
        return c.index_cmd(ckpt)

    return make


def _unet_config_misfit(c: Case) -> list[str]:
    ckpt = c.ckpt_copy()
    config = ckpt / "unet" / "config.json"
    config.write_text(json_edit(config, block_out_channels=[8, 24]))
    return c.index_cmd(ckpt)


def _truncated_weights(c: Case) -> list[str]:
    ckpt = c.ckpt_copy()
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    return c.index_cmd(ckpt)


def _second_checkpoint_other_scheduler(c: Case) -> list[str]:
    ckpt = c.ckpt_copy()
    config = ckpt / "scheduler" / "scheduler_config.json"
    config.write_text(json_edit(config, beta_end=0.05))
    return [*c.index_cmd(), "--checkpoint", str(ckpt)]


def _store_damage(damage: Callable[[Path], None]):
    def make(c: Case) -> list[str]:
        store = c.store_copy()
        damage(store)
        return c.build_cmd(store)

    return make


def _forged_entry(store: Path) -> None:
    # shard 1's data removed (never written), its ledger entry left in place
    for name in ("features", "norms", "timesteps", "valid"):
        chunk(store, name, 1).unlink()


def _old_format(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format"]["version"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))


def _read_only_out(c: Case) -> list[str]:
    target = c.tmp / "locked"
    target.mkdir()
    real_access = os.access
    c.mp.setattr(os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode))
    return [*c.build_cmd(), "--out", str(target)]


def _out_is_file(verb_cmd: str):
    def make(c: Case) -> list[str]:
        (c.tmp / "taken").write_text("a file")
        cmd = {
            "build": c.build_cmd,
            "report": c.report_cmd,
            "audit": lambda: c.audit_cmd("--images", str(c.w.queries)),
            "demo": lambda: ["demo", "--quick", "--no-progress"],
        }[verb_cmd]()
        return [*cmd, "--out", str(c.tmp / "taken")]

    return make


def _index_copy_with(damage: Callable[[Path], None]):
    def make(c: Case) -> list[str]:
        index = c.copy(c.w.index, "idx")
        damage(index)
        return c.query_cmd(index)

    return make


def _shared_scheduler_edit(**changes):
    def make(c: Case) -> list[str]:
        path = c.w.ckpt / "scheduler" / "scheduler_config.json"
        c.edit(path, json_edit(path, **changes))
        return c.query_cmd()

    return make


def _changed_weights(c: Case) -> list[str]:
    from safetensors.torch import load_file, save_file

    path = c.w.ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, str(c.tmp / "w.safetensors"))
    c.edit(path, (c.tmp / "w.safetensors").read_bytes())
    return c.query_cmd()


def _report_other_pixels(c: Case) -> list[str]:
    train = load_dataset(c.w.train)
    ImageDataset(-train.images, train.ids).save_npz(c.tmp / "other.npz")
    return [*c.report_cmd(), "--data", str(c.tmp / "other.npz")]


def _report_other_ids(c: Case) -> list[str]:
    train = load_dataset(c.w.train)
    ImageDataset(train.images, [f"x{i}" for i in range(N)]).save_npz(c.tmp / "other.npz")
    return [*c.report_cmd(), "--data", str(c.tmp / "other.npz")]


def _report_damaged_ids(c: Case) -> list[str]:
    store = c.store_copy()
    (store / "ids" / "c" / "0").unlink()
    return [*c.report_cmd(), "--store", str(store)]


def _pixel_cache(damage: Callable[[Path], None]):
    def make(c: Case) -> list[str]:
        from retrac.audit.pixel_index import PixelIndex

        # the pixel index of a previous audit into the same --out, reused by a rerun with --overwrite
        cache = c.tmp / "audit" / "pixel-index"
        PixelIndex.build(load_dataset(c.w.train)).save(cache)
        damage(cache)
        return c.audit_cmd("--images", str(c.w.queries), "--overwrite")

    return make


def _disk_full(target: str, attribute: str, cmd: Callable[[Case], list[str]]):
    def make(c: Case) -> list[str]:
        module, _, owner = target.rpartition(":")
        obj = __import__(module, fromlist=["_"])
        for part in filter(None, owner.split(".")):
            obj = getattr(obj, part)
        c.mp.setattr(obj, attribute, full_disk)
        return cmd(c)

    return make


def _ckpt_spec(suffix: str):
    return lambda c: c.index_cmd(f"{c.w.ckpt}={suffix}")


def _data(array_fn, name: str = "bad.npy"):
    return lambda c: c.index_cmd(data=c.npy(array_fn(), name))


def _npz_duplicate_ids(c: Case) -> list[str]:
    np.savez(c.tmp / "dup.npz", images=np.zeros((3, 8, 8), np.uint8), ids=np.array(["a", "b", "a"]))
    return c.index_cmd(data=c.tmp / "dup.npz")


def _other_settings(c: Case) -> list[str]:
    store = c.store_copy()
    cmd = c.index_cmd(None, "--dim", "8")
    cmd[cmd.index("--out") + 1] = str(store)
    return cmd


def _manifest_edit(reseal: bool, **changes):
    """Edit the index manifest's entries; ``reseal`` also recomputes its seal (a deliberate forgery)."""

    def damage(index: Path) -> None:
        from retrac.query.index import manifest_seal

        manifest = json.loads((index / "manifest.json").read_text())
        manifest.update(changes)
        if reseal:
            manifest["seal"] = manifest_seal(manifest)
        (index / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _store_entry_edit(**changes):
    def damage(index: Path) -> None:
        manifest = json.loads((index / "manifest.json").read_text())
        manifest["store"].update(changes)
        (index / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _scale_first_vector(index: Path) -> None:
    import faiss

    row = faiss.read_index(str(index / "index.faiss")).reconstruct(0).astype(np.float32)
    data = (index / "index.faiss").read_bytes()
    (index / "index.faiss").write_bytes(data.replace(row.tobytes(), (row * 50).tobytes(), 1))  # same size


def _built(c: Case, method: str, name: str) -> Path:
    from retrac.query.attribution import build_attribution_index

    build_attribution_index(c.w.store, c.tmp / name, method, progress=False)
    return c.tmp / name


def _other_builds_index_file(c: Case) -> list[str]:
    index = c.copy(c.w.index, "idx")
    shutil.copy(_built(c, "tracin", "tracin") / "index.faiss", index / "index.faiss")  # same size
    return c.query_cmd(index)


def _kernel_damage(damage: Callable[[Path], None]):
    def make(c: Case) -> list[str]:
        index = _built(c, "trak", "trak")
        damage(index)
        return c.query_cmd(index)

    return make


def _kernel_rewritten(index: Path) -> None:
    with np.load(index / "kernel.npz") as arrays:
        changed = {name: arrays[name] for name in arrays.files}
    changed["preconditioners"] = changed["preconditioners"] * 2
    with open(index / "kernel.npz", "wb") as handle:
        np.savez(handle, **changed)


def _stray_kernel(c: Case) -> list[str]:
    index = c.copy(c.w.index, "idx")
    shutil.copy(_built(c, "trak", "trak") / "kernel.npz", index / "kernel.npz")
    return c.query_cmd(index)


ROWS = [
    # ---- retrac index: checkpoints
    Row("index-checkpoint-missing", lambda c: c.index_cmd(c.tmp / "nope"), CheckpointError, "does not exist"),
    Row("index-weight-inf", _ckpt_spec("inf"), CheckpointError, "positive finite"),
    Row("index-weight-nan", _ckpt_spec("nan"), CheckpointError, "positive finite"),
    Row("index-weight-negative", _ckpt_spec("-2"), CheckpointError, "positive finite"),
    Row("index-weight-zero", _ckpt_spec("0"), CheckpointError, "positive finite"),
    Row("index-info-corrupt-json", _ckpt_with("retrac_checkpoint.json", '{"weight": 0.'), CheckpointError, "not valid JSON"),
    Row("index-info-weight-infinity", _ckpt_with("retrac_checkpoint.json", '{"weight": Infinity}'), CheckpointError, "positive finite"),
    Row("index-info-weight-text", _ckpt_with("retrac_checkpoint.json", '{"weight": "heavy"}'), CheckpointError, "positive finite"),
    Row("index-info-not-object", _ckpt_with("retrac_checkpoint.json", "[1, 2]"), CheckpointError, "not an object"),
    Row("index-info-step-text", _ckpt_with("retrac_checkpoint.json", '{"step": "ten"}'), CheckpointError, "must be an integer"),
    Row("index-scheduler-corrupt-json", _ckpt_with("scheduler/scheduler_config.json", '{"_class_name": '), CheckpointError, "not valid JSON"),
    Row("index-scheduler-unknown-class", _ckpt_with("scheduler/scheduler_config.json", '{"_class_name": "Nope"}'), CheckpointError, "not a diffusers scheduler"),
    Row("index-scheduler-bad-schedule", _ckpt_with("scheduler/scheduler_config.json", '{"_class_name": "DDPMScheduler", "beta_schedule": "wobbly"}'), CheckpointError, "cannot be loaded"),
    Row("index-scheduler-missing", _ckpt_with("scheduler/scheduler_config.json", None), CheckpointError, "no scheduler_config.json"),
    Row("index-unet-config-corrupt", _ckpt_with("unet/config.json", "{{"), CheckpointError, "cannot be read|not valid JSON"),
    Row("index-weights-misfit-config", _unet_config_misfit, CheckpointError, "does not fit its model config"),
    Row("index-weights-truncated", _truncated_weights, CheckpointError, "corrupt or truncated", fault=True),
    Row("index-second-checkpoint-other-scheduler", _second_checkpoint_other_scheduler, CheckpointError, "another scheduler .*beta_end"),
    # ---- retrac index: options
    Row("index-device-bogus", lambda c: c.index_cmd(None, "--device", "bogus"), ConfigError, "not a torch device"),
    Row("index-device-absent-gpu", lambda c: c.index_cmd(None, "--device", "cuda:99"), ConfigError, "(?i)cuda"),
    Row("index-threads-zero", lambda c: c.index_cmd(None, "--threads", "0"), ConfigError, "at least 1"),
    Row("index-shard-out-of-range", lambda c: c.index_cmd(None, "--shard", "3/2"), ConfigError, "out of range"),
    Row("index-shard-not-i-n", lambda c: c.index_cmd(None, "--shard", "half"), ConfigError, "is not I/N"),
    Row("index-dim-zero", lambda c: c.index_cmd(None, "--dim", "0"), ConfigError, "positive integer"),
    Row("index-shard-rows-zero", lambda c: c.index_cmd(None, "--shard-rows", "0"), ConfigError, "positive integer"),
    Row("index-events-garbage", lambda c: c.index_cmd(None, "--events", "sometimes"), ConfigError, "not understood"),
    Row("index-events-zero", lambda c: c.index_cmd(None, "--events", "stratified:0"), ConfigError, "at least one event"),
    # ---- retrac index: data
    Row("index-data-missing", lambda c: c.index_cmd(data=c.tmp / "none.npz"), DataError, "does not exist"),
    Row("index-data-zero-sized-images", _data(lambda: np.zeros((3, 0, 0), np.uint8)), DataError, "zero-sized axis"),
    Row("index-data-nan", _data(lambda: np.full((2, 8, 8), np.nan, np.float32)), DataError, "NaN or infinite"),
    Row("index-data-out-of-range", _data(lambda: np.full((2, 8, 8), 3.0, np.float32)), DataError, r"outside \[-1, 1\]"),
    Row("index-data-int32", _data(lambda: np.zeros((2, 8, 8), np.int32)), DataError, "not supported"),
    Row("index-data-no-images", _data(lambda: np.zeros((0, 8, 8), np.uint8)), DataError, "is empty"),
    Row("index-data-wrong-channels", _data(lambda: np.zeros((2, 3, 8, 8), np.uint8)), DataError, "model takes"),
    Row("index-data-duplicate-ids", _npz_duplicate_ids, DataError, "not unique"),
    Row("index-data-corrupt-file", lambda c: c.index_cmd(data=(c.tmp / "x.npy", (c.tmp / "x.npy").write_bytes(b"junk"))[0]), DataError, "cannot be read"),
    # ---- retrac index: the store
    Row("index-out-is-file", lambda c: [*c.index_cmd(), "--out", str(c.w.train)], ConfigError, "is a file"),
    Row("index-out-foreign-folder", lambda c: [*c.index_cmd(), "--out", str(c.w.index)], ConfigError, "not a retrac store"),
    Row("index-out-other-settings", _other_settings, StoreMismatchError, "dim"),
    Row("index-disk-full-shard", _disk_full("retrac.indexer.store:FeatureStore", "_write_region", lambda c: c.index_cmd()), OSError, "No space left", fault=True),
    Row("index-disk-full-ledger", _disk_full("retrac.indexer.store:", "atomic_write_text", lambda c: c.index_cmd()), OSError, "No space left", fault=True),
    # ---- retrac build: damaged or wrong stores
    Row("build-store-missing", lambda c: c.build_cmd(c.tmp / "none"), DataError, "not a retrac feature store"),
    Row("build-store-root-corrupt", _store_damage(lambda s: (s / "zarr.json").write_text("{")), DataError, "not a retrac feature store", fault=True),
    Row("build-store-old-format", _store_damage(_old_format), DataError, "format version 1"),
    Row("build-store-incomplete", _store_damage(lambda s: (s / "ledger/checkpoint-00/shard-000002.json").unlink()), DataError, "incomplete"),
    Row("build-flip-features", _store_damage(lambda s: flip(chunk(s, "features", 1))), StoreDamagedError, "shard 1 .*sha256", fault=True),
    Row("build-flip-norms", _store_damage(lambda s: flip(chunk(s, "norms", 2))), StoreDamagedError, "shard 2 .*(sha256|cannot be read)", fault=True),
    Row("build-delete-features-chunk", _store_damage(lambda s: chunk(s, "features", 0).unlink()), StoreDamagedError, "shard 0 .*recomputed", fault=True),
    Row("build-delete-valid-chunk", _store_damage(lambda s: chunk(s, "valid", 2).unlink()), StoreDamagedError, "shard 2 .*sha256", fault=True),
    Row("build-delete-timesteps-chunk", _store_damage(lambda s: chunk(s, "timesteps", 1).unlink()), StoreDamagedError, "shard 1 .*sha256", fault=True),
    Row("build-truncate-features", _store_damage(lambda s: chunk(s, "features", 1).write_bytes(b"\0" * 10)), StoreDamagedError, "cannot be read", fault=True),
    Row("build-delete-ids-chunk", _store_damage(lambda s: (s / "ids/c/0").unlink()), StoreDamagedError, "ids do not match", fault=True),
    Row("build-entry-for-data-never-written", _store_damage(_forged_entry), StoreDamagedError, "never written", fault=True),
    Row("build-ledger-corrupt-json", _store_damage(lambda s: (s / "ledger/checkpoint-00/shard-000001.json").write_text("{")), StoreDamagedError, "cannot be read", fault=True),
    Row("build-array-missing", _store_damage(lambda s: shutil.rmtree(s / "checkpoint-00" / "norms")), StoreDamagedError, "norms", fault=True),
    # ---- retrac build: options and output
    Row("build-kernel-inf", lambda c: c.build_cmd(None, "--kernel", "inf"), ConfigError, "positive and finite"),
    Row("build-kernel-nan", lambda c: c.build_cmd(None, "--kernel", "nan"), ConfigError, "positive and finite"),
    Row("build-kernel-zero", lambda c: c.build_cmd(None, "--kernel", "0"), ConfigError, "positive and finite"),
    Row("build-kernel-negative", lambda c: c.build_cmd(None, "--kernel", "-1"), ConfigError, "positive and finite"),
    Row("build-dtrak-on-loss-store", lambda c: c.build_cmd(None, "--method", "dtrak"), StoreMismatchError, "sqnorm"),
    Row("build-out-is-file", _out_is_file("build"), ConfigError, "existing file"),
    Row("build-out-under-a-file", lambda c: [*c.build_cmd(), "--out", str(c.w.train / "idx")], ConfigError, "existing file"),
    Row("build-out-read-only", _read_only_out, ConfigError, "not writable"),
    Row("build-disk-full-index", _disk_full("faiss:", "write_index", lambda c: c.build_cmd()), OSError, "No space left", fault=True),
    Row("build-disk-full-kernel", _disk_full("numpy:", "savez", lambda c: c.build_cmd(None, "--method", "trak")), OSError, "No space left", fault=True),
    # ---- retrac query
    Row("query-manifest-corrupt", _index_copy_with(lambda i: (i / "manifest.json").write_text('{"method": ')), DataError, "not valid JSON", fault=True),
    Row("query-manifest-not-object", _index_copy_with(lambda i: (i / "manifest.json").write_text("[]")), DataError, "not an attribution index manifest"),
    Row("query-index-file-garbage", _index_copy_with(lambda i: _overwrite_head(i / "index.faiss")), DataError, "(?i)build the index again|rebuild", fault=True),
    Row("query-index-file-truncated", _index_copy_with(lambda i: (i / "index.faiss").write_bytes(b"IxF")), DataError, "(?i)build the index again|rebuild", fault=True),
    Row("query-scheduler-prediction-type-edited", _shared_scheduler_edit(prediction_type="v_prediction"), StoreMismatchError, "prediction_type: recorded 'epsilon'", fault=True),
    Row("query-scheduler-betas-edited", _shared_scheduler_edit(beta_start=0.001, beta_end=0.05), StoreMismatchError, "beta_end: recorded 0.02, now 0.05; beta_start", fault=True),
    Row("query-scheduler-corrupt-json", lambda c: (c.edit(c.w.ckpt / "scheduler/scheduler_config.json", "{"), c.query_cmd())[1], CheckpointError, "not valid JSON", fault=True),
    Row("query-weights-changed", _changed_weights, StoreMismatchError, "not the checkpoint that was indexed", fault=True),
    Row("query-device-bogus", lambda c: c.query_cmd(None, "--device", "bogus"), ConfigError, "not a torch device"),
    Row("query-threads-zero", lambda c: c.query_cmd(None, "--threads", "0"), ConfigError, "at least 1"),
    Row("query-images-missing", lambda c: c.query_cmd(images=c.tmp / "none.npy"), DataError, "does not exist"),
    Row("query-images-zero-sized", lambda c: c.query_cmd(images=c.npy(np.zeros((2, 0, 0), np.uint8))), DataError, "zero-sized axis"),
    Row("query-images-wrong-size", lambda c: c.query_cmd(images=c.npy(np.zeros((2, 16, 16), np.uint8))), DataError, "model takes"),
    Row("query-k-zero", lambda c: c.query_cmd(None, "--k", "0"), ConfigError, "k=0"),
    # ---- retrac query: a tampered or damaged index (docs/design.md section 6)
    Row("query-manifest-method-relabelled", _index_copy_with(_manifest_edit(False, method={"name": "tracin", "vectors": "tracin", "kernel_c": None})), IndexDamagedError, "edited after the index was built", fault=True),
    Row("query-manifest-relabel-resealed", _index_copy_with(_manifest_edit(True, method={"name": "tracin", "vectors": "tracin", "kernel_c": None})), IndexDamagedError, "rows hold retrac vectors.*names method 'tracin'", fault=True),
    Row("query-manifest-kernel-added-resealed", _index_copy_with(_manifest_edit(True, method={"name": "retrac+kernel", "vectors": "retrac", "kernel_c": 0.1})), IndexDamagedError, "holds no kernel.npz", fault=True),
    Row("query-manifest-digests-removed", _index_copy_with(_manifest_edit(False, digests={})), IndexDamagedError, "edited after the index was built", fault=True),
    Row("query-manifest-store-fingerprint-edited", _index_copy_with(_store_entry_edit(fingerprint="0" * 64)), StoreMismatchError, "store.fingerprint", fault=True),
    Row("query-manifest-store-path-removed", _index_copy_with(_manifest_edit(False, store={"fingerprint": "0" * 64})), DataError, "not an attribution index manifest", fault=True),
    Row("query-manifest-old-format", _index_copy_with(_manifest_edit(False, format_version=1)), StoreMismatchError, "version 1; this retrac reads .* version 2.*retrac build"),
    Row("query-index-vector-scaled", _index_copy_with(_scale_first_vector), IndexDamagedError, "index.faiss has sha256 .*retrac build --store", fault=True),
    Row("query-index-file-of-another-build", _other_builds_index_file, IndexDamagedError, "index.faiss has sha256", fault=True),
    Row("query-index-file-deleted", _index_copy_with(lambda i: (i / "index.faiss").unlink()), IndexDamagedError, "index.faiss is missing", fault=True),
    Row("query-kernel-deleted", _kernel_damage(lambda i: (i / "kernel.npz").unlink()), IndexDamagedError, "kernel.npz is missing", fault=True),
    Row("query-kernel-rewritten", _kernel_damage(_kernel_rewritten), IndexDamagedError, "kernel.npz has (sha256|.* bytes)", fault=True),
    Row("query-kernel-stray-file", _stray_kernel, IndexDamagedError, "not part of this index's build record", fault=True),
    Row("query-index-folder-empty", lambda c: c.query_cmd((c.tmp / "empty", (c.tmp / "empty").mkdir())[0]), DataError, "no manifest.json"),
    Row("query-k-above-n", lambda c: c.query_cmd(None, "--k", str(N + 1)), ConfigError, rf"k={N + 1} must lie in \[1, {N}\]"),
    Row("query-k-negative", lambda c: c.query_cmd(None, "--k", "-3"), ConfigError, "k=-3"),
    # ---- retrac report
    Row("report-data-same-ids-other-pixels", _report_other_pixels, DataError, "same ids but other pixels"),
    Row("report-data-other-ids", _report_other_ids, DataError, "other ids|the ids differ"),
    Row("report-store-ids-damaged", _report_damaged_ids, StoreDamagedError, "ids", fault=True),
    Row("report-out-is-file", _out_is_file("report"), ConfigError, "existing file"),
    Row("report-threads-zero", lambda c: c.report_cmd("--threads", "0"), ConfigError, "at least 1"),
    Row("report-device-bogus", lambda c: c.report_cmd("--device", "bogus"), ConfigError, "not a torch device"),
    Row("report-disk-full", _disk_full("matplotlib.figure:Figure", "savefig", lambda c: c.report_cmd()), OSError, "No space left", fault=True),
    # ---- retrac audit
    Row("audit-sampling-steps-negative", lambda c: c.audit_cmd("--generate", "1", "--sampling-steps", "-5"), ConfigError, "at least 1"),
    Row("audit-sampling-steps-zero", lambda c: c.audit_cmd("--generate", "1", "--sampling-steps", "0"), ConfigError, "at least 1"),
    Row("audit-sampling-steps-above-T", lambda c: c.audit_cmd("--generate", "1", "--sampling-steps", "1000"), ConfigError, r"in \[1, 100\]"),
    Row("audit-out-is-file", _out_is_file("audit"), ConfigError, "existing file"),
    Row("audit-device-bogus", lambda c: c.audit_cmd("--images", str(c.w.queries), "--device", "bogus"), ConfigError, "not a torch device"),
    Row("audit-threads-zero", lambda c: c.audit_cmd("--images", str(c.w.queries), "--threads", "0"), ConfigError, "at least 1"),
    Row("audit-pixel-cache-manifest-corrupt", _pixel_cache(lambda d: (d / "manifest.json").write_text('{"format"')), DataError, "not valid JSON", fault=True),
    Row("audit-pixel-cache-faiss-corrupt", _pixel_cache(lambda d: (d / "pixels.faiss").write_bytes(b"\0" * 64)), DataError, "damaged", fault=True),
    Row("audit-pixel-cache-rows-corrupt", _pixel_cache(lambda d: (d / "rows.npz").write_bytes(b"PK junk")), DataError, "damaged", fault=True),
    # ---- retrac demo / verify
    Row("demo-out-is-file", _out_is_file("demo"), ConfigError, "existing file"),
    Row("demo-threads-zero", lambda c: ["demo", "--quick", "--threads", "0", "--out", str(c.tmp / "d")], ConfigError, "at least 1"),
    Row("verify-neither-store-nor-index", lambda c: ["verify", str(c.tmp)], ConfigError, "neither a feature store"),
]  # fmt: skip


def test_the_table_covers_enough_inputs_and_faults():
    names = [row.name for row in ROWS]
    assert len(set(names)) == len(names)
    assert len(ROWS) >= 60 and sum(row.fault for row in ROWS) >= 20


@pytest.fixture
def case(world, tmp_path, monkeypatch):
    restore: list[tuple[Path, bytes]] = []
    yield Case(world, tmp_path, monkeypatch, restore)
    for path, data in reversed(restore):
        path.write_bytes(data)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_gets_one_clean_line(row: Row, case: Case, capsys):
    made: list[RetracError] = []
    original = RetracError.__init__

    def record(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    argv = row.make(case)
    case.mp.setattr(RetracError, "__init__", record)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"retrac {argv[0]}: error: "), err
    message = err.split(": error: ", 1)[1]
    assert __import__("re").search(row.phrase, message), message
    printed = [e for e in made if str(e) and str(e) in err]
    if row.error is OSError:
        assert not printed, printed  # the machine's fault, reported as such
    else:
        assert printed and isinstance(printed[-1], row.error), (printed, row.error)


def test_a_16_bit_grayscale_png_loads_as_one_channel(tmp_path):
    from PIL import Image

    pixels = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.fromarray((pixels // 257).astype(np.uint8)).save(tmp_path / "shallow.png")
    data = load_dataset(tmp_path)
    assert data.images.shape == (2, 1, 8, 8)  # not reported as 3-channel
    deep, shallow = data.images[0, 0].numpy(), data.images[1, 0].numpy()
    assert np.allclose(deep, pixels / 32767.5 - 1, atol=1e-6)  # all 16 bits kept
    assert np.abs(deep - shallow).max() < 2 / 255 + 1e-6  # the same picture at 8 bits


def test_audit_keeps_its_pixel_index_in_its_folder_and_never_writes_beside_the_index(
    world, tmp_path, monkeypatch
):
    from retrac.audit import pixel_index

    index = tmp_path / "shelf" / "retrac"
    shutil.copytree(world.index, index)
    real = pixel_index.atomic_write_via

    def read_only_shelf(path, write):
        if Path(path).is_relative_to(tmp_path / "shelf"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, write)

    monkeypatch.setattr(pixel_index, "atomic_write_via", read_only_shelf)
    out = tmp_path / "audit"
    argv = ["audit", "--index", str(index), "--images", str(world.queries), "--out", str(out)]
    argv += ["--query-events", "fast", "--k", "2", "--neighbours", "3", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pixel_index"] == "pixel-index" and (out / "pixel-index" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "shelf").iterdir()) == ["retrac"]
    # a rerun into the same --out (with --overwrite) reuses the pixel index instead of building it
    monkeypatch.setattr(
        pixel_index.PixelIndex, "build", classmethod(lambda cls, train: pytest.fail("rebuilt"))
    )
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "pixel-index" / "manifest.json").is_file()
