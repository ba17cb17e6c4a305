"""retrac lds: the LDS formula, cached and resumable subset models, the command trainer, the
counterfactual check, and index scores over every training sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from retrac.cli import main
from retrac.demo import DemoConfig, digits_dataset
from retrac.errors import ConfigError, DataError, StoreMismatchError
from retrac.events import derive_seed
from retrac.lds import (
    CommandTrainer,
    DemoTrainer,
    LDSConfig,
    LDSRun,
    counterfactual_check,
    draw_subsets,
    index_scores,
    lds_score,
    linear_datamodeling_scores,
    pixel_scores,
    random_scores,
)
from retrac.lds.counterfactual import removal_model_name
from retrac.lds.metrics import bootstrap_interval, spearman_columns

TINY_RECIPE = DemoConfig(epochs=1, batch_size=4, num_checkpoints=1)
TINY_LDS = LDSConfig(num_subsets=4, alpha=0.5, seed=0, loss_timesteps=4, loss_noise=1)


@pytest.fixture(scope="module")
def digits():
    data = digits_dataset()
    return data.subset(range(12)), data.subset(range(12, 15))


class CountingTrainer:
    """The demo trainer that counts its calls and can fail on the n-th one (an injected crash)."""

    def __init__(self, data, fail_on_call: int | None = None) -> None:
        self.inner = DemoTrainer(data, TINY_RECIPE)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, rows, out_dir) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            (Path(out_dir) / "partial").write_text("half-written")
            raise RuntimeError("injected crash mid-run")
        self.inner(rows, out_dir)

    def to_dict(self) -> dict:
        return self.inner.to_dict()


# ---------------------------------------------------------------------------------------------- formula


def test_lds_of_a_score_matrix_equals_the_hand_computed_value():
    # 4 training samples, 4 subsets (rows), 2 test samples.
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=bool)
    scores = np.array([[1.0, 2.0, 4.0, 8.0], [3.0, 0.0, 1.0, -1.0]])
    # predicted effects g(S_m; z') = sum of the subset's scores:
    #   test 0: [3, 6, 12, 9] -> ranks [1, 2, 4, 3];  test 1: [3, 1, 0, 2] -> ranks [4, 2, 1, 3]
    losses = np.array([[0.9, 0.2], [0.7, 0.4], [0.1, 0.3], [0.5, 0.1]])
    # -loss:  test 0: [-.9, -.7, -.1, -.5] -> ranks [1, 2, 4, 3]: rho = 1
    #         test 1: [-.2, -.4, -.3, -.1] -> ranks [3, 1, 2, 4]: d = [1, 1, -1, -1],
    #         rho = 1 - 6 * 4 / (4 * 15) = 0.6
    per_test = linear_datamodeling_scores(scores, masks, losses)
    np.testing.assert_allclose(per_test, [1.0, 0.6])
    result = lds_score("hand", scores, masks, losses)
    assert result.lds == pytest.approx(0.8)
    assert result.ci_low <= result.lds <= result.ci_high
    assert result.num_valid == 2 and result.num_subsets == 4
    # rows: the score of a split is the mean over its test rows only
    assert lds_score("hand", scores, masks, losses, rows=[1]).lds == pytest.approx(0.6)
    # the sign: scores that predict the opposite ordering give the opposite LDS
    assert lds_score("neg", -scores, masks, losses).lds == pytest.approx(-0.8)


def test_test_specific_lds_removes_each_subsets_common_effect():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=bool)
    scores = np.array([[1.0, 2.0, 4.0, 8.0], [3.0, 0.0, 1.0, -1.0]])
    losses = np.array([[0.9, 0.2], [0.7, 0.4], [0.1, 0.3], [0.5, 0.1]])
    # centered, two tests: test 0 correlates g0 - g1 = [0, 5, 12, 7] (ranks [1, 2, 4, 3]) with
    # l1 - l0 = [-.7, -.3, .2, -.4] (ranks [1, 3, 4, 2]): d = [0, -1, 0, 1], rho = 1 - 6 * 2 / 60 = 0.8;
    # test 1 correlates the negated pair, the same 0.8.
    np.testing.assert_allclose(linear_datamodeling_scores(scores, masks, losses, centered=True), [0.8, 0.8])
    result = lds_score("hand", scores, masks, losses, centered=True)
    assert result.lds == pytest.approx(0.8) and result.centered
    # Relation: a loss change common to every test sample of a subset moves the LDS, not the
    # test-specific LDS.
    shifted = losses + np.array([[0.0], [0.5], [-0.3], [0.2]])
    assert lds_score("s", scores, masks, shifted).lds != pytest.approx(result.lds)
    assert lds_score("s", scores, masks, shifted, centered=True).lds == pytest.approx(0.8)
    # a scoring that is the same for every test sample has no test-specific part
    with pytest.raises(DataError):
        lds_score("same", np.repeat(scores[:1], 2, axis=0), masks, losses, centered=True)
    with pytest.raises(DataError, match="two test samples"):
        linear_datamodeling_scores(scores[:1], masks, losses[:, :1], centered=True)


def test_spearman_matches_scipy_with_ties_and_is_nan_for_a_constant_column():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (20, 3)).astype(float)  # ties
    y = rng.standard_normal((20, 3))
    x[:, 2] = 1.0
    rho = spearman_columns(x, y)
    for j in range(2):
        assert rho[j] == pytest.approx(spearmanr(x[:, j], y[:, j]).statistic)
    assert np.isnan(rho[2])
    with pytest.raises(DataError):
        spearman_columns(x, y[:5])


def test_lds_validates_shapes_and_excludes_undefined_test_samples():
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    losses = np.array([[1.0, 2.0], [2.0, 1.0], [0.5, 0.5]])
    scores = np.array([[1.0, 0.0], [0.0, 0.0]])  # test 1: every prediction 0 -> undefined
    result = lds_score("s", scores, masks, losses)
    assert result.num_valid == 1 and np.isnan(result.per_test[1])
    with pytest.raises(DataError):
        lds_score("s", np.zeros((2, 2)), masks, losses)  # nothing defined
    with pytest.raises(DataError):
        linear_datamodeling_scores(scores[:, :1], masks, losses)
    with pytest.raises(DataError):
        linear_datamodeling_scores(scores, masks, losses[:2])
    with pytest.raises(DataError):
        linear_datamodeling_scores(np.full((2, 2), np.nan), masks, losses)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).standard_normal(50)
    low, high = bootstrap_interval(values, 500, seed=3)
    assert (low, high) == bootstrap_interval(values, 500, seed=3)
    assert low < values.mean() < high
    assert bootstrap_interval(np.full(10, 0.25), 100) == (pytest.approx(0.25), pytest.approx(0.25))


def test_subsets_are_seeded_distinct_and_sized():
    a = draw_subsets(10, 6, 0.5, seed=4)
    assert a.shape == (6, 5)
    assert all(np.unique(row).size == 5 and (np.diff(row) > 0).all() for row in a)
    np.testing.assert_array_equal(a, draw_subsets(10, 6, 0.5, seed=4))
    assert not np.array_equal(a, draw_subsets(10, 6, 0.5, seed=5))
    with pytest.raises(ConfigError):
        draw_subsets(3, 4, 0.1, seed=0)  # empty subsets
    with pytest.raises(ConfigError):
        LDSConfig(num_subsets=2)
    with pytest.raises(ConfigError):
        LDSConfig(alpha=1.0)
    with pytest.raises(ConfigError):
        LDSConfig(objective="sqnorm")


def test_pixel_and_random_baselines():
    train = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    test = torch.tensor([[[[1.0, 0.0]]]])
    np.testing.assert_allclose(pixel_scores(test, train, "neg_l2"), [[0.0, -np.sqrt(2), -np.sqrt(0.5)]])
    np.testing.assert_allclose(pixel_scores(test, train, "cosine"), [[1.0, 0.0, np.sqrt(0.5)]])
    with pytest.raises(ConfigError):
        pixel_scores(test, train, "l1")
    np.testing.assert_array_equal(random_scores(2, 3, seed=1), random_scores(2, 3, seed=1))


# ---------------------------------------------------------------------------------------------- the run


def test_subset_models_are_cached_and_reused_not_retrained(tmp_path, digits):
    train, test = digits
    first = CountingTrainer(train)
    run = LDSRun(tmp_path / "run", train, first, TINY_LDS, progress=False)
    losses = run.losses(test.images)
    assert losses.shape == (4, 3) and np.isfinite(losses).all()
    assert first.calls == 4 and run.trained == run.subset_names
    record = json.loads((tmp_path / "run" / "models" / "subset-002" / "lds_model.json").read_text())
    assert record["num_rows"] == 6

    never = CountingTrainer(train, fail_on_call=1)  # any call would raise
    again = LDSRun(tmp_path / "run", train, never, TINY_LDS, progress=False)
    np.testing.assert_array_equal(again.losses(test.images), losses)
    assert never.calls == 0 and again.trained == []
    (tmp_path / "run" / "losses").rename(tmp_path / "old-losses")  # measured again from the cached models
    np.testing.assert_array_equal(again.losses(test.images), losses)
    assert never.calls == 0

    with pytest.raises(StoreMismatchError, match="config.alpha"):
        LDSRun(tmp_path / "run", train, never, LDSConfig(num_subsets=4, alpha=0.25), progress=False)
    with pytest.raises(StoreMismatchError, match="data.fingerprint"):
        LDSRun(tmp_path / "run", digits_dataset().subset(range(1, 13)), never, TINY_LDS, progress=False)
    with pytest.raises(StoreMismatchError, match="other training rows"):
        again.model("subset-000", again.subsets[1])


def test_an_exception_mid_run_resumes_with_the_same_lds(tmp_path, digits):
    train, test = digits
    scores = pixel_scores(test.images, train.images)
    reference = LDSRun(tmp_path / "reference", train, CountingTrainer(train), TINY_LDS, progress=False)
    expected = lds_score("pixel", scores, reference.masks(), reference.losses(test.images))

    crashing = CountingTrainer(train, fail_on_call=3)
    run = LDSRun(tmp_path / "run", train, crashing, TINY_LDS, progress=False)
    with pytest.raises(RuntimeError, match="injected"):
        run.losses(test.images)
    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["subset-000", "subset-001"]  # nothing half-written

    resumed_trainer = CountingTrainer(train)
    resumed = LDSRun(tmp_path / "run", train, resumed_trainer, TINY_LDS, progress=False)
    result = lds_score("pixel", scores, resumed.masks(), resumed.losses(test.images))
    assert resumed_trainer.calls == 2 and resumed.trained == ["subset-002", "subset-003"]
    assert result.lds == expected.lds
    np.testing.assert_array_equal(result.per_test, expected.per_test)


def test_counterfactual_check_on_a_tiny_model(tmp_path, digits):
    train, test = digits
    trainer = CountingTrainer(train)
    run = LDSRun(tmp_path / "run", train, trainer, TINY_LDS, progress=False)
    images = test.images[:2]
    scores = pixel_scores(images, train.images)
    result = counterfactual_check(run, scores, images, k=3, name="pixel")
    assert trainer.calls == 1 + 2 + 2  # the full model, then one top and one random removal per image
    record = result.to_dict()
    assert record["n_test"] == 2 and record["k"] == 3
    np.testing.assert_allclose(result.delta_top, result.loss_without_top - result.loss_full)
    # the top-removal model was trained on every row but the image's 3 most similar ones
    top = np.argsort(-scores[0], kind="stable")[:3]
    kept = json.loads((run.path / "models" / removal_model_name(top) / "lds_model.json").read_text())
    assert kept["num_rows"] == len(train) - 3
    full = run.model_losses("full", np.arange(len(train)), images[:1]).mean()
    assert result.loss_full[0] == full
    assert np.isfinite(result.delta_random).all()

    # Relation: a scoring whose top-3 are exactly the random removals gives equal deltas, and the
    # check trains no new model (removals are shared through the cache).
    rerun = counterfactual_check(run, scores, images, k=3, name="pixel")
    assert trainer.calls == 5
    np.testing.assert_array_equal(rerun.loss_without_top, result.loss_without_top)
    rng = np.random.default_rng(derive_seed("retrac-lds-counterfactual", 0, 0, 3))
    random_rows = rng.choice(len(train), 3, replace=False)
    rigged = np.zeros_like(scores)
    rigged[0, random_rows] = 1.0
    same = counterfactual_check(run, rigged[:1], images[:1], k=3, name="rigged")
    assert trainer.calls == 5
    assert same.delta_top[0] == same.delta_random[0] == result.delta_random[0]
    with pytest.raises(ConfigError):
        counterfactual_check(run, scores, images, k=len(train))


# ---------------------------------------------------------------------------------------------- command form

COPY_MODEL_SCRIPT = textwrap.dedent(
    """
    # A stand-in training command: copies a base model and perturbs its weights by the subset's mean
    # row (so each subset gives another model), without importing torch. With KILL_FILE present, the
    # second call kills the retrac process that ran it (SIGKILL), as a crash of the machine would.
    import os, shutil, signal, sys
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import load_file, save_file

    subset_file, out_dir, base, counter, kill_file = sys.argv[1:6]
    rows = np.array([int(r) for r in Path(subset_file).read_text().split()])
    calls = int(Path(counter).read_text()) + 1 if Path(counter).exists() else 1
    Path(counter).write_text(str(calls))
    if calls == 2 and Path(kill_file).exists():
        os.remove(kill_file)
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(1)
    for part in ("unet", "scheduler"):
        shutil.copytree(Path(base) / part, Path(out_dir) / part)
    weights = Path(out_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    scale = 1 + 0.05 * (rows.mean() - 5.5)
    save_file({k: (v * scale).astype(v.dtype) for k, v in state.items()}, str(weights))
    """
)


@pytest.fixture(scope="module")
def command_setup(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("command")
    train, test = digits
    train.save_npz(root / "train.npz")
    test.save_npz(root / "test.npz")
    DemoTrainer(train, TINY_RECIPE)(np.arange(len(train)), root / "base")
    base = next((root / "base" / "checkpoints").iterdir())
    (root / "train.py").write_text(COPY_MODEL_SCRIPT)
    return root, base


def _lds_args(root: Path, base: Path, out: Path, counter: str) -> list[str]:
    command = f"{sys.executable} {root / 'train.py'} {{subset_file}} {{out_dir}} {base} {root / counter} {root / 'kill'}"
    return [
        "lds",
        "--data",
        str(root / "train.npz"),
        "--test",
        str(root / "test.npz"),
        "--out",
        str(out),
        "--subsets",
        "4",
        "--loss-events",
        "4x1",
        "--train-command",
        command,
        "--bootstrap",
        "200",
        "--json",
    ]


def test_killed_lds_command_resumes_with_the_same_number(command_setup, tmp_path, capsys):
    root, base = command_setup
    scores = tmp_path / "scores.npy"
    np.save(scores, np.random.default_rng(0).standard_normal((3, 12)))
    assert (
        main([*_lds_args(root, base, tmp_path / "reference", "count-ref"), "--scores", f"mine={scores}"]) == 0
    )
    reference = json.loads(capsys.readouterr().out)
    assert reference["models_trained_now"] == 4 and reference["n_test"] == 3
    assert {"mine", "pixel_nn (-L2)", "pixel_nn (cosine)", "random"} <= set(reference["lds"])
    assert set(reference["lds_test_specific"]) == set(reference["lds"])

    (root / "kill").write_text("")
    args = [*_lds_args(root, base, tmp_path / "run", "count-run"), "--scores", f"mine={scores}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "retrac.cli", *args], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "models").iterdir() if not p.name.startswith(".")) == [
        "subset-000"
    ]
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["models_trained_now"] == 3  # subset-000 was reused
    assert (root / "count-run").read_text() == "5"  # 1 + the killed call + 3: no model trained twice
    assert resumed["lds"] == reference["lds"]
    assert resumed["lds_test_specific"] == reference["lds_test_specific"]


def test_command_trainer_errors(tmp_path, digits):
    train, _ = digits
    with pytest.raises(ConfigError, match="subset_file"):
        CommandTrainer("train.py {out_dir}")
    failing = CommandTrainer(
        f"{sys.executable} -c 'import sys; print(\"boom\"); sys.exit(3)' {{subset_file}} {{out_dir}}"
    )
    run = LDSRun(tmp_path / "run", train, failing, TINY_LDS, progress=False)
    with pytest.raises(ConfigError, match="status 3(.|\n)*boom"):
        run.train_subset_models()
    missing = CommandTrainer("no-such-retrac-trainer {subset_file} {out_dir}")
    with pytest.raises(ConfigError, match="cannot be started"):
        LDSRun(tmp_path / "run2", train, missing, TINY_LDS, progress=False).train_subset_models()
    lazy = CommandTrainer(f"{sys.executable} -c pass {{subset_file}} {{out_dir}}")  # saves no model
    with pytest.raises(Exception, match="left no model"):
        LDSRun(tmp_path / "run3", train, lazy, TINY_LDS, progress=False).train_subset_models()
    assert not (tmp_path / "run3" / "models" / "subset-000").exists()


# ---------------------------------------------------------------------------------------------- index scores


def test_index_scores_cover_every_training_sample_and_match_the_top_k(tmp_path, digits):
    from retrac.indexer import IndexConfig, featurize_dataset
    from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index

    train, test = digits
    DemoTrainer(train, TINY_RECIPE)(np.arange(len(train)), tmp_path / "model")
    checkpoint = next((tmp_path / "model" / "checkpoints").iterdir())
    config = IndexConfig(events="stratified:1", projector="dense", dim=16)
    store = featurize_dataset([str(checkpoint)], train, tmp_path / "store", config, progress=False)
    build_attribution_index(store, tmp_path / "tracin", "tracin", index="flat", progress=False)
    events = QueryEvents(2, 1)
    scores = index_scores([tmp_path / "tracin"], test.images, query_events=events)["tracin"]
    assert scores.shape == (3, 12)
    top = Attributor(tmp_path / "tracin", query_events=events, progress=False).attribute(test.images, k=3)
    np.testing.assert_array_equal(np.argsort(-scores, axis=1, kind="stable")[:, :3], top.indices)
    np.testing.assert_allclose(np.sort(scores, axis=1)[:, ::-1][:, :3], top.scores, rtol=1e-6)

    # indexes of two stores (dtrak needs a sqnorm store) are scored together, one Attributor per store
    sqnorm = IndexConfig(events="stratified:1", projector="dense", dim=16, objective="sqnorm")
    other = featurize_dataset([str(checkpoint)], train, tmp_path / "sqnorm", sqnorm, progress=False)
    build_attribution_index(other, tmp_path / "dtrak", "dtrak", index="flat", progress=False)
    both = index_scores([tmp_path / "tracin", tmp_path / "dtrak"], test.images, query_events=events)
    assert set(both) == {"tracin", "dtrak"} and both["dtrak"].shape == (3, 12)
    np.testing.assert_array_equal(both["tracin"], scores)
