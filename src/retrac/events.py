"""Deterministic noise for events, and the training-event log.

docs/design.md section 1: the noise of an event is a pure function of
``(seed, checkpoint, sample id, event index)``, so any shard recomputed alone gives identical bits.
The training-event log records, for every training step of every sample, the ``(t, noise seed)``
it was trained on, grouped by checkpoint interval, so the paper's replay is possible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retrac.errors import ConfigError, DataError

NOISE_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and platforms)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & NOISE_SEED_MASK


def noise_from_seed(noise_seed: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise ``(shape)`` float32 on the CPU, a pure function of ``noise_seed``."""
    generator = torch.Generator().manual_seed(int(noise_seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def event_noise_seed(seed: int, checkpoint: int, sample_id: str, event_index: int) -> int:
    """The noise seed of event ``event_index`` of ``sample_id`` at checkpoint ``checkpoint``."""
    return derive_seed("retrac-event", seed, checkpoint, sample_id, event_index)


@dataclass
class TrainingEventLog:
    """Every training step each sample saw: ``(t, noise seed)`` per step, grouped by checkpoint interval.

    Checkpoint ``k`` covers the steps ``(checkpoint_steps[k-1], checkpoint_steps[k]]``; ``interval``
    is that ``k`` for each logged event. All per-event arrays have shape ``(E,)``.
    """

    sample_id: np.ndarray  # str
    timestep: np.ndarray  # int64
    noise_seed: np.ndarray  # int64
    step: np.ndarray  # int64, global optimizer step
    interval: np.ndarray  # int64, checkpoint index k
    checkpoint_steps: np.ndarray  # (K,) int64

    def save(self, path: str | Path) -> Path:
        np.savez(
            path,
            sample_id=self.sample_id.astype(str),
            timestep=self.timestep,
            noise_seed=self.noise_seed,
            step=self.step,
            interval=self.interval,
            checkpoint_steps=self.checkpoint_steps,
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingEventLog:
        try:
            with np.load(path, allow_pickle=False) as archive:
                return cls(**{key: archive[key] for key in cls.__dataclass_fields__})
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(
                f"training-event log {str(path)!r} cannot be read ({exc}); give the events.npz the demo trainer wrote."
            ) from exc

    def __len__(self) -> int:
        return int(self.timestep.shape[0])


# ---------------------------------------------------------------------------------------------
# Event schedules: which events E_k(z) each training sample gets at each checkpoint.
# ---------------------------------------------------------------------------------------------

SCHEDULE_KINDS = ("stratified", "uniform", "list", "replay")
SCHEDULE_HELP = "stratified:S, uniform:S, replay:LOG or an explicit list t1,t2,..."
PADDING_TIMESTEP = -1  # timestep recorded for the padding slots of replay (valid == False)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EventSchedule:
    """How the training events ``E_k(z)`` (docs/design.md section 1) of every sample are chosen.

    Kinds (parse them from a string with :meth:`parse`):

    * ``stratified:S`` -- one timestep drawn uniformly in each of ``S`` equal bins of ``[0, T)``:
      bin ``j`` is ``[floor(j T / S), floor((j + 1) T / S))`` and the draw is a pure function of
      ``(seed, checkpoint, sample id, event index)``.
    * ``uniform:S`` -- the fixed grid ``floor(j T / S)``, ``j = 0..S-1`` (D-TRAK).
    * ``t1,t2,...`` (kind ``list``) -- the same explicit timesteps for every sample.
    * ``replay:LOG`` -- the exact ``(t, noise seed)`` each sample was trained on in the interval
      of checkpoint ``k`` (Diffusion-TracIn as in the paper), read from a :class:`TrainingEventLog`.
      Samples may have been seen a different number of times in one interval: ``S`` is the largest
      count over the data set and checkpoints, sample ``z`` fills its first ``|E_k(z)|`` slots in
      training-step order, and the remaining slots are padding with ``valid == False`` (timestep
      ``-1``, zero features and norms). Means over events must use the validity mask.

    For all kinds but ``replay`` the noise of event ``j`` of sample ``z`` at checkpoint ``k`` is
    ``noise_from_seed(event_noise_seed(seed, k, z, j))``; for ``replay`` it is
    ``noise_from_seed(logged noise seed)``, the very noise training used.

    Attributes:
        kind: one of ``stratified``, ``uniform``, ``list``, ``replay``.
        num_events: ``S`` for ``stratified`` / ``uniform`` / ``list``; ``0`` for ``replay`` (known
            only once the log and the data set are read, see :meth:`plan`).
        timesteps: the explicit timesteps of kind ``list``.
        log: absolute path of the training-event log of kind ``replay``.
        log_sha256: sha256 of that file, so a store can tell that its log changed.
    """

    kind: str
    num_events: int = 0
    timesteps: tuple[int, ...] = ()
    log: str | None = None
    log_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"event schedule kind {self.kind!r} is unknown; use {SCHEDULE_HELP}.")
        if self.kind in ("stratified", "uniform") and self.num_events < 1:
            raise ConfigError(
                f"{self.kind}:{self.num_events} needs at least one event per sample; use {self.kind}:S with S >= 1."
            )
        if self.kind == "list":
            if not self.timesteps:
                raise ConfigError(f"an explicit timestep list must not be empty; use {SCHEDULE_HELP}.")
            if any(t < 0 for t in self.timesteps):
                raise ConfigError(f"timesteps {list(self.timesteps)} must be non-negative integers.")
            if self.num_events != len(self.timesteps):
                object.__setattr__(self, "num_events", len(self.timesteps))
        if self.kind == "replay" and not self.log:
            raise ConfigError(f"replay needs a training-event log: use replay:PATH ({SCHEDULE_HELP}).")

    # ------------------------------------------------------------------ parsing / records
    @classmethod
    def parse(cls, spec: str | EventSchedule) -> EventSchedule:
        """Parse ``stratified:S``, ``uniform:S``, ``replay:LOG`` or ``t1,t2,...``.

        Raises:
            ConfigError: an unknown kind, a non-integer or non-positive ``S`` or timestep.
            DataError: the replay log does not exist.
        """
        if isinstance(spec, EventSchedule):
            return spec
        text = str(spec).strip()
        kind, sep, arg = text.partition(":")
        if sep and kind == "replay":
            path = Path(arg).expanduser()
            if not path.is_file():
                raise DataError(
                    f"training-event log {arg!r} in --events {text!r} does not exist; give the events.npz "
                    "the training run wrote (the demo writes OUT/events.npz)."
                )
            return cls("replay", log=str(path.resolve()), log_sha256=_file_sha256(path))
        if sep and kind in ("stratified", "uniform"):
            try:
                count = int(arg)
            except ValueError:
                raise ConfigError(
                    f"--events {text!r}: {arg!r} is not an integer number of events; use {kind}:S, e.g. {kind}:4."
                ) from None
            return cls(kind, num_events=count)
        if sep:
            raise ConfigError(f"--events {text!r}: kind {kind!r} is unknown; use {SCHEDULE_HELP}.")
        try:
            steps = tuple(int(part) for part in text.split(",") if part.strip() != "")
        except ValueError:
            raise ConfigError(f"--events {text!r} is not understood; use {SCHEDULE_HELP}.") from None
        return cls("list", num_events=len(steps), timesteps=steps)

    @property
    def spec(self) -> str:
        """The string form that :meth:`parse` reads back."""
        if self.kind == "list":
            return ",".join(str(t) for t in self.timesteps)
        if self.kind == "replay":
            return f"replay:{self.log}"
        return f"{self.kind}:{self.num_events}"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "num_events": self.num_events,
            "timesteps": list(self.timesteps),
            "log": self.log,
            "log_sha256": self.log_sha256,
        }

    @classmethod
    def from_dict(cls, record: dict) -> EventSchedule:
        return cls(
            kind=record["kind"],
            num_events=int(record.get("num_events", 0)),
            timesteps=tuple(int(t) for t in record.get("timesteps", ())),
            log=record.get("log"),
            log_sha256=record.get("log_sha256"),
        )

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        sample_ids: Sequence[str],
        num_train_timesteps: int,
        seed: int,
        checkpoint_steps: Sequence[int | None],
    ) -> EventPlan:
        """Resolve the schedule for one data set and checkpoint list.

        Args:
            sample_ids: the ``N`` ids of the training samples, in row order.
            num_train_timesteps: ``T`` of the noise scheduler.
            seed: the featurization seed (noise and stratified draws derive from it).
            checkpoint_steps: the training step of each of the ``K`` checkpoints (``None`` when
                unknown); ``replay`` maps checkpoint ``k`` to the log interval of its step, or to
                interval ``k`` when the step is unknown.

        Raises:
            ConfigError: ``S`` or an explicit timestep does not fit ``T``.
            DataError: a replay log that does not cover every sample at every checkpoint, or whose
                checkpoint steps do not match the checkpoints.
        """
        T = int(num_train_timesteps)
        if self.kind in ("stratified", "uniform") and self.num_events > T:
            raise ConfigError(
                f"{self.spec} asks for {self.num_events} events but the scheduler has only T={T} timesteps; "
                f"use S <= {T}."
            )
        if self.kind == "list" and max(self.timesteps) >= T:
            raise ConfigError(
                f"timesteps {list(self.timesteps)} must lie in [0, {T}) for this scheduler (T={T})."
            )
        if self.kind == "replay":
            return _ReplayPlan(self, list(sample_ids), T, int(seed), list(checkpoint_steps))
        return EventPlan(self, list(sample_ids), T, int(seed), list(checkpoint_steps))


@dataclass
class TrainEvents:
    """The events of a block of samples at one checkpoint.

    Attributes:
        timesteps: ``(B, S)`` int64 timesteps (``-1`` in padding slots).
        noise_seeds: ``(B, S)`` int64 seeds; the noise of an event is ``noise_from_seed(seed, (C, H, W))``.
        valid: ``(B, S)`` bool, False for padding slots (only ``replay`` pads).
    """

    timesteps: np.ndarray
    noise_seeds: np.ndarray
    valid: np.ndarray

    def noise(self, sample_shape: tuple[int, ...]) -> Tensor:
        """The noise ``(B, S, *sample_shape)`` float32 of every event (zeros in padding slots)."""
        b, s = self.timesteps.shape
        out = torch.zeros((b, s, *sample_shape), dtype=torch.float32)
        for i in range(b):
            for j in range(s):
                if self.valid[i, j]:
                    out[i, j] = noise_from_seed(int(self.noise_seeds[i, j]), tuple(sample_shape))
        return out


class EventPlan:
    """A schedule resolved for one data set: ``num_events`` and the events of any rows at checkpoint ``k``."""

    def __init__(
        self,
        schedule: EventSchedule,
        sample_ids: list[str],
        num_train_timesteps: int,
        seed: int,
        checkpoint_steps: list[int | None],
    ) -> None:
        self.schedule = schedule
        self.sample_ids = sample_ids
        self.num_train_timesteps = num_train_timesteps
        self.seed = seed
        self.checkpoint_steps = checkpoint_steps

    @property
    def num_events(self) -> int:
        """``S``, the number of event slots per sample and checkpoint."""
        return self.schedule.num_events

    def describe(self) -> dict:
        """What the store records about the resolved schedule."""
        return {**self.schedule.to_dict(), "num_events": self.num_events}

    def events(self, checkpoint: int, rows: Sequence[int]) -> TrainEvents:
        """The events of samples ``rows`` (row numbers into ``sample_ids``) at checkpoint index ``checkpoint``."""
        rows = list(rows)
        S, T = self.num_events, self.num_train_timesteps
        kind = self.schedule.kind
        timesteps = np.zeros((len(rows), S), dtype=np.int64)
        seeds = np.zeros((len(rows), S), dtype=np.int64)
        for i, row in enumerate(rows):
            sample_id = self.sample_ids[row]
            for j in range(S):
                if kind == "uniform":
                    t = j * T // S  # the grid 0, T/S, 2T/S, ...
                elif kind == "list":
                    t = self.schedule.timesteps[j]
                else:  # stratified: uniform in bin j = [floor(jT/S), floor((j+1)T/S))
                    lo, hi = j * T // S, (j + 1) * T // S
                    t = lo + derive_seed("retrac-stratified", self.seed, checkpoint, sample_id, j) % (hi - lo)
                timesteps[i, j] = t
                seeds[i, j] = event_noise_seed(self.seed, checkpoint, sample_id, j)
        return TrainEvents(timesteps, seeds, np.ones((len(rows), S), dtype=bool))


class _ReplayPlan(EventPlan):
    """``replay``: the logged events of each sample in each checkpoint's interval, padded to ``S``."""

    def __init__(self, schedule, sample_ids, num_train_timesteps, seed, checkpoint_steps) -> None:
        super().__init__(schedule, sample_ids, num_train_timesteps, seed, checkpoint_steps)
        log = TrainingEventLog.load(schedule.log)
        logged_steps = [int(s) for s in log.checkpoint_steps]
        self.intervals = []
        for k, step in enumerate(checkpoint_steps):
            if step is not None:
                if int(step) not in logged_steps:
                    raise DataError(
                        f"checkpoint {k} was saved at step {step}, but the training-event log {schedule.log!r} "
                        f"has checkpoints at steps {logged_steps}; give the log of the run that saved it."
                    )
                self.intervals.append(logged_steps.index(int(step)))
            elif k < len(logged_steps):
                self.intervals.append(k)
            else:
                raise DataError(
                    f"checkpoint {k} has no recorded step and the log {schedule.log!r} covers only "
                    f"{len(logged_steps)} checkpoint intervals; give the checkpoints the log was written with."
                )
        wanted = set(sample_ids)
        row_of = {sid: r for r, sid in enumerate(sample_ids)}
        # events[interval][row] = [(t, noise seed), ...] in training-step order
        self._events: dict[int, dict[int, list[tuple[int, int]]]] = {i: {} for i in set(self.intervals)}
        order = np.argsort(log.step, kind="stable")
        for e in order:
            interval = int(log.interval[e])
            sid = str(log.sample_id[e])
            if interval in self._events and sid in wanted:
                self._events[interval].setdefault(row_of[sid], []).append(
                    (int(log.timestep[e]), int(log.noise_seed[e]))
                )
        # A sample not trained on in a checkpoint's interval has no event there and contributes nothing from
        # that interval (u_k(z) = 0, docs/design.md section 1); one the log never names is not of this run.
        seen = set().union(*(per.keys() for per in self._events.values()))
        never = [sample_ids[r] for r in range(len(sample_ids)) if r not in seen]
        if never:
            raise DataError(
                f"the training-event log {schedule.log!r} has no event for {len(never)} of {len(sample_ids)} "
                f"samples in any interval of these checkpoints (e.g. {never[:3]}); replay needs the log of the "
                "run that trained on exactly this data set, or use --events stratified:S."
            )
        self.missing = {
            k: len(sample_ids) - len(self._events[interval]) for k, interval in enumerate(self.intervals)
        }  # samples with no event at checkpoint k (they contribute nothing from its interval)
        self._num_events = max(len(v) for per in self._events.values() for v in per.values())
        top = max(t for per in self._events.values() for v in per.values() for t, _ in v)
        if top >= num_train_timesteps:
            raise DataError(
                f"the training-event log {schedule.log!r} holds timestep {top}, outside [0, {num_train_timesteps}) "
                "of this scheduler; give the log of the run that trained these checkpoints."
            )

    @property
    def num_events(self) -> int:
        return self._num_events

    def describe(self) -> dict:
        return {**super().describe(), "intervals": self.intervals}

    def events(self, checkpoint: int, rows: Sequence[int]) -> TrainEvents:
        rows = list(rows)
        S = self.num_events
        timesteps = np.full((len(rows), S), PADDING_TIMESTEP, dtype=np.int64)
        seeds = np.zeros((len(rows), S), dtype=np.int64)
        valid = np.zeros((len(rows), S), dtype=bool)
        per_row = self._events[self.intervals[checkpoint]]
        for i, row in enumerate(rows):
            for j, (t, noise_seed) in enumerate(per_row.get(row, ())):  # none: not trained on in the interval
                timesteps[i, j], seeds[i, j], valid[i, j] = t, noise_seed, True
        return TrainEvents(timesteps, seeds, valid)
