"""Event schedules: parsing, records, pure-function draws, replay from the training-event log."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrac.errors import ConfigError, DataError
from retrac.events import (
    EventSchedule,
    TrainingEventLog,
    derive_seed,
    event_noise_seed,
    noise_from_seed,
)

IDS = [f"s{i}" for i in range(5)]


def plan(spec: str, T: int = 100, seed: int = 0, steps=(None, None)):
    return EventSchedule.parse(spec).plan(IDS, T, seed, list(steps))


@pytest.mark.parametrize("spec", ["stratified:4", "uniform:3", "0,10,99"])
def test_parse_spec_and_records_round_trip(spec):
    schedule = EventSchedule.parse(spec)
    assert EventSchedule.parse(schedule.spec) == schedule
    assert EventSchedule.from_dict(schedule.to_dict()) == schedule
    assert EventSchedule.parse(schedule) is schedule


def test_stratified_draws_one_timestep_per_bin_as_a_pure_function():
    events = plan("stratified:4", T=100).events(1, range(5))
    assert events.timesteps.shape == (5, 4) and events.valid.all()
    for j in range(4):  # bin j = [25 j, 25 (j + 1))
        assert ((events.timesteps[:, j] >= 25 * j) & (events.timesteps[:, j] < 25 * (j + 1))).all()
    again = plan("stratified:4", T=100).events(1, [3, 4])  # any rows, recomputed alone: same bits
    np.testing.assert_array_equal(again.timesteps, events.timesteps[3:])
    np.testing.assert_array_equal(again.noise_seeds, events.noise_seeds[3:])
    other_checkpoint = plan("stratified:4", T=100).events(0, range(5))
    other_seed = plan("stratified:4", T=100, seed=1).events(1, range(5))
    assert not np.array_equal(other_checkpoint.timesteps, events.timesteps)
    assert not np.array_equal(other_seed.noise_seeds, events.noise_seeds)
    assert len(np.unique(events.timesteps)) > 4  # samples get different draws


def test_uniform_and_list_are_fixed_grids_with_seeded_noise():
    uniform = plan("uniform:4", T=1000).events(0, range(2))
    assert uniform.timesteps.tolist() == [[0, 250, 500, 750]] * 2
    listed = plan("5,7", T=10).events(2, range(2))
    assert listed.timesteps.tolist() == [[5, 7], [5, 7]]
    assert listed.noise_seeds[1, 1] == event_noise_seed(0, 2, "s1", 1)
    noise = listed.noise((1, 4, 4))
    assert noise.shape == (2, 2, 1, 4, 4)
    assert torch.equal(noise[1, 1], noise_from_seed(event_noise_seed(0, 2, "s1", 1), (1, 4, 4)))
    assert not torch.equal(noise[0, 0], noise[0, 1])


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("stratified:0", ConfigError, "at least one event"),
        ("stratified:x", ConfigError, "not an integer"),
        ("gaussian:4", ConfigError, "kind 'gaussian' is unknown"),
        ("5,abc", ConfigError, "not understood"),
        (",", ConfigError, "must not be empty"),
        ("-1,3", ConfigError, "non-negative"),
        ("replay:/no/such/events.npz", DataError, "does not exist"),
    ],
)
def test_bad_specs_raise(spec, error, match):
    with pytest.raises(error, match=match):
        EventSchedule.parse(spec)


def test_schedules_that_do_not_fit_the_scheduler_raise():
    with pytest.raises(ConfigError, match="T=10"):
        plan("uniform:11", T=10)
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        plan("3,10", T=10)


def write_log(path, sample_ids, intervals, timesteps, steps=None, checkpoint_steps=(4, 8)):
    n = len(sample_ids)
    log = TrainingEventLog(
        sample_id=np.array(sample_ids),
        timestep=np.array(timesteps, dtype=np.int64),
        noise_seed=np.array([derive_seed("log", i) for i in range(n)], dtype=np.int64),
        step=np.array(steps if steps is not None else list(range(n)), dtype=np.int64),
        interval=np.array(intervals, dtype=np.int64),
        checkpoint_steps=np.array(checkpoint_steps, dtype=np.int64),
    )
    return log, log.save(path)


def test_replay_reads_each_checkpoints_interval_in_step_order(tmp_path):
    # interval 0: s0..s4 once, s2 a second time (logged first, but at a later step); interval 1: all once
    ids = ["s2", *IDS, *IDS]
    intervals = [0] * 6 + [1] * 5
    steps = [3] + [1] * 5 + [5] * 5
    timesteps = [90, 0, 1, 2, 3, 4, 50, 51, 52, 53, 54]
    log, path = write_log(tmp_path / "events.npz", ids, intervals, timesteps, steps)
    resolved = plan(f"replay:{path}", steps=(4, 8))
    assert resolved.num_events == 2 and resolved.describe()["intervals"] == [0, 1]
    first = resolved.events(0, range(5))
    assert first.timesteps[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert first.valid.sum() == 6 and first.timesteps[2].tolist() == [2, 90] and first.timesteps[0, 1] == -1
    assert first.noise_seeds[2, 1] == log.noise_seed[0]  # the logged noise seed, not a derived one
    noise = first.noise((1, 2, 2))
    assert torch.equal(noise[2, 1], noise_from_seed(int(log.noise_seed[0]), (1, 2, 2)))
    assert (noise[0, 1] == 0).all()
    second = resolved.events(1, [4])
    assert second.timesteps.tolist() == [[54, -1]] and second.valid.tolist() == [[True, False]]
    # checkpoints given by position when their steps are unknown; by step when known
    assert plan(f"replay:{path}", steps=(None,)).describe()["intervals"] == [0]
    assert plan(f"replay:{path}", steps=(8,)).describe()["intervals"] == [1]
    assert EventSchedule.parse(f"replay:{path}").log_sha256 is not None


def test_replay_logs_that_do_not_fit_raise(tmp_path):
    _, partial = write_log(tmp_path / "partial.npz", IDS[:3], [0, 0, 0], [1, 2, 3])
    with pytest.raises(
        DataError, match=r"no event for 2 of 5 samples in any interval .*\(e.g. \['s3', 's4'\]\)"
    ):
        plan(f"replay:{partial}", steps=(None,))
    _, full = write_log(tmp_path / "full.npz", IDS, [0] * 5, [1, 2, 3, 4, 5])
    with pytest.raises(DataError, match="saved at step 6"):
        plan(f"replay:{full}", steps=(6,))
    with pytest.raises(DataError, match="covers only 2 checkpoint intervals"):
        plan(f"replay:{full}", steps=(None, None, None))
    with pytest.raises(DataError, match="timestep 5, outside"):
        plan(f"replay:{full}", T=5, steps=(4,))
    (tmp_path / "junk.npz").write_text("not a log")
    with pytest.raises(DataError, match="cannot be read"):
        plan(f"replay:{tmp_path / 'junk.npz'}", steps=(None,))
