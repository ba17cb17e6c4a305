"""Memorization audit: which outputs copy training data, and which training samples they come from.

For every audited image ``x`` (a generated image, say) the audit reports:

* its nearest training images in pixel space, found exactly by a FAISS ``IndexFlatL2`` over the
  *distinct* training images (exact pixel duplicates are one entry: ``retrac.audit.pixel_index``) and re-measured in
  float64. ``d_1`` is the L2 distance (square root of the sum of squared differences over all
  ``C * H * W`` pixel values in ``[-1, 1]``) to the nearest one.
* the relative distance of Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
  section 5): ``r(x) = d_1 / mean_{j <= n} d_j``, the distance to the nearest training image divided
  by the mean distance to its ``n`` nearest (``n = 50`` by default). A copy sits much closer to one
  training image than to the rest of its neighbourhood (``r`` near 0); an image of a dense region
  has ``r`` near 1. Carlini et al. call an output extracted when ``d_1 / (alpha * mean d_j) <= delta``
  with ``alpha = 0.5``; our ``r`` is that ratio without ``alpha``.
* the verdict: ``copy`` when ``r < copy_threshold`` (default ``1/6``: the nearest training image is
  more than six times closer than the mean of the neighbourhood; ``ell <= 1/3`` in Carlini et al.'s
  ``alpha = 0.5`` scaling), ``near`` when ``r < near_threshold`` (default ``1/2``: less than half as
  far), else ``novel``. The thresholds are in every record. On the planted-duplicates demo (8x8
  digits, DDPM sampled in 100 steps, ``benchmarks/audit.py``) 73 of the 79 outputs nearest a
  duplicated digit have ``r < 1/2`` (median 0.28) and only one ``r < 1/6``, while outputs nearest
  other digits have ``r >= 0.46`` (median 0.79): tiny images sampled in few steps keep some noise, so
  there ``near`` is the verdict that catches the reproductions.
* its top-k proponents under each loaded attribution index (ReTrac, TracIn, ...) and
  ``nn_rank``: the 1-based rank of the first proponent whose pixels equal the nearest training
  image (the image itself or any exact duplicate of it), or ``None``.

Across all images: hot spots (training images that are the nearest neighbour or a top-1 proponent
of the most outputs, with counts) and the self-influence ranking of every training sample,
``SI(z) = sum_k w_k ||u_k(z)||^2`` with ``u_k`` the TracIn train vector of the store: the TracIn
score ``I(z, z)`` of the sample on itself with its training events as query events, that is
the inner product of its TracIn vector with itself in the score's metric. It needs no generated image.

Modules, dependencies pointing one way (each imports only those above it; nothing in
``retrac.report`` or ``retrac.query`` imports the audit back):

* ``config``: :class:`AuditConfig` and the meaning of each number;
* ``metrics``: the relative distance and the verdicts;
* ``pixel_index``: the exact L2 :class:`PixelIndex` over the distinct training images, kept in ``OUT/pixel-index/``;
* ``training``: the store's training data, self-influence, whether the model can sample;
* ``records``: :func:`audit_images` (one record per image) and :func:`summarize`;
* ``writers``: :func:`write_audit` (JSONL, JSON and the HTML report of ``retrac.report.audit``);
* ``run``: :func:`run_audit`, the ``retrac audit`` command.
"""

from retrac.audit.config import (
    DISTANCE_MEANING,
    RELATIVE_MEANING,
    SELF_INFLUENCE_MEANING,
    VERDICTS,
    AuditConfig,
)
from retrac.audit.metrics import relative_distances, verdicts
from retrac.audit.pixel_index import (
    PIXEL_INDEX_FILE,
    PIXEL_INDEX_FOLDER,
    PIXEL_INDEX_FORMAT,
    PIXEL_INDEX_FORMAT_VERSION,
    PIXEL_MANIFEST,
    PixelIndex,
    audit_pixel_index,
)
from retrac.audit.records import AuditResult, audit_images, summarize
from retrac.audit.run import run_audit
from retrac.audit.training import check_can_sample, load_training_data, self_influence, self_influence_ranking
from retrac.audit.writers import write_audit

__all__ = [
    "DISTANCE_MEANING",
    "PIXEL_INDEX_FILE",
    "PIXEL_INDEX_FOLDER",
    "PIXEL_INDEX_FORMAT",
    "PIXEL_INDEX_FORMAT_VERSION",
    "PIXEL_MANIFEST",
    "RELATIVE_MEANING",
    "SELF_INFLUENCE_MEANING",
    "VERDICTS",
    "AuditConfig",
    "AuditResult",
    "PixelIndex",
    "audit_images",
    "audit_pixel_index",
    "check_can_sample",
    "load_training_data",
    "relative_distances",
    "run_audit",
    "self_influence",
    "self_influence_ranking",
    "summarize",
    "verdicts",
    "write_audit",
]
