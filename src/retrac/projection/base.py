"""The projector interface, the registry of projector kinds, and what the kinds share.

docs/design.md section 1: ``P_k`` is a seeded random projection to ``d`` dimensions, one per
checkpoint, identical on the training and the query side (same seed, same parameter order), and
``n_k(z, e) = ||grad l(theta_k; z, e)||`` is recorded with every feature.

A :class:`Projector` turns rows of model inputs ``(x_t, t, target, c)`` into ``(features, norms)``
through :meth:`Projector.featurize_rows`. Owning that whole step (not only ``grads @ P``) lets a
projector that never materialises the per-sample gradient (``factored``, from layer hooks) sit
beside those that do (:class:`GradientProjector`) with no change to
:func:`retrac.projection.gradients.projected_gradients` or its callers.

Each kind is a subclass registered under its name with :func:`register_projector`;
:func:`make_projector` (from the user's choice) and :func:`projector_from_dict` (from a store's
record) look the kind up in :data:`PROJECTORS`. The registry is filled when
:mod:`retrac.projection` imports the projector modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from retrac.errors import ConfigError
from retrac.events import derive_seed
from retrac.projection.gradients import default_max_rows, flat_per_sample_gradients
from retrac.task import DiffusionTask

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "PROCESS_CACHE_BYTES",
    "PROJECTORS",
    "GradientProjector",
    "Projector",
    "cached_matrix",
    "make_projector",
    "projector_from_dict",
    "projector_seed",
    "register_projector",
]

DEFAULT_CACHE_BYTES = 1 << 30  # keep P_k in memory when it is at most this large
PROCESS_CACHE_BYTES = 2 << 30  # all cached P_k of a process together (least recently used evicted)
_MATRIX_CACHE: OrderedDict[tuple, list[Tensor]] = OrderedDict()


def cached_matrix(key: tuple, build: Callable[[], list[Tensor]]) -> list[Tensor]:
    """``P_k`` blocks shared by every projector of the process with the same (P, d, seed, device).

    Args:
        key: what identifies the matrix, e.g. ``(P, d, seed, device)``.
        build: makes the blocks when ``key`` is not cached.

    Returns:
        The cached (or just built) blocks; the least recently used entries are evicted once all
        cached blocks exceed ``PROCESS_CACHE_BYTES``.
    """
    if key in _MATRIX_CACHE:
        _MATRIX_CACHE.move_to_end(key)
        return _MATRIX_CACHE[key]
    blocks = build()
    _MATRIX_CACHE[key] = blocks
    while (
        len(_MATRIX_CACHE) > 1
        and sum(b.numel() * b.element_size() for v in _MATRIX_CACHE.values() for b in v) > PROCESS_CACHE_BYTES
    ):
        _MATRIX_CACHE.popitem(last=False)
    return blocks


def projector_seed(seed: int, checkpoint_index: int) -> int:
    """The seed of ``P_k``: a pure function of the featurization seed and the checkpoint index.

    Kept below ``2**31`` because trak adds block offsets to it.
    """
    return derive_seed("retrac-projector", int(seed), int(checkpoint_index)) % (1 << 31)


class Projector(ABC):
    """Maps rows of model inputs to projected per-sample gradients and their norms.

    A kind is a subclass decorated with :func:`register_projector`, which sets :attr:`kind`.

    Attributes:
        kind: the registered name (``"exact"``, ``"dense"``, ``"factored"``).
        dim: ``d``, the feature dimension.
        num_parameters: ``P``, the number of parameters that count in the task.
        seed: the seed of ``P_k`` (``None`` for ``exact``).
        norm_kind: ``"exact"`` when ``norms`` are ``||grad||``, ``"projected"`` when they are
            ``||phi||`` (a projector that never forms the gradient), ``"mixed"`` when a factored
            projector leaves some parameters uncovered (see its ``to_dict``).
    """

    kind: str = ""
    norm_kind: str = "exact"

    def __init__(self, num_parameters: int, dim: int, seed: int | None) -> None:
        self.num_parameters = int(num_parameters)
        self.dim = int(dim)
        self.seed = seed

    @classmethod
    @abstractmethod
    def create(
        cls, task: DiffusionTask, dim: int | None, seed: int, backend: str, settings: dict
    ) -> Projector:
        """This kind for ``task`` from the user's choice (see :func:`make_projector`).

        Args:
            task: gives ``P`` and the parameters that count.
            dim: the requested ``d``, or ``None``.
            seed: the seed of ``P_k`` (already :func:`projector_seed`).
            backend: the ``dense`` backend.
            settings: a projector record whose kind-specific settings override the defaults.

        Raises:
            ConfigError: a ``dim`` or setting this kind cannot take.
        """

    @classmethod
    @abstractmethod
    def from_record(cls, record: dict, task: DiffusionTask) -> Projector:
        """This kind rebuilt from its :meth:`to_dict` record, with the recorded seed as is.

        Raises:
            ConfigError: the record does not fit ``task``.
        """

    @abstractmethod
    def featurize_rows(
        self,
        task: DiffusionTask,
        x_t: Tensor,
        timesteps: Tensor,
        target: Tensor,
        conditioning: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Projected per-sample gradients of ``task``'s objective, one row per event.

        Args:
            task: the model (at checkpoint ``k``), scheduler and objective.
            x_t: ``(R, C, H, W)`` noisy inputs on ``task.device``.
            timesteps: ``(R,)`` int64 timesteps.
            target: ``(R, C, H, W)`` prediction targets (ignored by ``sqnorm``).
            conditioning: ``(R,)`` int64 labels for a class-conditional model, ``(R, L, D)``
                encoder_hidden_states for a text model, else ``None``.

        Returns:
            ``(features, norms)``: ``(R, d)`` float32 ``phi_k`` and ``(R,)`` float32 ``n_k``, on
            ``task.device``.
        """

    def max_rows(self, task: DiffusionTask) -> int:
        """Rows per :meth:`featurize_rows` call (bounds memory); default: ``(rows, P)`` gradients in budget."""
        return default_max_rows(task.num_parameters)

    def to_dict(self) -> dict:
        """What the store records about ``P_k`` (and what :func:`projector_from_dict` rebuilds it from)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "num_parameters": self.num_parameters,
            "norm_kind": self.norm_kind,
        }


class GradientProjector(Projector):
    """A projector that forms per-sample gradients ``(R, P)`` and projects them: ``n_k`` is exact."""

    def featurize_rows(self, task, x_t, timesteps, target, conditioning=None):
        grads = flat_per_sample_gradients(task, x_t, timesteps, target, conditioning)  # (R, P)
        norms = torch.linalg.vector_norm(grads, dim=1)  # n_k(z, e) = ||grad l(theta_k; z, e)||
        return self.project(grads), norms

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """``(R, P)`` float32 gradients -> ``(R, d)`` float32 features ``P_k g``."""


PROJECTORS: dict[str, type[Projector]] = {}  # kind -> class, in registration order
_P = TypeVar("_P", bound=type[Projector])


def register_projector(kind: str) -> Callable[[_P], _P]:
    """Class decorator: register a :class:`Projector` subclass under ``kind`` (and set its ``kind``).

    Raises:
        ValueError: ``kind`` already registered to another class (a programming error).
    """

    def register(cls: _P) -> _P:
        if PROJECTORS.get(kind, cls) is not cls:
            raise ValueError(f"projector kind {kind!r} is already registered to {PROJECTORS[kind].__name__}")
        cls.kind = kind
        PROJECTORS[kind] = cls
        return cls

    return register


def make_projector(
    kind: str,
    task: DiffusionTask,
    dim: int | None = None,
    seed: int = 0,
    checkpoint_index: int = 0,
    backend: str = "basic",
    settings: dict | None = None,
) -> Projector:
    """Build ``P_k`` for checkpoint ``checkpoint_index`` of a featurization with seed ``seed``.

    The query side calls this with the store's recorded kind, dim, seed and backend (or uses
    ``FeatureStore.projector``) so its projection is identical to the training side's.

    Args:
        kind: a registered kind: ``"exact"``, ``"dense"`` or ``"factored"``.
        task: the task whose selected parameters the gradients cover (gives ``P``).
        dim: ``d`` for ``dense`` and ``factored`` (required); for ``exact`` ``None`` or ``P``.
        seed: the featurization seed; ``P_k``'s seed is ``projector_seed(seed, checkpoint_index)``.
        checkpoint_index: ``k``.
        backend: ``dense`` backend, ``"basic"`` or ``"fast_jl"``.
        settings: a projector record (``to_dict``, e.g. from a store) whose ``factored`` settings
            (``layer_dim``, ``second_stage``, ``norms``) override the defaults.

    Raises:
        ConfigError: unknown kind, missing or out-of-range ``dim``.
    """
    if kind not in PROJECTORS:
        raise ConfigError(f"projector {kind!r} is unknown; choose one of {', '.join(PROJECTORS)}.")
    return PROJECTORS[kind].create(task, dim, projector_seed(seed, checkpoint_index), backend, settings or {})


def projector_from_dict(record: dict, task: DiffusionTask) -> Projector:
    """Rebuild a projector from its ``to_dict`` record (as a store holds it), for ``task``.

    The recorded seed is used as is, so the rebuilt ``P_k`` is the one the record was written with.

    Raises:
        ConfigError: ``task`` counts another number of parameters than the record, the kind is
            unknown to this version of retrac, or the kind rejects the record.
    """
    num_parameters = task.num_parameters
    if int(record["num_parameters"]) != num_parameters:
        raise ConfigError(
            f"the projector was built for {record['num_parameters']} parameters but the task counts "
            f"{num_parameters}; use the same model and include/exclude patterns as when it was built."
        )
    if record["kind"] not in PROJECTORS:
        raise ConfigError(
            f"projector kind {record['kind']!r} is unknown to this retrac; upgrade retrac to read this store."
        )
    return PROJECTORS[record["kind"]].from_record(record, task)
