"""``IndexConfig``: the validated settings of a featurization (``retrac index``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from retrac.errors import ConfigError
from retrac.events import EventSchedule
from retrac.projection import DENSE_BACKENDS, PROJECTOR_KINDS
from retrac.task import OBJECTIVES

DTYPES = ("float16", "float32")
DEFAULT_DIM = 1024
RUNTIME_FIELDS = ("batch_size",)  # change only float rounding, so not compared on reopening
LAYOUTS = ("full", "compact")  # retrac.indexer.layout


@dataclass
class IndexConfig:
    """How the train side turns ``dataset x checkpoints x events`` into stored features.

    Attributes:
        events: the event schedule ``E_k(z)``: ``stratified:S``, ``uniform:S``, ``replay:LOG`` or
            ``t1,t2,...`` (a string, parsed to an :class:`~retrac.events.EventSchedule`).
        projector: ``"factored"`` (default: per-layer LoGra-style projection from layer hooks plus a
            sparse JL second stage to ``dim``; never forms the per-sample gradient, see
            :mod:`retrac.projection.factored`; norms ``mixed``), ``"dense"`` (trak's seeded JL projection to
            ``dim``; exact norms) or ``"exact"`` (raw gradients).
        dim: ``d`` for ``dense`` and ``factored`` (default 1024); ``None`` or the parameter count for ``exact``.
        dense_backend: ``"basic"`` (trak ``BasicProjector``, any device) or ``"fast_jl"`` (trak
            ``CudaProjector``; needs CUDA and fast_jl; a different matrix).
        objective: ``"loss"`` (TracIn / ReTrac / TRAK), ``"l1"`` (the paper's official code) or
            ``"sqnorm"`` (D-TRAK).
        dtype: storage dtype of ``features``: ``"float32"`` or ``"float16"`` (norms are float32).
        batch_size: samples per gradient batch (each sample brings its ``S`` events); does not
            change results beyond float rounding, so it is not recorded in the store.
        seed: seeds the stratified draws, the event noise and the projections ``P_k``.
        include: ``fnmatch`` patterns of the parameters that count (default: all).
        exclude: patterns removed after ``include``.
        shard_rows: samples per shard: the unit of work, of resumption, of ``--shard`` splitting and
            of the Zarr shard files (a whole shard is held in memory while it is computed).
        layout: ``"full"`` (every event's features) or ``"compact"`` (only the TracIn and ReTrac train
            vectors per sample and checkpoint, plus the per-event norms: ``S / 2`` times less disk; see
            :mod:`retrac.indexer.layout` for what a compact store cannot do).
    """

    events: str | EventSchedule = "stratified:4"
    projector: str = "factored"  # met the fidelity target (benchmarks/fidelity.py); "dense" stays selectable
    dim: int | None = None
    dense_backend: str = "basic"
    objective: str = "loss"
    dtype: str = "float32"
    batch_size: int = 16
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    shard_rows: int = 256
    layout: str = "full"
    schedule: EventSchedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.schedule = EventSchedule.parse(self.events)
        self.events = self.schedule.spec
        if self.projector not in PROJECTOR_KINDS:
            raise ConfigError(
                f"projector={self.projector!r} is unknown; choose one of {', '.join(PROJECTOR_KINDS)}."
            )
        if self.projector in ("dense", "factored") and self.dim is None:
            self.dim = DEFAULT_DIM
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise ConfigError(f"dim={self.dim!r} must be a positive integer; give --dim D, e.g. --dim 1024.")
        if self.dense_backend not in DENSE_BACKENDS:
            raise ConfigError(
                f"dense_backend={self.dense_backend!r} is unknown; choose one of {', '.join(DENSE_BACKENDS)}."
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"objective={self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}."
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout={self.layout!r} is unknown; choose one of {', '.join(LAYOUTS)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}.")
        for name in ("batch_size", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer.")
        self.include = tuple(self.include or ())
        self.exclude = tuple(self.exclude or ())

    def to_dict(self) -> dict:
        """All settings, JSON-ready (the event schedule as its record, with the replay log's sha256)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        record["events"] = self.schedule.to_dict()
        record["include"] = list(self.include)
        record["exclude"] = list(self.exclude)
        return record

    def store_dict(self) -> dict:
        """The settings a store records and compares on reopening (``to_dict`` less runtime fields).

        ``layout`` is recorded only when it is ``compact``, so full stores keep the record (and the
        fingerprint) they had before layouts existed.
        """
        record = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        if record["layout"] == "full":
            del record["layout"]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> IndexConfig:
        known = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in record.items() if k in known}
        if isinstance(values.get("events"), dict):
            values["events"] = EventSchedule.from_dict(values["events"])
        values["include"] = tuple(values.get("include", ()))
        values["exclude"] = tuple(values.get("exclude", ()))
        return cls(**values)
