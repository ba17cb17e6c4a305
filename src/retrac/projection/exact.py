"""The ``exact`` projector: the identity, ``d = P``.

The features are the per-sample gradients themselves (docs/design.md section 1 with ``P_k = I``):
the reference the other projectors are tested against, for small models and tests only.
"""

from __future__ import annotations

from torch import Tensor

from retrac.errors import ConfigError
from retrac.projection.base import GradientProjector, register_projector
from retrac.task import DiffusionTask

__all__ = ["ExactProjector"]


@register_projector("exact")
class ExactProjector(GradientProjector):
    """The identity: features are the per-sample gradients themselves (``d = P``)."""

    def __init__(self, num_parameters: int) -> None:
        super().__init__(num_parameters, num_parameters, None)

    @classmethod
    def create(
        cls, task: DiffusionTask, dim: int | None, seed: int, backend: str, settings: dict
    ) -> ExactProjector:
        """The identity for ``task``; ``dim`` must be ``None`` or ``P`` (``seed`` and the rest are unused)."""
        num_parameters = task.num_parameters
        if dim is not None and int(dim) != num_parameters:
            raise ConfigError(
                f"the exact projector keeps all {num_parameters} gradient entries; drop --dim {dim} "
                "or use --projector dense to project to it."
            )
        return cls(num_parameters)

    @classmethod
    def from_record(cls, record: dict, task: DiffusionTask) -> ExactProjector:
        return cls(task.num_parameters)

    def project(self, grads: Tensor) -> Tensor:
        return grads
