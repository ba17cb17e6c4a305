"""Projectors: per-sample gradients -> the features ``phi_k(z, e) = P_k grad l(theta_k; z, e)``.

docs/design.md section 1: ``P_k`` is a seeded random projection to ``d`` dimensions, one per
checkpoint, identical on the training and the query side, and ``n_k(z, e) = ||grad l(theta_k; z, e)||``
is recorded with every feature. docs/design.md section 2: the indexer and the query side both reach
the features through :func:`projected_gradients`.

Kinds (registered in this order, see :data:`PROJECTOR_KINDS`):

* ``exact`` (:mod:`~retrac.projection.exact`): the identity (``d = P``). The reference the others
  are tested against; for small models and tests only.
* ``dense`` (:mod:`~retrac.projection.dense`): a Gaussian JL projection from trak's
  ``BasicProjector`` (or, backend ``fast_jl``, its Rademacher ``CudaProjector``).
* ``factored`` (:mod:`~retrac.projection.factored`, the indexer's default): per-layer LoGra-style
  projections ``sum_p (B g_p)(A x_p)^T`` from hooks on ``nn.Linear`` / ``nn.Conv2d`` (GroupNorm kept
  whole), then a sparse JL second stage to ``d``; never forms the per-sample gradient. Its record
  carries ``layer_dim``, ``second_stage``, ``norms`` and the parameters it does not cover.

Dependencies point one way: :mod:`~retrac.projection.gradients` <- :mod:`~retrac.projection.base`
(interface, registry, factories) <- one module per kind <- this package, whose imports fill the
registry. A new projector is one new module with a ``@register_projector("kind")`` class and one
import line below.
"""

from retrac.projection.base import (
    DEFAULT_CACHE_BYTES,
    PROCESS_CACHE_BYTES,
    PROJECTORS,
    GradientProjector,
    Projector,
    make_projector,
    projector_from_dict,
    projector_seed,
    register_projector,
)
from retrac.projection.gradients import (
    default_max_rows,
    flat_per_sample_gradients,
    projected_gradients,
    vmap_friendly_attention,
)

# the registry: one import per kind, in the order PROJECTOR_KINDS lists them
from retrac.projection.exact import ExactProjector  # isort: skip
from retrac.projection.dense import DENSE_BACKENDS, TRAK_BLOCK_SIZE, DenseProjector  # isort: skip
from retrac.projection.factored import (  # isort: skip
    DEFAULT_LAYER_DIM,
    FACTORED_NORMS,
    FACTORED_SECOND_STAGES,
    MAX_FACTORED_ROWS,
    FactoredLayer,
    FactoredProjector,
)

PROJECTOR_KINDS = tuple(PROJECTORS)  # ("exact", "dense", "factored")

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_LAYER_DIM",
    "DENSE_BACKENDS",
    "FACTORED_NORMS",
    "FACTORED_SECOND_STAGES",
    "MAX_FACTORED_ROWS",
    "PROCESS_CACHE_BYTES",
    "PROJECTORS",
    "PROJECTOR_KINDS",
    "TRAK_BLOCK_SIZE",
    "DenseProjector",
    "ExactProjector",
    "FactoredLayer",
    "FactoredProjector",
    "GradientProjector",
    "Projector",
    "default_max_rows",
    "flat_per_sample_gradients",
    "make_projector",
    "projected_gradients",
    "projector_from_dict",
    "projector_seed",
    "register_projector",
    "vmap_friendly_attention",
]
