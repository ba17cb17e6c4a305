"""Limits and batching settings of ``retrac serve``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrac.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """How much one request may ask for, and how query-gradient work is grouped.

    Attributes:
        max_k: largest ``k`` a request may ask for (also capped by the number of training samples).
        max_images: images per request (uploaded rows plus named examples).
        max_upload_bytes: largest request body; a larger one gets 413 before it is read.
        max_image_side: largest width or height of a decoded PNG / JPEG / ``.npy`` image, checked
            before the pixels are decoded (a small file can declare a huge image).
        batch_window_ms: how long the batcher waits after the first waiting request for others to
            join its query-gradient batch.
        max_batch_images: images per query-gradient batch.
        max_pending_images: images waiting for gradients; a request that would exceed it gets 503
            with ``Retry-After`` instead of queueing without bound.
        retry_after_s: the ``Retry-After`` value of a 503.
        cache_queries: query vectors kept by image digest (least recently used dropped; 0 = none),
            so that asking for opponents after proponents of one image costs no gradients.
        history_queries: answered queries kept in memory for a training sample's "most influenced
            queries" (least recently used dropped; 0 = none). Nothing is written to disk.
        max_examples: images taken from each ``--examples`` file for the page's picker.
        search_threads: threads that run index searches and store reads off the event loop.
    """

    max_k: int = 100
    max_images: int = 16
    max_upload_bytes: int = 8 * 2**20
    max_image_side: int = 1024
    batch_window_ms: float = 5.0
    max_batch_images: int = 16
    max_pending_images: int = 64
    retry_after_s: int = 1
    cache_queries: int = 256
    history_queries: int = 256
    max_examples: int = 64
    search_threads: int = 2

    def __post_init__(self) -> None:
        positive = ("max_k", "max_images", "max_upload_bytes", "max_image_side", "max_batch_images")
        positive += ("max_pending_images", "retry_after_s", "search_threads")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve setting {name}={value!r} must be an integer >= 1.")
        for name in ("cache_queries", "history_queries", "max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"serve setting {name}={value!r} must be an integer >= 0.")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ConfigError(
                f"batch_window_ms={self.batch_window_ms!r} must lie in [0, 1000] (a few milliseconds groups "
                "requests that arrive together)."
            )
        if self.max_pending_images < self.max_images:
            raise ConfigError(
                f"max_pending_images={self.max_pending_images} is below max_images={self.max_images}: "
                "a full request could never be queued; raise max_pending_images."
            )

    def to_dict(self) -> dict:
        return asdict(self)
