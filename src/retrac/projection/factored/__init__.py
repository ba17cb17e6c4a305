"""The ``factored`` projector (LoGra-style per-layer projections from hooks, then a second stage).

* :mod:`~retrac.projection.factored.planning`: which layers are hooked and where each block sits;
* :mod:`~retrac.projection.factored.matrices`: the seeded stage-1 (``A``, ``B``) and stage-2 matrices;
* :mod:`~retrac.projection.factored.layer_features`: one layer's block and squared gradient norm;
* :mod:`~retrac.projection.factored.projector`: :class:`FactoredProjector`, the hook driver.
"""

from retrac.projection.factored.layer_features import NORM_CHUNK_FLOATS
from retrac.projection.factored.matrices import SPARSE_NONZEROS
from retrac.projection.factored.planning import DEFAULT_LAYER_DIM, FactoredLayer
from retrac.projection.factored.projector import (
    FACTORED_NORMS,
    FACTORED_SECOND_STAGES,
    MAX_FACTORED_ROWS,
    FactoredProjector,
)

__all__ = [
    "DEFAULT_LAYER_DIM",
    "FACTORED_NORMS",
    "FACTORED_SECOND_STAGES",
    "MAX_FACTORED_ROWS",
    "NORM_CHUNK_FLOATS",
    "SPARSE_NONZEROS",
    "FactoredLayer",
    "FactoredProjector",
]
